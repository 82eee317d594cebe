"""Demonstration preparation: checks the dataset and tokenises each demonstration once (DESIGN 2.1)."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset, IterableDataset


logger = logging.getLogger(__name__)

# Columns HPTTrainer adds to the training set; they never reach reward functions.
DEMO_IDS = "hpt_demo_ids"
DEMO_TRUNCATED = "hpt_demo_truncated"
HAS_DEMO = "hpt_has_demo"
ROW_INDEX = "hpt_row_index"
HPT_COLUMNS = (DEMO_IDS, DEMO_TRUNCATED, HAS_DEMO, ROW_INDEX)


def add_row_index(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Adds `hpt_row_index`, the row's position in the training set, so gate decisions can be traced to prompts."""
    if ROW_INDEX in (column_names(dataset) or []):
        return dataset
    return dataset.map(lambda _, index: {ROW_INDEX: index}, with_indices=True)


def column_names(dataset: Dataset | IterableDataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and getattr(dataset, "features", None) is not None:
        names = list(dataset.features)
    return list(names) if names is not None else None


def check_demonstration_column(dataset: Dataset | IterableDataset, column: str) -> None:
    """Raises a `ValueError` naming `column` and listing the dataset's columns when it is missing."""
    names = column_names(dataset)
    if names is None or column in names:  # an IterableDataset without features: checked on the first row
        return
    raise ValueError(
        f"The training dataset has no demonstration column {column!r} (columns present: {names}). HPT pairs each "
        f"prompt with a demonstration: rename your demonstration column to {column!r}, set "
        "`HPTConfig(demonstration_column=...)` to its name, convert a public schema with `trl_hpt.adapters`, or use "
        "`feedback='rl'` to train on prompts alone."
    )


def _is_conversational_prompt(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def demonstration_messages(demonstration: Any) -> list[dict] | None:
    """The demonstration as assistant messages, or `None` when it is missing or empty."""
    if demonstration is None:
        return None
    if isinstance(demonstration, str):
        return [{"role": "assistant", "content": demonstration}] if demonstration.strip() else None
    if isinstance(demonstration, dict):
        demonstration = [demonstration]
    if isinstance(demonstration, list):
        if not demonstration or not all(isinstance(m, dict) and "content" in m for m in demonstration):
            return None if not demonstration else _bad_demonstration(demonstration)
        if not any(str(m.get("content") or "").strip() for m in demonstration):
            return None
        return [
            {"role": m.get("role", "assistant"), **{k: v for k, v in m.items() if k != "role"}} for m in demonstration
        ]
    return _bad_demonstration(demonstration)


def _bad_demonstration(value: Any):
    raise ValueError(
        f"Cannot read a demonstration of type {type(value).__name__}: {str(value)[:120]!r}. A demonstration is a "
        "string, or a list of assistant messages like [{'role': 'assistant', 'content': '...'}]."
    )


def demonstration_text(demonstration: Any) -> str | None:
    """The demonstration as plain text (for string prompts), or `None` when missing or empty."""
    if isinstance(demonstration, str):
        return demonstration if demonstration.strip() else None
    messages = demonstration_messages(demonstration)
    if messages is None:
        return None
    return "".join(str(m["content"]) for m in messages)


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def tokenize_demonstration(
    prompt: Any,
    demonstration: Any,
    processing_class,
    *,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    tools: list | None = None,
) -> list[int] | None:
    """
    The token ids a model would have to generate after `prompt` to produce `demonstration`.

    Conversational rows: the tokens the chat template renders after the generation prompt (end-of-turn included),
    taken as the tail of the tokenised full conversation when the prompt tokens are its prefix (so token boundaries
    match what generation sees); otherwise the rendered text after the prompt, tokenised alone. String rows: the
    completion's tokens followed by EOS. Returns `None` for a missing or empty demonstration.
    """
    chat_template_kwargs = chat_template_kwargs or {}
    tokenizer = _tokenizer_of(processing_class)
    if _is_conversational_prompt(prompt):
        messages = demonstration_messages(demonstration)
        if messages is None:
            return None
        common = {"chat_template": chat_template, "tools": tools or None, **chat_template_kwargs}
        prompt_ids = processing_class.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **common
        )["input_ids"]
        full_ids = processing_class.apply_chat_template(
            prompt + messages, add_generation_prompt=False, tokenize=True, return_dict=True, **common
        )["input_ids"]
        prompt_ids, full_ids = _flat(prompt_ids), _flat(full_ids)
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return full_ids[len(prompt_ids) :]
        prompt_text = processing_class.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=False, **common
        )
        full_text = processing_class.apply_chat_template(prompt + messages, tokenize=False, **common)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "The chat template does not render the prompt (with the generation prompt) as a prefix of the "
                "prompt followed by its demonstration, so the demonstration's tokens after the prompt are undefined. "
                "Use a chat template whose assistant turn extends the generation prompt, or pass string prompts."
            )
        return list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    text = demonstration_text(demonstration)
    if text is None:
        return None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "The tokenizer has no eos_token_id; demonstrations must end with EOS. Set tokenizer.eos_token."
        )
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids


def _flat(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # batched output of one conversation
        ids = ids[0]
    return list(ids)


def prepare_demonstrations(
    dataset: Dataset | IterableDataset,
    processing_class,
    *,
    column: str,
    max_length: int,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    tools: list | None = None,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """
    Adds the tokenised demonstration of every row (`hpt_demo_ids`, `hpt_demo_truncated`, `hpt_has_demo`).

    Runs once, when the trainer is built. Rows whose demonstration is `None` or empty get `hpt_has_demo=False`;
    they are trained by RL only. Demonstrations longer than `max_length` tokens are truncated, with one warning.
    """
    check_demonstration_column(dataset, column)

    def tokenize_row(row):
        if column not in row:
            check_demonstration_column(Dataset.from_list([dict.fromkeys(row)]), column)
        ids = tokenize_demonstration(
            row["prompt"],
            row[column],
            processing_class,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        if ids is None:
            return {DEMO_IDS: [], DEMO_TRUNCATED: False, HAS_DEMO: False}
        return {DEMO_IDS: ids[:max_length], DEMO_TRUNCATED: len(ids) > max_length, HAS_DEMO: True}

    if isinstance(dataset, IterableDataset):
        return dataset.map(tokenize_row)
    prepared = dataset.map(tokenize_row, num_proc=num_proc, desc="Tokenizing demonstrations")
    truncated = sum(prepared[DEMO_TRUNCATED])
    missing = len(prepared) - sum(prepared[HAS_DEMO])
    if truncated:
        logger.warning(
            f"{truncated} of {len(prepared)} demonstrations are longer than max_demonstration_length={max_length} "
            "tokens and were truncated (their end-of-turn token is cut off). Raise max_demonstration_length / "
            "max_completion_length or filter long demonstrations; `hpt/demo_truncated_fraction` tracks this."
        )
    if missing:
        logger.info(f"{missing} of {len(prepared)} rows have no demonstration; their prompts are trained by RL only.")
    return prepared
