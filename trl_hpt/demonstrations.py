"""Demonstration preparation: checks the training set and tokenises each demonstration once.

The training rows users and reward functions see are left exactly as given: the tokenised demonstrations live in a
[`DemonstrationStore`] beside the dataset, looked up by the content of each row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, NamedTuple

import torch
from datasets import Dataset, IterableDataset
from trl.data_utils import is_conversational


logger = logging.getLogger(__name__)


def column_names(dataset: Dataset | IterableDataset) -> list[str] | None:
    """The dataset's columns, or `None` for an `IterableDataset` that does not know them before its first row."""
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
        "`HPTConfig(feedback='rl')` to train on prompts alone (exactly GRPOTrainer)."
    )


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
    """
    The demonstration as plain text (for string prompts), or `None` when missing or empty.

    A list of messages is accepted only when every message is the assistant's (their contents are joined): a user or
    tool message would otherwise end up inside the text the model is trained to produce.
    """
    if isinstance(demonstration, str):
        return demonstration if demonstration.strip() else None
    messages = demonstration_messages(demonstration)
    if messages is None:
        return None
    roles = sorted({str(m.get("role")) for m in messages} - {"assistant"})
    if roles:
        raise ValueError(
            f"A demonstration for a plain-text prompt holds messages with role(s) {roles}; only assistant messages can "
            "be joined into a text completion. Use conversational prompts (lists of messages) for multi-turn "
            "demonstrations, or keep only the assistant's text."
        )
    return "".join(str(m["content"]) for m in messages)


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


class TokenizedDemonstration(NamedTuple):
    """A demonstration's completion tokens and, for multi-turn ones, which of them the model generates."""

    ids: list[int]
    # 0 for tokens of tool messages (environment output, masked like GRPO's tool tokens); None when all are trained.
    tool_mask: list[int] | None = None


def tokenize_demonstration(
    prompt: Any,
    demonstration: Any,
    processing_class,
    *,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    tools: list | None = None,
    eos_token_ids: list[int] | None = None,
) -> TokenizedDemonstration | None:
    """
    The token ids a model would have to generate after `prompt` to produce `demonstration`.

    Conversational rows: the tokens the chat template renders after the generation prompt, up to and including the
    last end-of-turn token (rollouts stop there, so template text after it, such as ChatML's newline, is dropped);
    taken as the tail of the tokenised full conversation when the prompt tokens are its prefix (so token boundaries
    match what generation sees), otherwise the rendered text after the prompt, tokenised alone. Tokens of `tool`
    messages inside a multi-turn demonstration get `tool_mask` 0. String rows: the completion's tokens followed by
    EOS. Returns `None` for a missing or empty demonstration.
    """
    chat_template_kwargs = chat_template_kwargs or {}
    tokenizer = _tokenizer_of(processing_class)
    stops = set(eos_token_ids or []) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    if is_conversational({"prompt": prompt}):
        messages = demonstration_messages(demonstration)
        if messages is None:
            return None
        common = {"chat_template": chat_template, "tools": tools or None, **chat_template_kwargs}

        def render_ids(conversation, add_generation_prompt):
            return _flat(
                processing_class.apply_chat_template(
                    conversation,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=True,
                    return_dict=True,
                    **common,
                )["input_ids"]
            )

        prompt_ids, full_ids = render_ids(prompt, True), render_ids(prompt + messages, False)
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            ids = full_ids[len(prompt_ids) :]
            tool_mask = _tool_mask(prompt, messages, prompt_ids, ids, render_ids)
        else:
            prompt_text = processing_class.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=False, **common
            )
            full_text = processing_class.apply_chat_template(prompt + messages, tokenize=False, **common)
            if not full_text.startswith(prompt_text):
                raise ValueError(
                    "The chat template does not render the prompt (with the generation prompt) as a prefix of the "
                    "prompt followed by its demonstration, so the demonstration's tokens after the prompt are "
                    "undefined. Use a chat template whose assistant turn extends the generation prompt, or pass "
                    "string prompts."
                )
            ids = list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
            tool_mask = None
        last_stop = max((i for i, t in enumerate(ids) if t in stops), default=None)
        if last_stop is not None:
            ids = ids[: last_stop + 1]
            tool_mask = tool_mask[: last_stop + 1] if tool_mask is not None else None
        return TokenizedDemonstration(ids, tool_mask)
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
    return TokenizedDemonstration(ids)


def _tool_mask(prompt, messages, prompt_ids, ids, render_ids) -> list[int] | None:
    """0 on the tokens of each `tool` message (found from the rendered prefixes), or None without tool messages."""
    if not any(m.get("role") == "tool" for m in messages):
        return None
    mask = [1] * len(ids)
    for j, message in enumerate(messages):
        if message.get("role") != "tool":
            continue
        before, through = render_ids(prompt + messages[:j], False), render_ids(prompt + messages[: j + 1], False)
        start, end = len(before) - len(prompt_ids), len(through) - len(prompt_ids)
        # A template that re-renders earlier turns differently gives no token boundaries: train everything.
        if start < 0 or through[: len(before)] != before or through != prompt_ids + ids[:end]:
            logger.warning("The chat template gives no stable boundaries for tool messages; training their tokens.")
            return None
        mask[start:end] = [0] * (end - start)
    return mask


def _flat(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # batched output of one conversation
        ids = ids[0]
    return list(ids)


class Demonstration(NamedTuple):
    """The prepared demonstration of one training row."""

    ids: list[int]  # empty when the row has none
    truncated: bool = False
    tool_mask: list[int] | None = None
    index: int = -1  # the row's position in the training set, -1 when unknown

    @property
    def present(self) -> bool:
        return bool(self.ids)


def row_key(prompt: Any, demonstration: Any) -> bytes:
    """A digest of a row's prompt and demonstration: how a row from the dataloader finds its prepared demonstration."""
    payload = json.dumps([prompt, demonstration], sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).digest()


class DemonstrationStore:
    """
    The tokenised demonstrations of a training set, kept beside it.

    HPTTrainer never adds columns to the training rows: GRPOTrainer's `_prepare_inputs` and every reward function see
    the rows exactly as given. A map-style dataset is tokenised once at construction (with `num_proc` processes) into
    an Arrow table, looked up by [`row_key`]; rows the store has not seen (an `IterableDataset`, a dataset changed
    after construction) are tokenised the first time they appear and cached.

    Args:
        processing_class: the trainer's tokenizer or processor.
        column (`str`): the demonstration column.
        max_length (`int`): demonstrations longer than this many tokens are truncated.
        chat_template, chat_template_kwargs, tools: as generation renders prompts.
        eos_token_ids (`list[int]`, *optional*): the tokens that end a rollout.
    """

    def __init__(
        self,
        processing_class,
        *,
        column: str,
        max_length: int,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        tools: list | None = None,
        eos_token_ids: list[int] | None = None,
    ):
        self.processing_class = processing_class
        self.column = column
        self.max_length = max_length
        self._render = {
            "chat_template": chat_template,
            "chat_template_kwargs": chat_template_kwargs,
            "tools": tools,
            "eos_token_ids": eos_token_ids,
        }
        self._table: Dataset | None = None
        self._positions: dict[bytes, int] = {}
        self._cache: dict[bytes, Demonstration] = {}

    @classmethod
    def for_trainer(cls, trainer) -> DemonstrationStore:
        """
        The store of an `HPTTrainer`: demonstrations rendered with the processing class, chat template and tools its
        generation uses, cut at `max_demonstration_length` (else `max_completion_length`), the training set prepared.
        """
        args = trainer.args
        store = cls(
            trainer.processing_class,
            column=args.demonstration_column,
            max_length=args.max_demonstration_length or args.max_completion_length,
            chat_template=trainer.chat_template,
            chat_template_kwargs=trainer.chat_template_kwargs,
            tools=trainer.tools,
            eos_token_ids=list(trainer.eos_token_ids),
        )
        if trainer.train_dataset is not None:
            store.add_dataset(trainer.train_dataset, num_proc=getattr(args, "dataset_num_proc", None))
            if store.num_present == 0:
                raise ValueError(
                    f"Every demonstration in column {args.demonstration_column!r} is missing or empty, so "
                    f"feedback={args.feedback!r} could never send a prompt to SFT and this run would be plain GRPO. "
                    "Fill the column, point HPTConfig.demonstration_column at the right one, or use "
                    "HPTConfig(feedback='rl') for GRPO."
                )
        return store

    def _prepare(self, prompt: Any, demonstration: Any, index: int = -1) -> Demonstration:
        try:
            tokenized = tokenize_demonstration(prompt, demonstration, self.processing_class, **self._render)
        except ValueError as error:
            where = f"row {index}" if index >= 0 else "a row"
            raise ValueError(f"Demonstration column {self.column!r}, {where}: {error}") from None
        if tokenized is None:
            return Demonstration([], index=index)
        ids, mask = tokenized
        truncated = len(ids) > self.max_length
        mask = mask[: self.max_length] if mask is not None else None
        return Demonstration(ids[: self.max_length], truncated, mask, index)

    def add_dataset(self, dataset: Dataset | IterableDataset, num_proc: int | None = None) -> None:
        """Tokenises every demonstration of a map-style dataset (an `IterableDataset` is prepared lazily)."""
        check_demonstration_column(dataset, self.column)
        if isinstance(dataset, IterableDataset):
            return

        def prepare_row(row, index):
            demo = self._prepare(row["prompt"], row[self.column], index)
            return {
                "key": row_key(row["prompt"], row[self.column]),
                "ids": demo.ids,
                "present": demo.present,
                "truncated": demo.truncated,
                "tool_mask": demo.tool_mask,
            }

        self._table = dataset.map(
            prepare_row,
            with_indices=True,
            remove_columns=dataset.column_names,
            num_proc=num_proc,
            desc="Tokenizing demonstrations",
        )
        self._positions = {}
        for position, key in enumerate(self._table["key"]):
            self._positions.setdefault(key, position)
        total = len(self._table)
        truncated = sum(self._table["truncated"])
        # Counted from a flag column: reading the token ids back would load every demonstration into Python lists.
        missing = total - self.num_present
        if truncated:
            logger.warning(
                f"{truncated} of {total} demonstrations are longer than max_demonstration_length={self.max_length} "
                "tokens and were truncated (their end-of-turn token is cut off). Raise max_demonstration_length / "
                "max_completion_length or filter long demonstrations; `hpt/demo_truncated_fraction` tracks this."
            )
        if missing:
            logger.info(f"{missing} of {total} rows have no demonstration; their prompts are trained by RL only.")

    @property
    def num_present(self) -> int | None:
        """How many rows of the prepared dataset have a demonstration (None for an iterable dataset)."""
        if self._table is None:
            return None
        return sum(self._table["present"])

    def lookup(self, row: dict) -> Demonstration:
        """The prepared demonstration of a training row."""
        if self.column not in row:
            raise ValueError(
                f"A training row has no demonstration column {self.column!r} (columns present: {sorted(row)}). Set "
                "`HPTConfig(demonstration_column=...)` or use `HPTConfig(feedback='rl')` to train on prompts alone."
            )
        key = row_key(row["prompt"], row[self.column])
        position = self._positions.get(key)
        if position is not None:
            record = self._table[position]
            return Demonstration(record["ids"], record["truncated"], record["tool_mask"], position)
        if key not in self._cache:
            self._cache[key] = self._prepare(row["prompt"], row[self.column])
        return self._cache[key]


def demonstration_flags(
    demos: list[Demonstration] | None, num_rows: int, drop_truncated: bool, device=None
) -> torch.Tensor:
    """
    `(num_rows, 2)` booleans per row: whether its demonstration can be trained on (present, and not truncated when
    truncated completions are dropped, as a truncated rollout would be), and whether it was truncated. All False
    without demonstrations (`demos=None`).
    """
    if demos is None:
        return torch.zeros(num_rows, 2, dtype=torch.bool, device=device)
    usable = [d.present and not (drop_truncated and d.truncated) for d in demos]
    return torch.tensor([[u, d.truncated] for u, d in zip(usable, demos)], dtype=torch.bool, device=device)


def demonstration_completion(prompt: Any, demonstration: Any) -> list[dict] | str:
    """
    A demonstration as the completion a reward function receives: messages after a conversational prompt, text
    otherwise (decided on the prompt alone, as `GRPOTrainer` decides it for rollouts).
    """
    if is_conversational({"prompt": prompt}):
        return demonstration_messages(demonstration) or []
    return demonstration_text(demonstration) or ""
