"""pass@k evaluation on the paper's benchmarks (AIME24/25, AMC23, MATH-500, Minerva, OlympiadBench, GPQA-diamond).

    >>> from trl_hpt.evaluation import evaluate, format_table
    >>> results = evaluate(model, tokenizer, ["aime24", "math-500"], num_samples=8, k_values=(1, 8))
    >>> print(format_table(results))

Each problem is asked with the prompt suffix the paper's evaluation uses (Qwen2.5-Math's "Please reason step by step,
and put your final answer within \\boxed{}."), through the tokenizer's chat template when it has one. Completions are
scored with [`~trl_hpt.rewards.math_verify_reward`]; pass@1 is the mean accuracy over all samples and pass@k the
unbiased estimator of Chen et al. (2021). Generation runs on vLLM when given a `vllm.LLM`, else on batched
transformers `generate`, with a progress bar on stderr. [`run_eval`] is the command-line entry point
(`trl-hpt eval`).
"""

import importlib.util
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trl_hpt.rewards import BOXED_INSTRUCTION, extract_final_answer, math_verify_reward


__all__ = [
    "BENCHMARKS",
    "CPU_MAX_NEW_TOKENS",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_PROMPT_SUFFIX",
    "EvalArguments",
    "available_benchmarks",
    "build_prompt",
    "evaluate",
    "format_table",
    "load_benchmark",
    "pass_at_k",
    "run_eval",
    "write_results",
]

logger = logging.getLogger(__name__)

BENCHMARKS = ("AIME24", "AIME25", "AMC23", "MATH-500", "Minerva", "Olympiad-Bench", "GPQA")
"""The benchmarks shipped in `trl_hpt/benchmarks_data/`, in the order the paper reports them."""

DEFAULT_PROMPT_SUFFIX = BOXED_INSTRUCTION
"""The instruction appended to every problem: [`~trl_hpt.rewards.BOXED_INSTRUCTION`], as in the paper's evaluation."""

DEFAULT_MAX_NEW_TOKENS = 8192
"""Completion length when none is given and the model runs on a GPU or vLLM: the paper's response length."""

CPU_MAX_NEW_TOKENS = 512
"""Completion length when none is given and the model is on the CPU, where an 8192-token sample takes many minutes."""

BACKENDS = ("auto", "transformers", "vllm")
DTYPES = ("auto", "bfloat16", "float16", "float32")

_DATA_DIR = Path(__file__).parent / "benchmarks_data"
_ALIASES = {"math": "MATH-500", "olympiad": "Olympiad-Bench", "amc": "AMC23", "gpqadiamond": "GPQA"}


def _canonical(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def available_benchmarks() -> list[str]:
    """Names of the benchmarks shipped with the package, usable with [`load_benchmark`]."""
    return list(BENCHMARKS)


def load_benchmark(name_or_path: str | Path, limit: int | None = None) -> list[dict]:
    """
    Loads a benchmark as a list of `{"prompt", "answer", ...}` rows.

    Args:
        name_or_path (`str` or `Path`):
            A shipped benchmark (see [`available_benchmarks`]; case, `-`, `_` and spaces are ignored, so `aime24`,
            `math500` and `Olympiad_Bench` work), or a path to a JSON list / JSONL file of rows with a `prompt` (the
            problem text) and an `answer` (the gold answer, bare or boxed).
        limit (`int`, *optional*):
            Keep only the first `limit` rows.

    Returns:
        `list[dict]`: The rows, as stored (extra fields such as `id` are kept).

    Raises:
        `ValueError`: If the name is neither a shipped benchmark nor an existing file (the message lists the shipped
            names), or if a row lacks `prompt` or `answer`.
    """
    shipped = {_canonical(name): name for name in BENCHMARKS}
    key = _canonical(str(name_or_path))
    key = _canonical(_ALIASES.get(key, key))
    if key in shipped:
        path = _DATA_DIR / f"{shipped[key]}.json"
    elif Path(name_or_path).is_file():
        path = Path(name_or_path)
    else:
        raise ValueError(
            f"Unknown benchmark {str(name_or_path)!r}: it is not a shipped benchmark ({', '.join(BENCHMARKS)}) and "
            "not an existing JSON/JSONL file of {'prompt', 'answer'} rows."
        )
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}.")

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"{path} must hold a JSON list of rows (or one JSON object per line with a .jsonl suffix).")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("answer") is None:
            raise ValueError(f"Row {i} of {path} needs a string 'prompt' and an 'answer', got {row!r:.200}.")
    return rows if limit is None else rows[:limit]


def _benchmark_label(name_or_path: str | Path) -> str:
    key = _canonical(str(name_or_path))
    key = _canonical(_ALIASES.get(key, key))
    for name in BENCHMARKS:
        if _canonical(name) == key:
            return name
    return Path(name_or_path).stem


def pass_at_k(n: int, c: int, k: int) -> float:
    """
    Unbiased pass@k estimator `1 - C(n - c, k) / C(n, k)` (Chen et al., 2021): the probability that at least one of
    `k` samples drawn without replacement from `n` generations, `c` of them correct, is correct.

    Computed as the product `1 - prod_{i = n - c + 1}^{n} (1 - k / i)`, which never forms the huge binomials.

    Args:
        n (`int`): Number of generations for the problem (>= 1).
        c (`int`): Number of correct generations (0 <= c <= n).
        k (`int`): Budget (1 <= k <= n).

    Returns:
        `float`: pass@k in [0, 1].

    Example:

    ```python
    >>> pass_at_k(5, 2, 1), pass_at_k(5, 2, 2)
    (0.4, 0.7)
    ```
    """
    for label, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an int, got {value!r}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}.")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}.")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def build_prompt(
    problem: str,
    tokenizer=None,
    system_prompt: str | None = None,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    use_chat_template: bool = True,
) -> str:
    """
    Builds the text a model is asked: the problem, then `prompt_suffix` on a new line, wrapped in the tokenizer's chat
    template (as one user turn, after an optional system turn) when it has one and `use_chat_template` is set.

    Without a chat template, the text is `system_prompt`, a blank line, the problem and suffix, and a final newline.

    Args:
        problem (`str`): The problem statement.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Tokenizer whose chat template to apply.
        system_prompt (`str`, *optional*): System message; none by default, as in the paper's evaluation.
        prompt_suffix (`str`, *optional*, defaults to [`DEFAULT_PROMPT_SUFFIX`]): Instruction appended to every problem;
            `None` or `""` for none.
        use_chat_template (`bool`, *optional*, defaults to `True`): Use the chat template when the tokenizer has one.

    Returns:
        `str`: The prompt text, ending where the model's answer starts.
    """
    content = problem.strip()
    if prompt_suffix:
        content = f"{content}\n{prompt_suffix}"
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n\n{content}\n" if system_prompt else f"{content}\n"


def _is_vllm_llm(model: Any) -> bool:
    return type(model).__module__.split(".")[0] == "vllm"


def _vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _generate_transformers(
    model,
    tokenizer,
    prompts: list[str],
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    *,
    batch_size: int,
    seed: int,
    add_special_tokens: bool,
    progress: dict | None = None,
) -> list[list[str]]:
    """
    `num_samples` completions per prompt with batched `model.generate` (left padding; greedy at temperature 0).

    `progress`, when given, holds the keyword arguments of a `tqdm` bar over the samples (the problems done shown
    beside it), advanced after every `generate` call. `seed` is unused: the caller has seeded torch.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    greedy = temperature <= 0
    # Greedy decoding gives the same completion every time: generate one and repeat it.
    num_generated = 1 if greedy else num_samples
    eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # A fresh config rather than the checkpoint's: its defaults (top_k, repetition penalty...) would make the two
    # backends sample from different distributions. top_k=0 disables top-k, as in vLLM.
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=num_generated,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **sampling,
    )

    # Sorting by length keeps padding (and wasted compute) low within a batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    prompts_per_batch = max(1, batch_size // num_generated)
    completions: list[list[str]] = [[] for _ in prompts]
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # generation appends to the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts) * num_samples, unit="sample", **progress) if progress is not None else None
    try:
        for start in range(0, len(order), prompts_per_batch):
            indices = order[start : start + prompts_per_batch]
            batch = tokenizer(
                [prompts[i] for i in indices],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(model.device)
            with torch.inference_mode():
                output = model.generate(**batch, generation_config=generation_config)
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for j, i in enumerate(indices):
                samples = texts[j * num_generated : (j + 1) * num_generated]
                completions[i] = samples * num_samples if greedy else samples
            if bar is not None:
                done = min(start + prompts_per_batch, len(order))
                bar.set_postfix_str(f"problems {done}/{len(order)}", refresh=False)
                bar.update(len(indices) * num_samples)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = padding_side, pad_token
        model.train(was_training)
        if bar is not None:
            bar.close()
    return completions


def _generate_vllm(
    llm,
    tokenizer,
    prompts: list[str],
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    *,
    batch_size: int,
    seed: int,
    add_special_tokens: bool,
    progress: dict | None = None,
) -> list[list[str]]:
    """
    `num_samples` completions per prompt with `vllm.LLM.generate` (`SamplingParams(n=num_samples)`).

    With `progress`, vLLM's own progress bar is shown: one request is one problem with all its samples, so it counts
    problems (with vLLM's token throughput). A line naming the benchmark and the sample count comes first.
    `batch_size` is unused: vLLM schedules the requests itself.
    """
    from vllm import SamplingParams

    greedy = temperature <= 0
    params = SamplingParams(
        n=1 if greedy else num_samples,
        temperature=max(temperature, 0.0),
        top_p=1.0 if greedy else top_p,
        max_tokens=max_new_tokens,
        seed=seed,
    )
    # Token ids rather than text, so vLLM cannot add a second BOS to a chat template that already starts with one.
    requests = [
        {"prompt_token_ids": tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]} for p in prompts
    ]
    if progress is not None:
        print(
            f"{progress['desc']}: {len(prompts)} problems x {num_samples} samples, generating with vLLM",
            file=progress.get("file", sys.stderr),
            flush=True,
        )
    # Not chunked for our own bar: vLLM schedules best with every request at once.
    outputs = llm.generate(requests, params, use_tqdm=progress is not None)
    completions = [[sample.text for sample in output.outputs] for output in outputs]
    return [samples * num_samples if greedy else samples for samples in completions]


def _default_max_new_tokens(model, backend: str) -> int:
    """The paper's length on a GPU or vLLM; a CPU-sized one, with a warning naming the flag, on the CPU."""
    device = getattr(model, "device", None)
    if backend == "vllm" or getattr(device, "type", "cpu") != "cpu":
        return DEFAULT_MAX_NEW_TOKENS
    logger.warning(
        f"max_new_tokens is not set and the model is on the CPU: generating at most {CPU_MAX_NEW_TOKENS} new tokens "
        f"per sample instead of the paper's {DEFAULT_MAX_NEW_TOKENS} (its GPU setting), which take a long time per "
        f"sample here. Reasoning cut at {CPU_MAX_NEW_TOKENS} tokens scores lower than the paper's setting; pass "
        "--max_new_tokens (max_new_tokens= in Python) to choose the length."
    )
    return CPU_MAX_NEW_TOKENS


def evaluate(
    model,
    tokenizer,
    benchmarks: Sequence[str] = BENCHMARKS,
    num_samples: int = 1,
    k_values: Sequence[int] = (1,),
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    backend: str = "auto",
    system_prompt: str | None = None,
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX,
    use_chat_template: bool = True,
    seed: int = 42,
    save_completions: bool = True,
    disable_tqdm: bool = False,
) -> dict:
    """
    Generates `num_samples` completions per problem of each benchmark, scores them with
    [`~trl_hpt.rewards.math_verify_reward`] and aggregates pass@k.

    Args:
        model (`PreTrainedModel` or `vllm.LLM`):
            The model to evaluate, already loaded (see [`run_eval`] to load one from a path or the Hub).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer; its chat template, if any, formats the prompts.
        benchmarks (`list[str]`, *optional*, defaults to all of [`BENCHMARKS`]):
            Benchmark names or paths, as accepted by [`load_benchmark`].
        num_samples (`int`, *optional*, defaults to `1`):
            Completions per problem.
        k_values (`list[int]`, *optional*, defaults to `(1,)`):
            The k of the pass@k to report; pass@1 is always reported, and k larger than `num_samples` are skipped
            with a warning.
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature; 0 means greedy decoding (every sample is then the same completion).
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling threshold. Top-k sampling is disabled on both backends.
        max_new_tokens (`int`, *optional*):
            Maximum completion length. `None`: [`DEFAULT_MAX_NEW_TOKENS`] (8192, the paper's response length) on a
            GPU or with vLLM, [`CPU_MAX_NEW_TOKENS`] (512) for a model on the CPU, with a warning, since reasoning
            traces cut there score lower than the paper's numbers. The value used is in `config.max_new_tokens`.
        batch_size (`int`, *optional*, defaults to `8`):
            transformers backend: sequences (prompts x samples) per `generate` call. vLLM schedules by itself.
        limit (`int`, *optional*):
            Evaluate only the first `limit` problems of each benchmark.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"vllm"` (requires a `vllm.LLM`), `"transformers"`, or `"auto"` (whichever matches `model`).
        system_prompt (`str`, *optional*):
            System message of the chat template (or first paragraph of a plain prompt).
        prompt_suffix (`str`, *optional*, defaults to [`DEFAULT_PROMPT_SUFFIX`]):
            Instruction appended to every problem.
        use_chat_template (`bool`, *optional*, defaults to `True`):
            Format prompts with the tokenizer's chat template when it has one.
        seed (`int`, *optional*, defaults to `42`):
            Sampling seed.
        save_completions (`bool`, *optional*, defaults to `True`):
            Keep the completion texts in the per-problem records (large for long reasoning traces).
        disable_tqdm (`bool`, *optional*, defaults to `False`):
            Hide the progress bars, shown on stderr: per benchmark, the samples generated and the problems done
            (transformers), or vLLM's own bar over the problems.

    Returns:
        `dict`: `{"config": {...}, "benchmarks": {name: {...}}, "average": {...}}`. Each benchmark has
        `num_problems`, `num_samples`, `num_correct` (correct samples over all problems), `num_unverifiable`
        (problems whose gold answer math-verify could not parse; their unmatched samples count as wrong), `pass@1`
        and `pass@k` for every valid k (fractions in [0, 1]), `example_prompt`, and `records`: per problem its
        `index`, `prompt` (the problem), `answer`, `num_correct`, per-sample `scores` and `extracted_answers`, its
        own `pass@k`, and the `completions` if `save_completions`. `average` is the unweighted mean over benchmarks.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if isinstance(benchmarks, str):
        benchmarks = [benchmarks]
    if backend == "auto":
        backend = "vllm" if _is_vllm_llm(model) else "transformers"
    elif backend == "vllm" and not _is_vllm_llm(model):
        raise ValueError("backend='vllm' needs a `vllm.LLM` as model; run_eval builds one from a model path.")
    elif backend == "transformers" and _is_vllm_llm(model):
        raise ValueError("backend='transformers' needs a transformers model, got a `vllm.LLM`.")

    ks = sorted({1, *(int(k) for k in k_values)})
    for k in ks:
        if k < 1:
            raise ValueError(f"k values must be >= 1, got {k}.")
    skipped = [k for k in ks if k > num_samples]
    if skipped:
        logger.warning(f"pass@k for k={skipped} needs at least k samples per problem (num_samples={num_samples}).")
    ks = [k for k in ks if k <= num_samples]
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(model, backend)
    elif isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")

    from transformers import set_seed

    set_seed(seed)
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    results: dict[str, Any] = {
        "config": {
            "benchmarks": [_benchmark_label(b) for b in benchmarks],
            "num_samples": num_samples,
            "k_values": ks,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "limit": limit,
            "backend": backend,
            "system_prompt": system_prompt,
            "prompt_suffix": prompt_suffix,
            "chat_template": chat,
            "seed": seed,
        },
        "benchmarks": {},
    }

    for benchmark in benchmarks:
        label = _benchmark_label(benchmark)
        rows = load_benchmark(benchmark, limit=limit)
        prompts = [
            build_prompt(row["prompt"], tokenizer, system_prompt, prompt_suffix, use_chat_template) for row in rows
        ]
        logger.info(f"{label}: generating {num_samples} sample(s) for {len(rows)} problems with {backend}.")
        # Looked up at each call, so that a redirected (or captured) stderr gets the bar.
        progress = None if disable_tqdm else {"desc": label, "file": sys.stderr}
        # Chosen here rather than bound at import time, so that a replaced module function is the one called.
        generate = _generate_vllm if backend == "vllm" else _generate_transformers
        completions = generate(
            model,
            tokenizer,
            prompts,
            num_samples,
            temperature,
            top_p,
            max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            # A chat template writes its own special tokens (BOS included); a plain prompt gets the tokenizer's.
            add_special_tokens=not chat,
            progress=progress,
        )
        results["benchmarks"][label] = _score(rows, prompts, completions, ks, save_completions)

    scores = results["benchmarks"].values()
    results["average"] = {f"pass@{k}": sum(s[f"pass@{k}"] for s in scores) / max(len(scores), 1) for k in ks}
    return results


def _score(
    rows: list[dict], prompts: list[str], completions: list[list[str]], ks: list[int], save_completions: bool
) -> dict:
    """Scores every sample of every problem and aggregates pass@k over the benchmark."""
    flat_completions = [text for samples in completions for text in samples]
    flat_answers = [row["answer"] for row, samples in zip(rows, completions) for _ in samples]
    flat_scores = math_verify_reward(flat_completions, flat_answers)

    records = []
    offset = 0
    for index, (row, samples) in enumerate(zip(rows, completions)):
        scores = flat_scores[offset : offset + len(samples)]
        offset += len(samples)
        num_correct = sum(score == 1.0 for score in scores)
        record = {
            "index": index,
            "prompt": row["prompt"],
            "answer": row["answer"],
            "num_correct": num_correct,
            "scores": scores,
            "extracted_answers": [extract_final_answer(text) for text in samples],
            **{f"pass@{k}": pass_at_k(len(samples), num_correct, k) for k in ks},
        }
        if save_completions:
            record["completions"] = samples
        records.append(record)

    num_problems = len(records)
    summary = {
        "num_problems": num_problems,
        "num_samples": len(completions[0]) if completions else 0,
        "num_correct": sum(r["num_correct"] for r in records),
        "num_unverifiable": sum(any(score is None for score in r["scores"]) for r in records),
        **{f"pass@{k}": sum(r[f"pass@{k}"] for r in records) / num_problems if num_problems else 0.0 for k in ks},
        "example_prompt": prompts[0] if prompts else None,
        "records": records,
    }
    return summary


def write_results(results: dict, path: str | Path) -> Path:
    """
    Writes the results of [`evaluate`] as indented JSON, creating parent directories.

    Args:
        results (`dict`): Output of [`evaluate`] or [`run_eval`].
        path (`str` or `Path`): Destination file.

    Returns:
        `Path`: The file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def format_table(results: dict) -> str:
    """
    Formats the results of [`evaluate`] as a plain-text table: one row per benchmark (problems, samples per problem,
    pass@k in percent) and an unweighted average row.

    Args:
        results (`dict`): Output of [`evaluate`] or [`run_eval`].

    Returns:
        `str`: The table, without a trailing newline.
    """
    benchmarks = results.get("benchmarks", {})
    ks = results.get("config", {}).get("k_values") or [1]
    header = ["Benchmark", "Problems", "Samples", *(f"pass@{k}" for k in ks)]
    lines = [
        [name, str(b["num_problems"]), str(b["num_samples"]), *(f"{100 * b[f'pass@{k}']:.1f}" for k in ks)]
        for name, b in benchmarks.items()
    ]
    if len(benchmarks) > 1 and "average" in results:
        problems = sum(b["num_problems"] for b in benchmarks.values())
        lines.append(["Average", str(problems), "", *(f"{100 * results['average'][f'pass@{k}']:.1f}" for k in ks)])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(row) for row in lines)])


@dataclass
class EvalArguments:
    """
    Arguments of [`run_eval`] and of `trl-hpt eval`, parseable with [`~transformers.HfArgumentParser`] /
    [`~trl.TrlParser`] (so also from a YAML config).

    Defaults follow the paper's evaluation setup where it is known (prompt suffix, temperature 0.6, top-p 0.95, 8192
    new tokens on a GPU); use `--num_samples 16 --k 1 16` for the avg@16 / pass@16 numbers of small benchmarks such
    as AIME. On the CPU, `max_new_tokens` defaults to 512, with a warning (see [`evaluate`]).
    """

    model_name_or_path: str = field(metadata={"help": "Local model directory or Hugging Face Hub model id."})
    benchmarks: list[str] = field(
        default_factory=lambda: list(BENCHMARKS),
        metadata={"help": f"Benchmarks to run: shipped names ({', '.join(BENCHMARKS)}) or JSON/JSONL paths."},
    )
    num_samples: int = field(default=1, metadata={"help": "Completions sampled per problem."})
    k: list[int] = field(
        default_factory=lambda: [1],
        metadata={"help": "k values of the pass@k to report (pass@1 always is); each must be <= num_samples."},
    )
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature; 0 for greedy decoding."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold (top-k is disabled)."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": f"Maximum number of generated tokens per completion. Default: {DEFAULT_MAX_NEW_TOKENS} (the "
            f"paper's) on a GPU or with vLLM, {CPU_MAX_NEW_TOKENS} on the CPU (with a warning)."
        },
    )
    batch_size: int = field(
        default=8, metadata={"help": "transformers backend: sequences (prompts x samples) per generate call."}
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems of each benchmark."})
    output_file: str | None = field(
        default="eval_results.json", metadata={"help": "Where to write the JSON results; empty to skip."}
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "Generation backend: 'vllm', 'transformers', or 'auto' (vLLM when installed and CUDA is available).",
            "choices": list(BACKENDS),
        },
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype ('auto' keeps the checkpoint's).", "choices": list(DTYPES)}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the model repository."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed for sampling."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    prompt_suffix: str = field(
        default=DEFAULT_PROMPT_SUFFIX, metadata={"help": "Instruction appended to every problem; empty for none."}
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "Format prompts with the tokenizer's chat template when it has one."}
    )
    save_completions: bool = field(default=True, metadata={"help": "Keep every completion text in the JSON records."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "vLLM backend: context length (prompt + completion); default: the model's."}
    )
    disable_tqdm: bool = field(
        default=False, metadata={"help": "Hide the progress bars (shown on stderr, per benchmark)."}
    )

    def __post_init__(self):
        if isinstance(self.benchmarks, str):
            self.benchmarks = [self.benchmarks]
        if isinstance(self.k, int):
            self.k = [self.k]
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")


def run_eval(args: EvalArguments) -> dict:
    """
    Loads `args.model_name_or_path` (a local directory or a Hub id), evaluates it with [`evaluate`], writes the JSON
    results to `args.output_file` and prints the table.

    The vLLM backend is used when `args.backend` is `"vllm"`, or `"auto"` with vLLM installed and a CUDA device;
    otherwise the model is loaded with `AutoModelForCausalLM.from_pretrained` onto the GPU if there is one.

    Args:
        args ([`EvalArguments`]): The evaluation settings.

    Returns:
        `dict`: The results of [`evaluate`], with `config.model_name_or_path` and `config.arguments` (all of `args`)
        filled in.
    """
    from transformers import AutoTokenizer

    backend = args.backend
    if backend == "auto":
        backend = "vllm" if _vllm_usable() else "transformers"
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)

    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("backend='vllm' needs vLLM: pip install 'trl-hpt[vllm]'.")
        from vllm import LLM

        llm_kwargs = {"max_model_len": args.max_model_len} if args.max_model_len else {}
        model = LLM(
            model=args.model_name_or_path,
            dtype=args.dtype,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
            **llm_kwargs,
        )
    else:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, dtype=dtype, trust_remote_code=args.trust_remote_code
        )
        model.to("cuda" if torch.cuda.is_available() else "cpu")

    results = evaluate(
        model,
        tokenizer,
        benchmarks=args.benchmarks,
        num_samples=args.num_samples,
        k_values=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        backend=backend,
        system_prompt=args.system_prompt,
        prompt_suffix=args.prompt_suffix,
        use_chat_template=args.use_chat_template,
        seed=args.seed,
        save_completions=args.save_completions,
        disable_tqdm=args.disable_tqdm,
    )
    results["config"] = {"model_name_or_path": args.model_name_or_path, **results["config"], "arguments": asdict(args)}
    if args.output_file:
        path = write_results(results, args.output_file)
        logger.info(f"Wrote evaluation results to {path}.")
    print(format_table(results))
    return results
