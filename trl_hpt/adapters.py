"""Dataset adapters: public math-RL schemas (LUFFY / OpenR1, verl, MATH-style problem/solution) mapped to the
prompt-completion rows [`HPTTrainer`] reads: `prompt`, the demonstration in `completion` (`None` when the prompt has
none: it then trains by RL only) and the gold answer in `solution`, which the math reward reads. Every other column
is kept and reaches the reward functions as a keyword argument.

Files and splits are found and read by `datasets`; the adapters are `datasets.map` functions. The adapters, their
options and the detection rules are described in the documentation's Data page.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl_hpt.rewards import BOXED_INSTRUCTION, extract_boxed


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


__all__ = [
    "ADAPTERS",
    "BOXED_INSTRUCTION",
    "DEFAULT_VERL_DEMONSTRATION_KEYS",
    "DatasetAdapter",
    "adapt_dataset",
    "detect_adapter",
    "load_hpt_dataset",
]

DEFAULT_VERL_DEMONSTRATION_KEYS = ("target", "response", "extra_info.answer", "extra_info.solution")
"""Where the `verl` adapter looks for a demonstration, in order; dotted keys go into struct columns.

verl's own preprocessors keep the worked solution, when they keep one, in `extra_info`: its GSM8K script stores the
full reference answer (reasoning, then `#### <number>`) in `extra_info["answer"]`, which verl's SFT examples train on.
A candidate equal to the gold answer is skipped: a bare final answer is not a demonstration.
"""

# The columns HPTTrainer reads; adapters write exactly these.
_OUTPUT_COLUMNS = ("prompt", "completion", "solution")

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------------------------------------------------------------
# Row helpers
# ---------------------------------------------------------------------------------------------------------------------


def _where(index: int | None) -> str:
    return "a row" if index is None else f"row {index}"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0)


def _lookup(example: Mapping[str, Any], key: str) -> Any:
    """Reads `key` from `example`, following dots into struct (dict) columns; missing parts give `None`."""
    value: Any = example
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _as_gold(value: Any) -> Any:
    # Arrow needs one type per column, and reward functions compare text, so scalar answers become strings.
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _check_messages(value: Any, column: str, index: int | None) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{_where(index)}: column `{column}` must be a non-empty list of chat messages "
            f"({{'role': ..., 'content': ...}}) or a string, got {_short(value)}."
        )
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"{_where(index)}: column `{column}`, message {position} is not a chat message with `role` and "
                f"`content`: {_short(message)}."
            )
        messages.append(dict(message))
    return messages


def _adapt_prompt(
    value: Any, column: str, index: int | None, drop_system_prompt: bool, system_prompt: str | None
) -> str | list[dict[str, Any]]:
    if drop_system_prompt and system_prompt is not None:
        raise ValueError("Pass either `drop_system_prompt=True` or `system_prompt=...`, not both.")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{_where(index)}: column `{column}` is an empty string.")
        if system_prompt is not None:
            raise ValueError(
                f"{_where(index)}: `system_prompt` needs a conversational prompt, but column `{column}` is a string."
            )
        return value
    messages = _check_messages(value, column, index)
    if drop_system_prompt or system_prompt is not None:
        messages = [message for message in messages if message["role"] != "system"]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not messages:
        raise ValueError(f"{_where(index)}: column `{column}` has no message left after removing the system prompt.")
    return messages


def _as_completion(text: str | None, conversational: bool) -> str | list[dict[str, str]] | None:
    if text is None or not text.strip():
        return None
    return [{"role": "assistant", "content": text}] if conversational else text


def _demonstration_text(value: Any, column: str, index: int | None, allow_string: bool) -> str | None:
    """The text of a demonstration given as a string or as a list with one assistant message; `None` if empty."""
    if _is_empty(value):
        return None
    if isinstance(value, str) and allow_string:
        return value
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], Mapping)
        and value[0].get("role") == "assistant"
        and (value[0].get("content") is None or isinstance(value[0].get("content"), str))
    ):
        return value[0].get("content")
    expected = "a string or a list" if allow_string else "a list"
    raise ValueError(
        f"{_where(index)}: column `{column}` must be {expected} with exactly one assistant message "
        f"[{{'role': 'assistant', 'content': '...'}}] (or None/empty for a prompt without demonstration), "
        f"got {_short(value)}. Fix or filter this row, or pick another adapter."
    )


def _ground_truth(example: Mapping[str, Any], index: int | None) -> Any:
    reward_model = example.get("reward_model")
    if not isinstance(reward_model, Mapping):
        raise ValueError(
            f"{_where(index)}: column `reward_model` must be a dict with a `ground_truth` key (verl/LUFFY schema), "
            f"got {_short(reward_model)}."
        )
    gold = reward_model.get("ground_truth")
    if _is_empty(gold):
        raise ValueError(
            f"{_where(index)}: column `reward_model` has no `ground_truth`, so the rollouts of this prompt cannot be "
            "verified. Fix or filter this row."
        )
    return _as_gold(gold)


# ---------------------------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------------------------


def _luffy(
    example: Mapping[str, Any],
    index: int | None = None,
    *,
    drop_system_prompt: bool = False,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    prompt = _adapt_prompt(example.get("prompt"), "prompt", index, drop_system_prompt, system_prompt)
    text = _demonstration_text(example.get("target"), "target", index, allow_string=False)
    return {
        "prompt": prompt,
        "completion": _as_completion(text, isinstance(prompt, list)),
        "solution": _ground_truth(example, index),
    }


def _verl(
    example: Mapping[str, Any],
    index: int | None = None,
    *,
    drop_system_prompt: bool = False,
    system_prompt: str | None = None,
    demonstration_keys: str | Sequence[str] | None = DEFAULT_VERL_DEMONSTRATION_KEYS,
) -> dict[str, Any]:
    prompt = _adapt_prompt(example.get("prompt"), "prompt", index, drop_system_prompt, system_prompt)
    gold = _ground_truth(example, index)
    text = None
    for key in _as_keys(demonstration_keys):
        value = _lookup(example, key)
        if isinstance(value, (int, float)):
            continue  # a numeric final answer (some verl sets keep one in `extra_info.answer`), not a demonstration
        candidate = _demonstration_text(value, key, index, allow_string=True)
        if candidate is None or not candidate.strip():
            continue
        if isinstance(gold, str) and candidate.strip() == gold.strip():
            continue  # a bare final answer, not a worked demonstration
        text = candidate
        break
    return {"prompt": prompt, "completion": _as_completion(text, isinstance(prompt, list)), "solution": gold}


def _problem_solution(
    example: Mapping[str, Any],
    index: int | None = None,
    *,
    conversational: bool = False,
    instruction: str | None = None,
    instruction_separator: str = " ",
    system_prompt: str | None = None,
    problem_key: str = "problem",
    solution_key: str = "solution",
    answer_key: str = "answer",
    missing_answer: str = "error",
) -> dict[str, Any]:
    if missing_answer not in ("error", "none"):
        raise ValueError(f"`missing_answer` must be 'error' or 'none', got {missing_answer!r}.")
    problem = example.get(problem_key)
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{_where(index)}: column `{problem_key}` must be a non-empty string, got {_short(problem)}.")
    text = problem if instruction is None else f"{problem}{instruction_separator}{instruction}"
    if conversational:
        prompt: Any = [{"role": "user", "content": text}]
        if system_prompt is not None:
            prompt.insert(0, {"role": "system", "content": system_prompt})
    elif system_prompt is not None:
        raise ValueError("`system_prompt` needs `conversational=True`: a string prompt has no system message.")
    else:
        prompt = text

    demonstration = example.get(solution_key)
    if demonstration is not None and not isinstance(demonstration, str):
        raise ValueError(
            f"{_where(index)}: column `{solution_key}` must be the worked solution as a string (or None), "
            f"got {_short(demonstration)}."
        )
    gold = _as_gold(example.get(answer_key))
    if _is_empty(gold) or (isinstance(gold, str) and not gold.strip()):
        gold = extract_boxed(demonstration)
    if gold is None and missing_answer == "error":
        raise ValueError(
            f"{_where(index)}: no gold answer: column `{answer_key}` is missing or empty and column `{solution_key}` "
            "has no \\boxed{...} to take it from. Filter this row, set `answer_key` to the column holding the "
            "answer, or pass missing_answer='none' to keep it with solution=None (its rollouts then cannot be "
            "verified)."
        )
    return {"prompt": prompt, "completion": _as_completion(demonstration, conversational), "solution": gold}


def _identity(example: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
    return {}


def _as_keys(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    if keys is None:
        return ()
    return (keys,) if isinstance(keys, str) else tuple(keys)


# Which source columns each adapter consumes (removed after mapping), given the dataset's columns and the options.
def _verl_consumes(columns: Sequence[str], options: Mapping[str, Any]) -> tuple[str, ...]:
    keys = _as_keys(options.get("demonstration_keys", DEFAULT_VERL_DEMONSTRATION_KEYS))
    return ("reward_model", *(key for key in keys if "." not in key and key in columns))


# Output features, so that Arrow knows the column types up front: without them, a first write batch whose
# completions are all None (RL-only prompts) would fix the `completion` type to null.
def _text_or_messages(conversational: bool) -> Any:
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")}) if conversational else Value("string")


def _gold_feature(feature: Any) -> Any:
    from datasets import Value

    return Value("string") if isinstance(feature, Value) else feature  # scalars are written as strings by `_as_gold`


def _messages_features(features: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any] | None:
    from datasets import LargeList, List

    prompt, reward_model = features.get("prompt"), features.get("reward_model")
    if prompt is None or not isinstance(reward_model, Mapping):
        return None
    conversational = isinstance(prompt, (list, List, LargeList))
    if options.get("system_prompt") is not None and not conversational:
        return None  # the adapter raises the real error on the first row
    gold = _gold_feature(reward_model.get("ground_truth"))
    if gold is None:
        return None
    return {"prompt": prompt, "completion": _text_or_messages(conversational), "solution": gold}


def _problem_solution_features(features: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    from datasets import Value

    text = _text_or_messages(options.get("conversational", False))
    answer = features.get(options.get("answer_key", "answer"))
    # Without an answer column every gold answer is extracted from a string, so it is a string too.
    return {
        "prompt": text,
        "completion": text,
        "solution": Value("string") if answer is None else _gold_feature(answer),
    }


@dataclass(frozen=True)
class DatasetAdapter:
    r"""
    A named mapping from one public dataset schema to HPT's prompt-completion rows.

    Calling the adapter maps one example: `ADAPTERS["luffy"](example)` returns the new `prompt`, `completion` and
    `solution` values. [`adapt_dataset`] applies it to a whole dataset.

    Args:
        name (`str`):
            Registry name.
        function (`Callable`):
            `function(example, index, **options) -> dict`, the columns to write for one row. `index` is only used in
            error messages.
        description (`str`):
            One line on the source schema.
        consumes (`Callable`, *optional*):
            `consumes(column_names, options) -> tuple[str, ...]`: source columns whose content the adapter moves into
            the output columns. They are removed from the adapted dataset.
        features (`Callable`, *optional*):
            `features(input_features, options) -> dict | None`: the `datasets` features of the output columns, or
            `None` when they cannot be told from the input features.
        requires (`Callable`, *optional*):
            `requires(options) -> tuple[str, ...]`: columns the source schema must have. [`adapt_dataset`] checks
            them before mapping, so a dataset of another schema fails at once with its columns listed and an
            adapter that fits suggested, rather than on its first row.
    """

    name: str
    function: Callable[..., dict[str, Any]]
    description: str
    consumes: Callable[[Sequence[str], Mapping[str, Any]], tuple[str, ...]] | None = None
    features: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any] | None] | None = None
    requires: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None

    def __call__(self, example: Mapping[str, Any], index: int | None = None, **options: Any) -> dict[str, Any]:
        return self.function(example, index, **options)


_LUFFY = DatasetAdapter(
    name="luffy",
    function=_luffy,
    description="LUFFY / OpenR1-Math-46k-8192: `prompt` messages, `target` [assistant message], "
    "`reward_model.ground_truth`.",
    consumes=lambda columns, options: ("target", "reward_model"),
    features=_messages_features,
    # `target` too: without it every row would silently lose its demonstration (`verl` is the prompt-only schema).
    requires=lambda options: ("prompt", "target", "reward_model"),
)
_VERL = DatasetAdapter(
    name="verl",
    function=_verl,
    description="verl RL parquet: `prompt` messages, `reward_model.ground_truth`, demonstration (if any) in "
    "`target`, `response` or `extra_info.answer`.",
    consumes=_verl_consumes,
    features=_messages_features,
    requires=lambda options: ("prompt", "reward_model"),
)
_PROBLEM_SOLUTION = DatasetAdapter(
    name="problem_solution",
    function=_problem_solution,
    description="MATH / NuminaMath style: `problem`, worked `solution`, optional `answer` (else last \\boxed{}).",
    consumes=lambda columns, options: tuple(
        options.get(f"{name}_key", name) for name in ("problem", "solution", "answer")
    ),
    features=_problem_solution_features,
    requires=lambda options: (options.get("problem_key", "problem"),),
)
_IDENTITY = DatasetAdapter(
    name="identity",
    function=_identity,
    description="Already prompt-completion (`prompt`, optional `completion`): rows are left unchanged.",
)

ADAPTERS: dict[str, DatasetAdapter] = {
    "luffy": _LUFFY,
    "openr1": _LUFFY,
    "verl": _VERL,
    "problem_solution": _PROBLEM_SOLUTION,
    "identity": _IDENTITY,
    "none": _IDENTITY,
}
"""Adapters by name. `openr1` is an alias of `luffy`, `none` of `identity`."""


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


def detect_adapter(column_names: Sequence[str]) -> str:
    """
    Names the adapter for a dataset from its columns.

    The rules, first match wins: `target` and `reward_model` give `luffy`; `problem` and `solution` give
    `problem_solution`; `prompt` and `completion` give `identity`; `prompt` and `reward_model` give `verl`; `prompt`
    alone gives `identity` (a prompt-only dataset, trained by RL only).

    Args:
        column_names (`Sequence[str]`):
            The dataset's columns.

    Returns:
        `str`: A key of [`ADAPTERS`].

    Raises:
        `ValueError`: When no rule matches; the message lists the columns and the adapters.
    """
    columns = set(column_names)
    if {"target", "reward_model"} <= columns:
        return "luffy"
    if {"problem", "solution"} <= columns:
        return "problem_solution"
    if {"prompt", "completion"} <= columns:
        return "identity"
    if {"prompt", "reward_model"} <= columns:
        return "verl"
    if "prompt" in columns:
        return "identity"
    raise ValueError(
        f"Cannot tell the dataset schema from its columns {sorted(columns)}. Pass `adapter=` one of "
        f"{sorted(set(ADAPTERS))} or a callable `example -> dict` that returns at least `prompt` (and the "
        "demonstration in `completion`). Expected columns: luffy: prompt, target, reward_model; verl: prompt, "
        "reward_model; problem_solution: problem, solution[, answer]; identity: prompt[, completion]."
    )


def adapt_dataset(
    dataset: Dataset | IterableDataset,
    adapter: str | DatasetAdapter | Callable[..., dict[str, Any]] | None = None,
    *,
    drop_columns: bool | Sequence[str] = False,
    num_proc: int | None = None,
    **options: Any,
) -> Dataset | IterableDataset:
    r"""
    Maps a dataset in a public schema to HPT's prompt-completion rows.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The dataset to adapt.
        adapter (`str`, [`DatasetAdapter`] or callable, *optional*):
            A key of [`ADAPTERS`] (`"luffy"`, `"openr1"`, `"verl"`, `"problem_solution"`, `"identity"`, `"none"`),
            an adapter, or a callable `example -> dict` whose result updates each row (as in `datasets.map`).
            `None` detects the adapter from the columns (see [`detect_adapter`]).
        drop_columns (`bool` or `Sequence[str]`, *optional*, defaults to `False`):
            `False` keeps every column the adapter did not consume; `True` keeps only `prompt`, `completion` and
            `solution`; a list of names drops those columns as well.
        num_proc (`int`, *optional*):
            Processes for `Dataset.map` (ignored for an `IterableDataset`).
        **options:
            Adapter options:

            - `luffy`: `drop_system_prompt=False`; `system_prompt=None` (replaces the system message, or adds one).
            - `verl`: the same, and `demonstration_keys=DEFAULT_VERL_DEMONSTRATION_KEYS` (column names, dotted
              for fields of struct columns, e.g. `"extra_info.answer"`; `None`: no demonstrations).
            - `problem_solution`: `conversational=False`; `instruction=None` (e.g. [`BOXED_INSTRUCTION`]),
              appended to the problem after `instruction_separator=" "`; `system_prompt=None` (conversational only);
              `problem_key="problem"`, `solution_key="solution"`, `answer_key="answer"`; `missing_answer="error"`
              (or `"none"`: keep rows without a gold answer with `solution=None`).
            - a callable: passed as keyword arguments.

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`: The adapted dataset, of the same kind as `dataset`.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_hpt.adapters import BOXED_INSTRUCTION, adapt_dataset
    >>> dataset = Dataset.from_list([{"problem": "1+1?", "solution": "It is \\boxed{2}."}])
    >>> adapt_dataset(dataset, "problem_solution", instruction=BOXED_INSTRUCTION)[0]["solution"]
    '2'
    ```
    """
    from datasets import Dataset, Features

    from trl_hpt.demonstrations import column_names

    columns = column_names(dataset)
    if columns is None:  # a streamed dataset may not know its columns before the first row
        columns = list(next(iter(dataset)))
    if adapter is None:
        adapter = detect_adapter(columns)
    if isinstance(adapter, str):
        if adapter not in ADAPTERS:
            raise ValueError(f"Unknown adapter {adapter!r}. Available: {sorted(ADAPTERS)}, or pass a callable.")
        adapter = ADAPTERS[adapter]

    if isinstance(adapter, DatasetAdapter):
        _check_options(adapter, options)
        _check_required_columns(adapter, columns, options)
        consumed = adapter.consumes(columns, options) if adapter.consumes is not None else ()
        function = partial(adapter.function, **options)
        with_indices = True
        output_features = None
        if adapter.features is not None and dataset.features is not None:
            output_features = adapter.features(dataset.features, options)
    elif callable(adapter):
        consumed = ()
        function = partial(adapter, **options) if options else adapter
        with_indices = False
        output_features = None
    else:
        raise TypeError(f"`adapter` must be a name, a DatasetAdapter or a callable, got {type(adapter).__name__}.")

    if drop_columns is True:
        dropped = [column for column in columns if column not in _OUTPUT_COLUMNS]
    elif drop_columns is False:
        dropped = []
    else:
        dropped = list(drop_columns)
        unknown = sorted(set(dropped) - set(columns))
        if unknown:
            raise ValueError(f"`drop_columns` names columns the dataset does not have: {unknown}. Columns: {columns}.")
    # Columns the adapter writes are overwritten rather than removed.
    remove = [column for column in columns if column in {*consumed, *dropped} and column not in _OUTPUT_COLUMNS]
    if isinstance(adapter, DatasetAdapter) and adapter.function is _identity:
        adapted = dataset.remove_columns(remove) if remove else dataset
        adapted = _text_columns_as_strings(adapted)
    else:
        features = None
        if output_features is not None:
            kept = {name: feature for name, feature in dataset.features.items() if name not in remove}
            features = Features({**kept, **output_features})
        map_kwargs: dict[str, Any] = {"with_indices": with_indices, "remove_columns": remove, "features": features}
        if isinstance(dataset, Dataset):
            map_kwargs["num_proc"] = num_proc
            map_kwargs["desc"] = f"Adapting dataset ({getattr(adapter, 'name', 'custom')})"
        adapted = dataset.map(function, **map_kwargs)

    if drop_columns is True and adapted.column_names is not None:
        extra = [column for column in adapted.column_names if column not in _OUTPUT_COLUMNS]
        if extra:  # columns a custom callable added
            adapted = adapted.remove_columns(extra)
    if adapted.column_names is not None and "prompt" not in adapted.column_names:
        raise ValueError(
            f"The adapted dataset has no `prompt` column (columns: {adapted.column_names}). HPTTrainer needs "
            "`prompt`; pick another adapter or return `prompt` from your callable."
        )
    return adapted


def _text_columns_as_strings(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    # CSV and JSON loaders infer numbers (`solution` = 42); the trainer and the reward functions expect text.
    from datasets import Value

    if dataset.features is None:
        return dataset
    for column in _OUTPUT_COLUMNS:
        feature = dataset.features.get(column)
        if isinstance(feature, Value) and feature.dtype not in ("string", "large_string"):
            dataset = dataset.cast_column(column, Value("string"))
    return dataset


def _check_options(adapter: DatasetAdapter, options: Mapping[str, Any]) -> None:
    # Checked once here, so that a typo fails before the map rather than as a TypeError on the first row.
    parameters = list(inspect.signature(adapter.function).parameters)[2:]
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        accepted = ", ".join(parameters) if parameters else "none"
        raise ValueError(f"Unknown option(s) {unknown} for adapter {adapter.name!r}; it accepts: {accepted}.")
    if options.get("drop_system_prompt") and options.get("system_prompt") is not None:
        raise ValueError("Pass either `drop_system_prompt=True` or `system_prompt=...`, not both.")


def _check_required_columns(adapter: DatasetAdapter, columns: Sequence[str], options: Mapping[str, Any]) -> None:
    if adapter.requires is None:
        return
    required = adapter.requires(options)
    missing = [column for column in required if column not in columns]
    if not missing:
        return
    try:
        detected = detect_adapter(columns)
    except ValueError:
        detected = None
    if detected is not None and ADAPTERS[detected] is not adapter:
        suggestion = (
            f"They look like the {detected!r} schema: pass adapter={detected!r} (or adapter=None to detect it)."
        )
    else:
        suggestion = (
            f"Pick the adapter of your schema among {sorted(set(ADAPTERS))} (adapter=None detects it), or pass a "
            "callable `example -> dict` that returns `prompt` (and the demonstration in `completion`)."
        )
    schema = adapter.description.rstrip(".")
    raise ValueError(
        f"Adapter {adapter.name!r} ({schema}) needs the column(s) {missing}, which the dataset does not have; its "
        f"columns are {sorted(columns)}. {suggestion}"
    )


def _local_data_files(path: Path, split: str) -> tuple[str, list[str]]:
    """
    The `datasets` builder name and the files of `split` for a local file or directory. A directory's files are sorted
    into splits by `datasets.data_files`, as `load_dataset` sorts a directory or a Hub repository.
    """
    from datasets.data_files import DEFAULT_PATTERNS_ALL, DataFilesDict, EmptyDatasetError, get_data_patterns

    base_split = split.split("[")[0]
    if path.is_file():
        if path.suffix.lower() not in _LOCAL_FORMATS:
            raise ValueError(f"Unsupported file type {path.suffix!r} for {path}; use one of {sorted(_LOCAL_FORMATS)}.")
        return _LOCAL_FORMATS[path.suffix.lower()], [str(path)]

    try:
        patterns = get_data_patterns(str(path))
        found = DataFilesDict.from_patterns(patterns, base_path=str(path), allowed_extensions=list(_LOCAL_FORMATS))
    except EmptyDatasetError:
        patterns, found = {}, {}
    by_split = {str(name): list(files) for name, files in found.items() if files}
    if not by_split:
        raise FileNotFoundError(f"No data file ({', '.join(sorted(_LOCAL_FORMATS))}) under {path}.")
    if base_split not in by_split:
        if patterns == DEFAULT_PATTERNS_ALL:
            raise ValueError(
                f"No file for split {base_split!r} under {path}: no file name names a split, so all files are the "
                "'train' split. Pass split='train' or point to the file."
            )
        raise ValueError(
            f"No file for split {base_split!r} under {path}; the file names give the splits {sorted(by_split)}."
        )
    files = by_split[base_split]
    builders = {_LOCAL_FORMATS[Path(file).suffix.lower()] for file in files}
    if len(builders) > 1:
        raise ValueError(
            f"{path} mixes data formats ({sorted(builders)}); point to one file, or keep one format per directory."
        )
    return builders.pop(), files


def load_hpt_dataset(
    name_or_path: str | Path,
    split: str = "train",
    adapter: str | DatasetAdapter | Callable[..., dict[str, Any]] | None = None,
    *,
    subset: str | None = None,
    streaming: bool = False,
    load_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> Dataset | IterableDataset:
    r"""
    Loads a dataset and adapts it to HPT's prompt-completion rows.

    Args:
        name_or_path (`str` or `Path`):
            A local `.json`, `.jsonl`, `.parquet` or `.csv` file; a directory of such files (sorted into splits as
            `datasets.load_dataset` sorts a directory: by the split names in file or folder names, such as
            `train.parquet` or `data/test-00000-of-00001.jsonl`, otherwise every file is the `train` split); a
            directory written by `Dataset.save_to_disk` /
            `DatasetDict.save_to_disk`; or a dataset name on the Hugging Face Hub, such as
            `"Elliott/Openr1-Math-46k-8192"`.
        split (`str`, *optional*, defaults to `"train"`):
            The split, with `datasets` slicing if wanted (`"train[:1000]"`).
        adapter (`str`, [`DatasetAdapter`] or callable, *optional*):
            See [`adapt_dataset`]; `None` detects the schema from the columns.
        subset (`str`, *optional*):
            Hub configuration name (the `name` argument of `datasets.load_dataset`).
        streaming (`bool`, *optional*, defaults to `False`):
            Return an `IterableDataset` that reads the data lazily.
        load_kwargs (`Mapping[str, Any]`, *optional*):
            Further keyword arguments for `datasets.load_dataset` (e.g. `revision`, `cache_dir`).
        **options:
            Options of [`adapt_dataset`] and of the adapter (`drop_columns`, `num_proc`, `system_prompt`, ...).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`: The adapted split.

    Example:

    ```python
    >>> from trl_hpt.adapters import load_hpt_dataset
    >>> dataset = load_hpt_dataset("Elliott/Openr1-Math-46k-8192")  # LUFFY schema, detected
    >>> sorted(dataset.column_names)
    ['ability', 'completion', 'data_source', 'extra_info', 'prompt', 'solution']
    ```
    """
    import datasets

    load_kwargs = dict(load_kwargs or {})
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            dataset = _load_saved(path, split)
            if streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            builder, files = _local_data_files(path, split)
            dataset = datasets.load_dataset(
                builder, data_files={split.split("[")[0]: files}, split=split, streaming=streaming, **load_kwargs
            )
    elif path.suffix.lower() in _LOCAL_FORMATS:
        # Looks like a file, so a typo should not turn into a Hub request.
        raise FileNotFoundError(f"No such data file: {path}.")
    else:
        dataset = datasets.load_dataset(str(name_or_path), subset, split=split, streaming=streaming, **load_kwargs)
    return adapt_dataset(dataset, adapter, **options)


def _load_saved(path: Path, split: str) -> Dataset:
    """Loads a split from a `save_to_disk` directory, applying `[start:stop]` slicing as `load_dataset` would."""
    from datasets import ReadInstruction, load_from_disk

    base_split = split.split("[")[0]
    loaded = load_from_disk(str(path))
    if (path / "dataset_dict.json").is_file():
        if base_split not in loaded:
            raise ValueError(f"No split {base_split!r} in {path}; it has {sorted(loaded)}.")
        loaded = loaded[base_split]
    if "[" not in split:
        return loaded
    # A single saved Dataset has no split name of its own, so the slice applies to it whatever the name.
    instruction = ReadInstruction.from_spec(split).to_absolute({base_split: len(loaded)})[0]
    return loaded.select(range(instruction.from_, instruction.to))
