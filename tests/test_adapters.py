"""Tests for `trl_hpt.adapters`: public schemas -> HPT prompt-completion rows, loaded from local files only."""

import json

import datasets
import pytest

from trl_hpt.adapters import (
    ADAPTERS,
    BOXED_INSTRUCTION,
    DatasetAdapter,
    adapt_dataset,
    detect_adapter,
    load_hpt_dataset,
)
from trl_hpt.rewards import extract_boxed


SYSTEM = "A conversation between User and Assistant. The assistant first thinks, then answers."


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    # Nothing here may touch the Hub, and the datasets cache must not outlive the test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _luffy_row(index, question, demonstration, answer, source="olympiads"):
    return {
        "data_source": source,
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "target": demonstration if demonstration is None else [{"role": "assistant", "content": demonstration}],
        "ability": "math",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index, "split": "default"},
    }


LUFFY_ROWS = [
    _luffy_row(0, "What is 1+1?", "<think>1+1=2</think> The answer is \\boxed{2}.", "2"),
    _luffy_row(1, "Simplify 2/4.", "<think>Halve both.</think> \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "cn_k12"),
    _luffy_row(2, "What is 3*3?", None, "9", "amc_aime"),
]


def _expected_luffy(row, prompt=None):
    demonstration = row["target"]
    return {
        "data_source": row["data_source"],
        "prompt": prompt if prompt is not None else row["prompt"],
        "ability": "math",
        "extra_info": row["extra_info"],
        "completion": None if demonstration is None else [dict(demonstration[0])],
        "solution": row["reward_model"]["ground_truth"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# LUFFY / OpenR1-Math-46k-8192
# ---------------------------------------------------------------------------------------------------------------------


def test_luffy_parquet_autodetected(tmp_path):
    path = _write_parquet(tmp_path / "openr1.parquet", LUFFY_ROWS)
    dataset = load_hpt_dataset(str(path))

    assert isinstance(dataset, datasets.Dataset)
    assert sorted(dataset.column_names) == ["ability", "completion", "data_source", "extra_info", "prompt", "solution"]
    assert dataset.to_list() == [_expected_luffy(row) for row in LUFFY_ROWS]


def test_luffy_jsonl_alias_and_system_prompt_options(tmp_path):
    path = _write_jsonl(tmp_path / "openr1.jsonl", LUFFY_ROWS)

    dropped = load_hpt_dataset(path, adapter="openr1", drop_system_prompt=True)
    assert dropped.to_list() == [_expected_luffy(row, prompt=row["prompt"][1:]) for row in LUFFY_ROWS]

    replaced = load_hpt_dataset(path, adapter="luffy", system_prompt="Reason, then answer.")
    assert replaced[0]["prompt"] == [
        {"role": "system", "content": "Reason, then answer."},
        {"role": "user", "content": "What is 1+1?"},
    ]

    with pytest.raises(ValueError, match="not both"):
        load_hpt_dataset(path, adapter="luffy", system_prompt="x", drop_system_prompt=True)


def test_luffy_drop_columns(tmp_path):
    path = _write_parquet(tmp_path / "openr1.parquet", LUFFY_ROWS)
    only_hpt = load_hpt_dataset(path, drop_columns=True)
    assert sorted(only_hpt.column_names) == ["completion", "prompt", "solution"]

    some = load_hpt_dataset(path, drop_columns=["extra_info"])
    assert sorted(some.column_names) == ["ability", "completion", "data_source", "prompt", "solution"]

    with pytest.raises(ValueError, match="reward_modle"):
        load_hpt_dataset(path, drop_columns=["reward_modle"])


@pytest.mark.parametrize(
    "bad_target, fragment",
    [
        ([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "exactly one assistant"),
        ([{"role": "user", "content": "a"}], "exactly one assistant"),
    ],
)
def test_luffy_bad_target_names_column_and_row(tmp_path, bad_target, fragment):
    path = _write_parquet(tmp_path / "bad.parquet", [LUFFY_ROWS[0], {**LUFFY_ROWS[1], "target": bad_target}])
    with pytest.raises(ValueError, match=fragment) as error:
        load_hpt_dataset(path, adapter="luffy")
    assert "row 1: column `target`" in str(error.value)


def test_luffy_string_target_is_refused():
    rows = [{**row, "target": "a plain string"} for row in LUFFY_ROWS[:1]]
    with pytest.raises(ValueError, match="row 0: column `target` must be a list with exactly one assistant message"):
        adapt_dataset(datasets.Dataset.from_list(rows), "luffy")


def test_luffy_missing_ground_truth_names_column():
    row = {**LUFFY_ROWS[0], "reward_model": {"ground_truth": "", "style": "rule"}}
    with pytest.raises(ValueError, match="row 0: column `reward_model` has no `ground_truth`"):
        adapt_dataset(datasets.Dataset.from_list([row]), "luffy")


def test_luffy_none_first_batch_keeps_completion_type():
    # More than one Arrow write batch (1000 rows) whose first batch has no demonstration at all.
    rows = [LUFFY_ROWS[2]] * 1100 + [LUFFY_ROWS[0]] * 5
    dataset = adapt_dataset(datasets.Dataset.from_list(rows), "luffy")
    assert dataset[0]["completion"] is None
    assert dataset[-1]["completion"] == LUFFY_ROWS[0]["target"]


@pytest.mark.parametrize(
    "rows, suggested",
    [
        ([{"problem": "1+1?", "solution": "\\boxed{2}", "level": "1"}], "adapter='problem_solution'"),
        # LUFFY-like but without `target`: every demonstration would be lost silently; `verl` is that schema.
        ([{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}}], "adapter='verl'"),
    ],
)
def test_luffy_wrong_schema_lists_columns_and_suggests_an_adapter(tmp_path, rows, suggested):
    path = _write_jsonl(tmp_path / "other.jsonl", rows)
    with pytest.raises(ValueError, match="Adapter 'luffy'") as error:
        load_hpt_dataset(path, adapter="luffy")
    message = str(error.value)
    assert f"its columns are {sorted(rows[0])}" in message
    assert "target" in message and suggested in message


def test_luffy_unknown_schema_lists_the_adapters():
    with pytest.raises(ValueError, match=r"its columns are \['gold', 'question'\]") as error:
        adapt_dataset(datasets.Dataset.from_list([{"question": "q", "gold": "1"}]), "openr1")
    for name in ("verl", "problem_solution", "identity"):
        assert name in str(error.value)


def test_adapter_is_callable_on_one_example():
    assert ADAPTERS["luffy"](LUFFY_ROWS[0], 0) == {
        "prompt": LUFFY_ROWS[0]["prompt"],
        "completion": LUFFY_ROWS[0]["target"],
        "solution": "2",
    }
    assert isinstance(ADAPTERS["openr1"], DatasetAdapter) and ADAPTERS["openr1"] is ADAPTERS["luffy"]


# ---------------------------------------------------------------------------------------------------------------------
# verl
# ---------------------------------------------------------------------------------------------------------------------

GSM8K_ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
VERL_ROWS = [
    {  # as written by verl's examples/data_preprocess/gsm8k.py
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": "Natalia sold clips... Let's think step by step."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "72"},
        "extra_info": {"split": "train", "index": 0, "answer": GSM8K_ANSWER, "question": "Natalia sold clips..."},
    },
    {  # as written by verl's math_dataset.py: no demonstration
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "prompt": [{"role": "user", "content": "Compute 2^3."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "8"},
        "extra_info": {"split": "train", "index": 1, "answer": None, "question": None},
    },
    {  # `extra_info.answer` is only the final answer: not a demonstration
        "data_source": "custom",
        "prompt": [{"role": "user", "content": "What is 5-2?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "3"},
        "extra_info": {"split": "train", "index": 2, "answer": "3", "question": "What is 5-2?"},
    },
]


def test_verl_parquet_autodetected(tmp_path):
    path = _write_parquet(tmp_path / "train.parquet", VERL_ROWS)
    dataset = load_hpt_dataset(path)

    assert dataset.to_list() == [
        {
            "data_source": row["data_source"],
            "prompt": row["prompt"],
            "ability": "math",
            "extra_info": row["extra_info"],
            "completion": completion,
            "solution": row["reward_model"]["ground_truth"],
        }
        for row, completion in zip(
            VERL_ROWS, [[{"role": "assistant", "content": GSM8K_ANSWER}], None, None], strict=True
        )
    ]


def test_verl_demonstration_keys(tmp_path):
    rows = [{**row, "response": f"Worked solution {i}."} for i, row in enumerate(VERL_ROWS)]
    path = _write_jsonl(tmp_path / "verl.jsonl", rows)

    # The top-level `response` comes before `extra_info.answer`, and is consumed.
    dataset = load_hpt_dataset(path, adapter="verl")
    assert "response" not in dataset.column_names
    assert [row["completion"][0]["content"] for row in dataset] == [f"Worked solution {i}." for i in range(3)]

    explicit = load_hpt_dataset(path, adapter="verl", demonstration_keys="extra_info.answer")
    assert "response" in explicit.column_names
    assert [row["completion"] for row in explicit] == [[{"role": "assistant", "content": GSM8K_ANSWER}], None, None]

    rl_only = load_hpt_dataset(path, adapter="verl", demonstration_keys=None)
    assert [row["completion"] for row in rl_only] == [None, None, None]


def test_verl_string_prompt_gives_string_completion():
    row = {**VERL_ROWS[0], "prompt": "Natalia sold clips..."}
    assert adapt_dataset(datasets.Dataset.from_list([row]), "verl")[0]["completion"] == GSM8K_ANSWER


def test_verl_bad_reward_model_names_column():
    row = {**VERL_ROWS[0], "reward_model": {"style": "rule", "ground_truth": None}}
    with pytest.raises(ValueError, match="row 0: column `reward_model`"):
        adapt_dataset(datasets.Dataset.from_list([row]), "verl")


# ---------------------------------------------------------------------------------------------------------------------
# problem / solution / answer
# ---------------------------------------------------------------------------------------------------------------------

MATH_ROWS = [
    {"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "Sum: $\\boxed{1}$.", "level": "Level 1"},
    {
        "problem": "Simplify $\\sqrt{8}$.",
        "solution": "We have $\\sqrt{8}=\\boxed{2}$ wrong, then $\\sqrt{8} = \\boxed{2\\sqrt{2}}$.",
        "level": "Level 2",
    },
    {"problem": "Write one half.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
]


def test_problem_solution_boxed_extraction_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    dataset = load_hpt_dataset(path, instruction=BOXED_INSTRUCTION)

    assert dataset.to_list() == [
        {"prompt": f"{row['problem']} {BOXED_INSTRUCTION}", "level": row["level"], "completion": row["solution"]}
        | {"solution": answer}
        for row, answer in zip(MATH_ROWS, ["1", "2\\sqrt{2}", "\\frac{1}{2}"], strict=True)
    ]


def test_problem_solution_answer_column_conversational_parquet(tmp_path):
    rows = [
        {"problem": "What is 6*7?", "solution": "6*7=42, so \\boxed{42}.", "answer": 42},
        {"problem": "What is 2+2?", "solution": None, "answer": 4},
    ]
    path = _write_parquet(tmp_path / "numina.parquet", rows)
    dataset = load_hpt_dataset(
        path, conversational=True, system_prompt="You are a math expert.", instruction="Answer briefly."
    )

    assert dataset.to_list() == [
        {
            "prompt": [
                {"role": "system", "content": "You are a math expert."},
                {"role": "user", "content": "What is 6*7? Answer briefly."},
            ],
            "completion": [{"role": "assistant", "content": "6*7=42, so \\boxed{42}."}],
            "solution": "42",
        },
        {
            "prompt": [
                {"role": "system", "content": "You are a math expert."},
                {"role": "user", "content": "What is 2+2? Answer briefly."},
            ],
            "completion": None,
            "solution": "4",
        },
    ]


def test_problem_solution_custom_keys():
    rows = [{"question": "1+2?", "response": "So \\boxed{3}.", "final": "3", "id": 7}]
    dataset = adapt_dataset(
        datasets.Dataset.from_list(rows),
        "problem_solution",
        problem_key="question",
        solution_key="response",
        answer_key="final",
        instruction_separator="\n",
        instruction="Think.",
    )
    assert dataset.to_list() == [{"id": 7, "prompt": "1+2?\nThink.", "completion": "So \\boxed{3}.", "solution": "3"}]


def test_problem_solution_missing_answer():
    rows = [{"problem": "p0", "solution": "s \\boxed{1}"}, {"problem": "p1", "solution": "no box here"}]
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match="row 1: no gold answer") as error:
        adapt_dataset(dataset, "problem_solution")
    assert "`answer`" in str(error.value) and "`solution`" in str(error.value)

    kept = adapt_dataset(dataset, "problem_solution", missing_answer="none")
    assert [row["solution"] for row in kept] == ["1", None]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{a}{b}}$ and done", "\\frac{a}{b}"),
        ("first \\boxed{1} then \\fbox{2}", "2"),
        ("the answer is $\\boxed 7$.", "7"),
        ("\\boxed {5}", "5"),
        ("\\boxed{ 7 }", "7"),
        ("unbalanced \\boxed{1", None),
        ("no answer here", None),
    ],
)
def test_last_boxed(text, expected):
    # One extractor: the gold answer an adapter takes from a worked solution is the answer the reward reads.
    assert extract_boxed(text) == expected
    adapted = ADAPTERS["problem_solution"]({"problem": "p", "solution": text}, 0, missing_answer="none")
    assert adapted["solution"] == expected


def test_problem_solution_bad_problem_names_column():
    with pytest.raises(ValueError, match="row 0: column `problem` must be a non-empty string"):
        adapt_dataset(datasets.Dataset.from_list([{"problem": "", "solution": "\\boxed{1}"}]), "problem_solution")


# ---------------------------------------------------------------------------------------------------------------------
# identity, detection, loading
# ---------------------------------------------------------------------------------------------------------------------


def test_identity_csv_unchanged_and_answers_as_text(tmp_path):
    rows = [
        {"prompt": "Compute 6*7.", "completion": "6*7 = 42, so the answer is 42.", "solution": "42"},
        {"prompt": "Compute 2+2.", "completion": "2+2 = 4.", "solution": "4"},
    ]
    path = tmp_path / "pc.csv"
    datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    # The CSV loader reads `solution` as integers; the adapted dataset gives text back.
    assert datasets.load_dataset("csv", data_files=str(path), split="train").features["solution"].dtype == "int64"
    assert load_hpt_dataset(path).to_list() == rows
    assert load_hpt_dataset(path, adapter="none").to_list() == rows


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["data_source", "prompt", "target", "ability", "reward_model", "extra_info"], "luffy"),
        (["problem", "solution", "answer", "level"], "problem_solution"),
        (["prompt", "completion", "solution"], "identity"),
        (["data_source", "prompt", "ability", "reward_model", "extra_info"], "verl"),
        (["prompt", "solution"], "identity"),
    ],
)
def test_detect_adapter(columns, expected):
    assert detect_adapter(columns) == expected


def test_detect_adapter_error_lists_columns_and_adapters(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "gold": "1"}])
    with pytest.raises(ValueError, match="Cannot tell the dataset schema") as error:
        load_hpt_dataset(path)
    message = str(error.value)
    assert "['gold', 'question']" in message
    for name in ("luffy", "verl", "problem_solution", "identity"):
        assert name in message


def test_unknown_adapter_and_option():
    dataset = datasets.Dataset.from_list(LUFFY_ROWS)
    with pytest.raises(ValueError, match="Unknown adapter 'lufy'"):
        adapt_dataset(dataset, "lufy")
    with pytest.raises(ValueError, match="Unknown option.*system_promt.*accepts: drop_system_prompt, system_prompt"):
        adapt_dataset(dataset, "luffy", system_promt="x")


def test_custom_callable_adapter():
    def to_hpt(example, suffix):
        return {"prompt": example["q"] + suffix, "completion": example["a"]}

    dataset = adapt_dataset(datasets.Dataset.from_list([{"q": "1+1", "a": "2"}]), to_hpt, suffix="=?")
    assert dataset.to_list() == [{"q": "1+1", "a": "2", "prompt": "1+1=?", "completion": "2"}]
    only = adapt_dataset(datasets.Dataset.from_list([{"q": "1+1", "a": "2"}]), to_hpt, suffix="", drop_columns=True)
    assert only.column_names == ["prompt", "completion"]

    with pytest.raises(ValueError, match="no `prompt` column"):
        adapt_dataset(datasets.Dataset.from_list([{"q": "1+1"}]), lambda example: {"question": example["q"]})


def test_directory_splits(tmp_path):
    (tmp_path / "verl").mkdir()
    _write_parquet(tmp_path / "verl" / "train.parquet", VERL_ROWS[:2])
    _write_parquet(tmp_path / "verl" / "test.parquet", VERL_ROWS[2:])
    assert len(load_hpt_dataset(tmp_path / "verl")) == 2
    assert load_hpt_dataset(tmp_path / "verl", split="test")["solution"] == ["3"]
    assert load_hpt_dataset(tmp_path / "verl", split="train[:1]")["solution"] == ["72"]
    with pytest.raises(ValueError, match="No file for split 'validation'"):
        load_hpt_dataset(tmp_path / "verl", split="validation")

    (tmp_path / "shards").mkdir()
    _write_jsonl(tmp_path / "shards" / "part_a.jsonl", LUFFY_ROWS[:2])
    _write_jsonl(tmp_path / "shards" / "part_b.jsonl", LUFFY_ROWS[2:])
    assert load_hpt_dataset(tmp_path / "shards")["solution"] == ["2", "\\frac{1}{2}", "9"]
    with pytest.raises(ValueError, match="all files are the 'train' split"):
        load_hpt_dataset(tmp_path / "shards", split="test")


def test_directory_in_the_hub_layout(tmp_path):
    # Sharded files under data/, as the Hub writes them: `datasets` reads the split names from the file names.
    (tmp_path / "data").mkdir()
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", VERL_ROWS[:2])
    _write_parquet(tmp_path / "data" / "dev-00000-of-00001.parquet", VERL_ROWS[2:])
    assert load_hpt_dataset(tmp_path)["solution"] == ["72", "8"]
    assert load_hpt_dataset(tmp_path, split="dev")["solution"] == ["3"]


def test_saved_to_disk_and_missing_file(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MATH_ROWS)}).save_to_disk(str(tmp_path / "saved"))
    assert load_hpt_dataset(tmp_path / "saved", split="train[1:]")["solution"] == ["2\\sqrt{2}", "\\frac{1}{2}"]

    # A path that looks like a file never becomes a Hub request.
    with pytest.raises(FileNotFoundError, match="No such data file"):
        load_hpt_dataset(tmp_path / "missing.parquet")


def test_streaming_gives_iterable_dataset(tmp_path):
    path = _write_jsonl(tmp_path / "openr1.jsonl", LUFFY_ROWS)
    dataset = load_hpt_dataset(path, streaming=True)
    assert isinstance(dataset, datasets.IterableDataset)
    assert list(dataset) == [_expected_luffy(row) for row in LUFFY_ROWS]

    in_memory = datasets.Dataset.from_list(MATH_ROWS).to_iterable_dataset()
    assert [row["solution"] for row in adapt_dataset(in_memory)] == ["1", "2\\sqrt{2}", "\\frac{1}{2}"]
