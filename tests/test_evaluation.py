import json
import math
import re
import sys
from types import SimpleNamespace

import pytest
from transformers import HfArgumentParser

from trl_hpt import evaluation
from trl_hpt.evaluation import (
    BENCHMARKS,
    DEFAULT_PROMPT_SUFFIX,
    EvalArguments,
    available_benchmarks,
    build_prompt,
    evaluate,
    format_table,
    load_benchmark,
    pass_at_k,
    run_eval,
    write_results,
)
from trl_hpt.rewards import extract_boxed
from trl_hpt.testing import build_tiny_causal_lm, build_tiny_tokenizer, save_tiny_model


BENCHMARK_SIZES = {
    "AIME24": 30,
    "AIME25": 30,
    "AMC23": 40,
    "MATH-500": 500,
    "Minerva": 272,
    "Olympiad-Bench": 674,
    "GPQA": 198,
}


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_causal_lm(tokenizer), tokenizer


def _oracle(correct_per_problem: dict[int, list[bool]] | None = None):
    """A stand-in for the generation function: answers each problem with its boxed gold answer, or a wrong one.

    `correct_per_problem[i][s]` says whether sample s of problem i (in benchmark order) is right; all are by default.
    """

    def generate(model, tokenizer, prompts, num_samples, *args, **kwargs):
        outputs = []
        for i, prompt in enumerate(prompts):
            row = next(r for r in generate.rows if r["prompt"].strip() in prompt)
            pattern = (correct_per_problem or {}).get(i, [True] * num_samples)
            gold = row["answer"]
            right, wrong = f"Reasoning...\nSo the answer is \\boxed{{{gold}}}.", "I give up."
            outputs.append([right if ok else wrong for ok in pattern])
        return outputs

    generate.rows = []
    return generate


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 3, 0.0),
        (5, 5, 5, 1.0),
        (5, 3, 3, 1.0),  # n - c < k: every 3-subset holds a correct sample
        (10, 1, 1, 0.1),
        (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100), rel=1e-9)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_validation(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 2, 1)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_load_benchmark_shipped(name):
    rows = load_benchmark(name)
    assert len(rows) == BENCHMARK_SIZES[name]
    assert all(isinstance(r["prompt"], str) and r["answer"] is not None for r in rows)
    # Names are case-, dash- and underscore-insensitive.
    assert load_benchmark(name.lower().replace("-", ""), limit=3) == rows[:3]
    assert load_benchmark(name.upper().replace("-", "_"), limit=0) == []


def test_load_benchmark_aliases_and_names():
    assert available_benchmarks() == list(BENCHMARKS)
    assert len(load_benchmark("math")) == 500
    assert len(load_benchmark("olympiadbench")) == 674


def test_load_benchmark_from_files(tmp_path):
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4", "id": 7}]
    (tmp_path / "set.json").write_text(json.dumps(rows))
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_benchmark(tmp_path / "set.json") == rows
    assert load_benchmark(str(tmp_path / "set.jsonl"), limit=1) == rows[:1]

    (tmp_path / "bad.json").write_text(json.dumps([{"question": "1+1?", "answer": "2"}]))
    with pytest.raises(ValueError, match="Row 0"):
        load_benchmark(tmp_path / "bad.json")


def test_load_benchmark_unknown_lists_names():
    with pytest.raises(ValueError, match="AIME24, AIME25, AMC23, MATH-500, Minerva, Olympiad-Bench, GPQA"):
        load_benchmark("aime2023")


def test_build_prompt(tiny):
    _, tokenizer = tiny
    chat = build_prompt("What is 1+1?", tokenizer, system_prompt="Be brief.")
    assert (
        chat == f"<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is 1+1?\n{DEFAULT_PROMPT_SUFFIX}</s>\n<|assistant|>\n"
    )
    assert (
        build_prompt("What is 1+1?", tokenizer, use_chat_template=False) == f"What is 1+1?\n{DEFAULT_PROMPT_SUFFIX}\n"
    )
    plain_tokenizer = build_tiny_tokenizer(chat_template=False)
    assert build_prompt("Q", plain_tokenizer, system_prompt="S", prompt_suffix=None) == "S\n\nQ\n"


def test_evaluate_scores_against_hand_computed_pass_at_k(tiny, monkeypatch):
    model, tokenizer = tiny
    # 3 AIME24 problems, 4 samples each: 4/4, 2/4 and 0/4 correct.
    oracle = _oracle({0: [True] * 4, 1: [True, False, True, False], 2: [False] * 4})
    oracle.rows = load_benchmark("aime24", limit=3)
    monkeypatch.setattr(evaluation, "_generate_transformers", oracle)

    results = evaluate(model, tokenizer, ["aime24"], num_samples=4, k_values=(1, 2, 4, 8), limit=3, backend="auto")
    aime = results["benchmarks"]["AIME24"]
    assert aime["num_problems"] == 3 and aime["num_samples"] == 4 and aime["num_correct"] == 6
    assert aime["num_unverifiable"] == 0
    assert aime["pass@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert aime["pass@2"] == pytest.approx((1 + (1 - 1 / 6) + 0) / 3)  # 1 - C(2,2)/C(4,2) for the 2/4 problem
    assert aime["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in aime  # more than num_samples: skipped
    assert results["config"]["k_values"] == [1, 2, 4]
    assert results["average"] == {k: aime[k] for k in ("pass@1", "pass@2", "pass@4")}
    record = aime["records"][1]
    assert record["scores"] == [1.0, 0.0, 1.0, 0.0]
    assert record["extracted_answers"] == [extract_boxed(record["answer"]), None] * 2  # gold stored as \boxed{...}
    assert len(record["completions"]) == 4


def test_evaluate_perfect_model_on_every_benchmark(tiny, monkeypatch):
    model, tokenizer = tiny
    oracle = _oracle()
    oracle.rows = [row for name in BENCHMARKS for row in load_benchmark(name, limit=3)]
    monkeypatch.setattr(evaluation, "_generate_transformers", oracle)

    results = evaluate(
        model, tokenizer, list(BENCHMARKS), num_samples=2, k_values=[2], limit=3, save_completions=False
    )
    assert list(results["benchmarks"]) == list(BENCHMARKS)
    for name, bench in results["benchmarks"].items():
        assert bench["pass@1"] == 1.0 and bench["pass@2"] == 1.0, name
        assert "completions" not in bench["records"][0]
    assert results["average"] == {"pass@1": 1.0, "pass@2": 1.0}
    table = format_table(results)
    assert "GPQA" in table and "Average" in table and "100.0" in table


def test_evaluate_greedy_repeats_one_completion(tiny):
    model, tokenizer = tiny
    results = evaluate(
        model, tokenizer, ["amc23"], num_samples=3, temperature=0.0, max_new_tokens=4, limit=2, batch_size=2
    )
    for record in results["benchmarks"]["AMC23"]["records"]:
        assert len(set(record["completions"])) == 1 and len(record["completions"]) == 3


def test_evaluate_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="vllm.LLM"):
        evaluate(model, tokenizer, ["aime24"], backend="vllm")
    with pytest.raises(ValueError, match="backend"):
        evaluate(model, tokenizer, ["aime24"], backend="tgi")
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(model, tokenizer, ["aime24"], num_samples=0)


def test_run_eval_end_to_end(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny-model")
    output_file = tmp_path / "results" / "eval.json"
    args = EvalArguments(
        model_name_or_path=model_dir,
        benchmarks=["aime24", "GPQA"],
        num_samples=2,
        k=[1, 2],
        temperature=1.0,
        max_new_tokens=6,
        limit=2,
        output_file=str(output_file),
        backend="auto",  # no vLLM / CUDA here: transformers
    )
    results = run_eval(args)

    saved = json.loads(output_file.read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["config"]["model_name_or_path"] == model_dir
    assert saved["config"]["backend"] == "transformers"
    assert saved["config"]["arguments"]["benchmarks"] == ["aime24", "GPQA"]
    assert list(saved["benchmarks"]) == ["AIME24", "GPQA"]
    for bench in saved["benchmarks"].values():
        assert bench["num_problems"] == 2 and bench["num_samples"] == 2
        assert 0.0 <= bench["pass@1"] <= bench["pass@2"] <= 1.0
        assert bench["example_prompt"].endswith("<|assistant|>\n")
        for record in bench["records"]:
            assert len(record["completions"]) == 2 and len(record["scores"]) == 2
            assert set(record) >= {"index", "prompt", "answer", "num_correct", "extracted_answers", "pass@1", "pass@2"}
    assert set(saved["average"]) == {"pass@1", "pass@2"}


def test_eval_arguments_parse():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(
        ["--model_name_or_path", "some/model", "--benchmarks", "aime24", "gpqa", "--k", "1", "4", "--num_samples", "4"]
        + ["--limit", "3", "--temperature", "0", "--no_use_chat_template", "--backend", "transformers"]
    )
    assert args.benchmarks == ["aime24", "gpqa"] and args.k == [1, 4] and args.num_samples == 4
    assert args.limit == 3 and args.temperature == 0.0 and args.use_chat_template is False
    (defaults,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(["--model_name_or_path", "m"])
    assert defaults.benchmarks == list(BENCHMARKS) and defaults.k == [1] and defaults.trust_remote_code is False
    with pytest.raises(ValueError, match="backend"):
        EvalArguments(model_name_or_path="m", backend="tgi")


def test_write_results_and_table(tmp_path):
    results = {
        "config": {"k_values": [1]},
        "benchmarks": {"AIME24": {"num_problems": 30, "num_samples": 1, "pass@1": 0.25}},
        "average": {"pass@1": 0.25},
    }
    path = write_results(results, tmp_path / "a" / "b.json")
    assert json.loads(path.read_text()) == results
    table = format_table(results)
    assert table.splitlines()[0].split() == ["Benchmark", "Problems", "Samples", "pass@1"]
    assert table.splitlines()[2].split() == ["AIME24", "30", "1", "25.0"]


# ---------------------------------------------------------------------------------------------------------------------
# Progress and CPU defaults
# ---------------------------------------------------------------------------------------------------------------------


def test_eval_command_shows_progress_on_stderr_and_can_hide_it(tmp_path, capsys):
    from trl_hpt import cli

    model_dir = save_tiny_model(tmp_path / "tiny")
    argv = ["eval", "--model_name_or_path", model_dir, "--benchmarks", "AIME24", "AMC23", "--limit", "2"]
    argv += ["--num_samples", "2", "--temperature", "1.0", "--max_new_tokens", "3", "--output_file", ""]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    # One bar per benchmark, over its samples (2 problems x 2 samples), with the problems done beside it.
    for name in ("AIME24", "AMC23"):
        assert re.search(rf"{name}: 100%.*4/4 .*problems 2/2", captured.err), captured.err
        assert name in captured.out  # the table, on stdout
    assert "max_new_tokens is not set" not in captured.err

    assert cli.main([*argv, "--disable_tqdm", "true"]) == 0
    captured = capsys.readouterr()
    assert "AIME24:" not in captured.err and "sample" not in captured.err
    assert "AIME24" in captured.out


def _length_recorder(monkeypatch, name="_generate_transformers"):
    seen = []

    def generate(model, tokenizer, prompts, num_samples, temperature, top_p, max_new_tokens, *args, **kwargs):
        seen.append(max_new_tokens)
        return [["\\boxed{0}"] * num_samples for _ in prompts]

    monkeypatch.setattr(evaluation, name, generate)
    return seen


def test_cpu_default_length_is_short_and_warns_naming_the_flag(tiny, monkeypatch, caplog):
    model, tokenizer = tiny
    seen = _length_recorder(monkeypatch)
    with caplog.at_level("WARNING", logger="trl_hpt.evaluation"):
        results = evaluate(model, tokenizer, ["aime24"], limit=1, disable_tqdm=True)
    assert seen == [evaluation.CPU_MAX_NEW_TOKENS] == [512]
    assert results["config"]["max_new_tokens"] == 512
    (warning,) = [r.getMessage() for r in caplog.records if "max_new_tokens" in r.getMessage()]
    assert "--max_new_tokens" in warning and "8192" in warning and "CPU" in warning

    caplog.clear()
    with caplog.at_level("WARNING", logger="trl_hpt.evaluation"):
        results = evaluate(model, tokenizer, ["aime24"], limit=1, max_new_tokens=16, disable_tqdm=True)
    assert seen[-1] == 16 and results["config"]["max_new_tokens"] == 16
    assert not [r for r in caplog.records if "max_new_tokens" in r.getMessage()]
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(model, tokenizer, ["aime24"], limit=1, max_new_tokens=0)


def test_gpu_default_length_is_the_papers(tiny, monkeypatch, caplog):
    import torch

    _, tokenizer = tiny
    seen = _length_recorder(monkeypatch)
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))  # generation is stubbed: only the device is read
    with caplog.at_level("WARNING", logger="trl_hpt.evaluation"):
        results = evaluate(on_gpu, tokenizer, ["aime24"], limit=1, disable_tqdm=True)
    assert seen == [evaluation.DEFAULT_MAX_NEW_TOKENS] == [8192]
    assert results["config"]["max_new_tokens"] == 8192
    assert not [r for r in caplog.records if "max_new_tokens" in r.getMessage()]
    (defaults,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(["--model_name_or_path", "m"])
    assert defaults.max_new_tokens is None and defaults.disable_tqdm is False


def test_vllm_backend_shows_vllms_progress_and_the_papers_length(tiny, monkeypatch, capsys):
    _, tokenizer = tiny
    calls = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:  # stands for vllm.LLM: `evaluate` tells the backend from the class's module
        def generate(self, requests, params, use_tqdm=True):
            calls.append({"use_tqdm": use_tqdm, "max_tokens": params.max_tokens, "n": params.n})
            sample = SimpleNamespace(text="\\boxed{0}")
            return [SimpleNamespace(outputs=[sample] * params.n) for _ in requests]

    LLM.__module__ = "vllm.entrypoints.llm"
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=SamplingParams))

    results = evaluate(LLM(), tokenizer, ["aime24"], num_samples=3, limit=2)
    assert calls == [{"use_tqdm": True, "max_tokens": 8192, "n": 3}]
    assert results["config"]["backend"] == "vllm"
    assert "AIME24: 2 problems x 3 samples" in capsys.readouterr().err

    evaluate(LLM(), tokenizer, ["aime24"], num_samples=3, limit=2, max_new_tokens=64, disable_tqdm=True)
    assert calls[-1] == {"use_tqdm": False, "max_tokens": 64, "n": 3}
    assert capsys.readouterr().err == ""
