"""The paper's comparison (SFT, GRPO, SFT->GRPO, LUFFY, SRFT, HPT) at toy scale, on CPU, with nothing to download.

**Task.** Two-digit addition, `"27+45="` -> `"72"`, with `a, b` in `[0, 50)`: prompts and answers have a fixed width,
so no prompt is ever padded (left padding would shift positions between generation and training). Every problem comes
with its demonstration (the answer). A fixed split (seed 0) sets aside `held_out` problems for evaluation; the others
are the post-training prompts.

**Partial competence.** A tiny Qwen2-style model (random init) is warm-started by SFT on the *no-carry* post-training
problems only (units digits summing to less than 10). It then solves held-out no-carry problems but none with a carry
(about 45% of problems): its rollouts on those are never correct, so RL alone has no signal there, while SFT on
demonstrations does. This is the regime HPT is designed for: some prompts solvable (RL), others not (SFT).

**Methods**, each from the same warm-started weights, with the same number of optimizer steps, the same prompts per
step, the same rollouts per prompt and the same generation length (so the same generation budget: the table reports
the completion tokens each method actually generated):

- `sft`: `HPTTrainer(feedback="sft")`; `sft_trl`: TRL's `SFTTrainer` on the same demonstrations, the same number of
  demonstrations per step (it generates nothing); `sft_trl_grpo_order`: the same `SFTTrainer` drawing the prompts as
  GRPOTrainer does for the seed (the same permutation, but at an epoch's end the prompts that do not fill a batch are
  dropped and a new permutation starts), so that it pairs with the GRPOTrainer-based methods prompt for prompt (only
  run when asked for: on the plain task that difference in the last 20 of 300 steps moved no-carry accuracy by about 5
  points);
- `grpo`: `HPTTrainer(feedback="rl")`; `grpo_trl`: TRL's `GRPOTrainer` (these two are the same run numerically);
- `sft_grpo`: `sft_grpo_sft_fraction` of the steps `feedback="sft"` (a quarter, chosen on the validation split from
  1/4, 1/2, 3/4), then the rest `feedback="rl"` (a fresh optimizer, as in an SFT -> RL pipeline);
- `luffy`: `feedback="soft", demonstration_loss="luffy"`; `srft`: `feedback="soft", demonstration_loss="srft"`;
- `hpt`: `feedback="switch", switch_gate=0, demonstration_aggregation="token_mean"` (a separate token mean over the
  demonstrations, the default before 0.1); `hpt_lt`: the same with `demonstration_aggregation="loss_type"` (demonstration
  tokens reduced with the rollout tokens, HPTConfig's default with any feedback but `sft`); `hpt_solved`: `hpt_lt`
  with `solved_advantage=1` (the correct rollouts of prompts solved every time train as SFT on the model's own answers,
  so what the warm start solves is not forgotten); `hpt_coef2`: `hpt_lt` with `demonstration_loss_coef=2` (the
  configuration with the best mean validation accuracy over the plain and spaced tasks); `hpt_chord`: `hpt_lt` with CHORD-phi demonstrations
  (`demonstration_loss="chord_phi"`, each demonstration token weighted by `p (1 - p)`; only run when asked for);
  `hpt_kl`: `hpt_lt` with a KL penalty to the warm start on the rollouts that train (`beta=kl_beta`), which keeps
  pulling solved prompts back where the warm start had them although their all-correct groups have advantage 0
  (only run when asked for); `hpt_custom`: `hpt_lt` with the HPTConfig fields of `custom_fields` (for sweeps on the
  validation split, `--set custom_fields=solved_advantage=1,demonstration_loss_coef=0.25`).

**Hyper-parameters**: the paper's HPT recipe at toy scale for every method (`loss_type="dr_grpo"`,
`scale_rewards="none"`, no KL, one update per generation batch, `demonstration_loss_coef=1.0`), AdamW with one constant learning
rate for all (see `LearningSettings.learning_rate`), and a second learning rate for SFT, GRPO and HPT to show how much
the ranking depends on it.

**Validation.** `validation` problems (128 by default) are set aside from the post-training prompts (the held-out
problems stay the same) and every run is also evaluated on them: settings are chosen on these numbers only, and the
held-out numbers are reported on the same split. `validation=0` trains on every post-training prompt.

**Metrics** on the held-out problems: greedy accuracy (all, with-carry, no-carry), and pass@k for k = 1, 4 from `n`
sampled completions per problem at the training temperature (unbiased estimator `1 - C(n-c, k) / C(n, k)`), mean and
std over seeds; held-out greedy accuracy over training steps; HPT's share of prompts sent to SFT per step.

Usage:

    python benchmarks/learning.py                 # 5 seeds, every method: under 30 minutes on 2 shared CPU cores
    python benchmarks/learning.py --quick         # smoke test: 1 seed, a few steps
    python benchmarks/learning.py --methods hpt sft --seeds 1
    # a new configuration against stored baselines of the same seeds (methods after ":" taken from that file):
    python benchmarks/learning.py --report base/learning.json:sft_trl,grpo_trl new/learning.json --out-dir merged
    # five more seeds of a stored comparison, then all ten together:
    python benchmarks/learning.py --seed-list 5 6 7 8 9 --methods sft_trl grpo_trl --out-dir more
    python benchmarks/learning.py --report base/learning.json more/learning.json --out-dir merged
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    custom_fields,
    generation_inputs,
    machine_info,
    pass_at_k,
    read_report_argument,
    settings_differences,
    settings_overrides,
    setup_environment,
    share,
    shared_training_values,
    write_json,
)
from benchmarks.report import LEARNING_METHODS as METHODS  # noqa: E402
from benchmarks.report import (  # noqa: E402
    brief_learning,
    learning_aggregate,
    learning_paired,
    machine_line,
    render,
)


# The HPTConfig fields of each method trained by HPTTrainer (the others: TRL's trainers, or a sequence of these).
# HPTConfig's defaults with the benchmark's gate spelled out; the HPT variants below change one or two fields of it.
_HPT_DEFAULTS = {"feedback": "switch", "switch_gate": 0.0, "demonstration_aggregation": "loss_type"}
HPT_FIELDS = {
    "sft": {"feedback": "sft"},
    "grpo": {"feedback": "rl"},
    "luffy": {"feedback": "soft", "demonstration_loss": "luffy"},
    "srft": {"feedback": "soft", "demonstration_loss": "srft"},
    "hpt": {**_HPT_DEFAULTS, "demonstration_aggregation": "token_mean"},
    "hpt_lt": _HPT_DEFAULTS,
    "hpt_solved": {**_HPT_DEFAULTS, "solved_advantage": 1.0},
    "hpt_chord": {**_HPT_DEFAULTS, "demonstration_loss": "chord_phi"},
    # The best mean validation accuracy over the plain and spaced tasks of the configurations swept in
    # docs/benchmarks.md.
    "hpt_coef2": {**_HPT_DEFAULTS, "demonstration_loss_coef": 2.0},
    # beta: LearningSettings.kl_beta; the fields of LearningSettings.custom_fields (see method_fields).
    "hpt_kl": _HPT_DEFAULTS,
    "hpt_custom": _HPT_DEFAULTS,
}
# Measured once as remedies (docs/benchmarks.md) and left out of the default run.
NOT_DEFAULT = ("hpt_chord", "hpt_kl", "hpt_custom", "sft_trl_grpo_order")


@dataclass
class LearningSettings:
    """Every knob of the benchmark; `quick()` shrinks it to a smoke test."""

    seeds: int = 5
    # Task
    max_operand: int = 50
    held_out: int = 128
    # Problems set aside from the post-training prompts to choose settings on (0: none, every prompt trains).
    validation: int = 128
    # Model and warm start
    hidden_size: int = 64
    num_layers: int = 2
    warmup_steps: int = 300
    # "no_carry": the warm start sees only the no-carry post-training problems (no carry problem is ever solved, so
    # RL has no signal there). "sample": it sees `warm_start_size` random post-training problems of both kinds, which
    # leaves the model solving many problems some of the time: headroom for RL on prompts it partly solves.
    warm_start_set: str = "no_carry"
    warm_start_size: int = 400
    warmup_lr: float = 2e-3
    warmup_batch: int = 32
    # "plain": demonstrations are the answer as the warm-started model writes it ("72"). "spaced": its digits with a
    # space between ("7 2"), a style the model never wrote; the verifier accepts both.
    demonstration_style: str = "plain"
    # Post-training (the same for every method)
    steps: int = 300
    prompts_per_step: int = 8
    num_generations: int = 8
    max_completion_length: int = 4
    # One rate for every method: the largest of {1e-4, 3e-4, 1e-3} at which pure GRPO does not degrade the warm start
    # (at 1e-3 Adam makes RL unstable here; at 1e-4 SFT barely learns the carry). See docs/benchmarks.md.
    learning_rate: float = 3e-4
    temperature: float = 1.0
    demonstration_loss_coef: float = 1.0
    # Share of the steps `sft_grpo` spends on SFT before GRPO: of 1/4, 1/2 and 3/4, the best mean validation accuracy
    # over the plain and spaced tasks (docs/benchmarks.md).
    sft_grpo_sft_fraction: float = 0.25
    # KL coefficient of the `hpt_kl` method (every other method trains without KL).
    kl_beta: float = 0.1
    # HPTConfig fields of the `hpt_custom` method, as `field=value` strings (values read as Python literals).
    custom_fields: tuple[str, ...] = ()
    # Evaluation
    eval_every: int = 25
    eval_samples: int = 8
    pass_k: tuple[int, ...] = (1, 4)
    # A second learning rate for a few methods, to show how much the ranking depends on it (None: skipped).
    sensitivity_lr: float | None = 1e-3
    sensitivity_methods: tuple[str, ...] = ("sft", "grpo", "hpt")

    @classmethod
    def quick(cls) -> LearningSettings:
        return cls(
            seeds=1,
            held_out=32,
            validation=16,
            warmup_steps=40,
            steps=4,
            prompts_per_step=4,
            num_generations=4,
            eval_every=2,
            eval_samples=4,
        )


# ------------------------------------------------------------------------------------------------------------------
# Task
# ------------------------------------------------------------------------------------------------------------------


def prompt_text(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}="


def answer_text(a: int, b: int, max_operand: int = 50) -> str:
    width = len(str(2 * (max_operand - 1)))
    return f"{a + b:0{width}d}"


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def task_split(
    max_operand: int, held_out: int, seed: int = 0, validation: int = 0
) -> dict[str, list[tuple[int, int]]]:
    """
    Held-out problems, validation problems (the next `validation` of the same shuffle, so the held-out problems do
    not depend on it), post-training problems, and the no-carry part of the latter (the warm-start set).
    """
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(pairs)
    held, valid, train = pairs[:held_out], pairs[held_out : held_out + validation], pairs[held_out + validation :]
    return {
        "held_out": held,
        "validation": valid,
        "train": train,
        "warm_start": [p for p in train if not has_carry(*p)],
    }


def warm_start_problems(split: dict, settings: LearningSettings) -> list[tuple[int, int]]:
    """The problems of the warm start (see `LearningSettings.warm_start_set`); the same for every seed."""
    if settings.warm_start_set == "no_carry":
        return split["warm_start"]
    if settings.warm_start_set == "sample":
        return random.Random(1).sample(split["train"], settings.warm_start_size)
    raise ValueError(f"warm_start_set must be 'no_carry' or 'sample', got {settings.warm_start_set!r}")


def task_rows(pairs, max_operand: int = 50, style: str = "plain") -> list[dict]:
    """Prompt / demonstration (`completion`) / `solution` rows: the format HPTTrainer and SFTTrainer both read."""
    if style not in ("plain", "spaced"):
        raise ValueError(f"demonstration_style must be 'plain' or 'spaced', got {style!r}")
    rows = []
    for a, b in pairs:
        answer = answer_text(a, b, max_operand)
        demonstration = answer if style == "plain" else " ".join(answer)
        rows.append({"prompt": prompt_text(a, b), "completion": demonstration, "solution": answer})
    return rows


def exact_match(completions, solution, **kwargs) -> list[float]:
    """Verifier: 1.0 when the completion is exactly the answer."""
    return [float(str(c).strip() == str(s)) for c, s in zip(completions, solution)]


def digits_match(completions, solution, **kwargs) -> list[float]:
    """Verifier of the `"spaced"` task: 1.0 when the completion's characters but spaces are exactly the answer."""
    return [float(str(c).replace(" ", "") == str(s)) for c, s in zip(completions, solution)]


def task_reward(settings: LearningSettings):
    return digits_match if settings.demonstration_style == "spaced" else exact_match


# ------------------------------------------------------------------------------------------------------------------
# Warm start and evaluation
# ------------------------------------------------------------------------------------------------------------------


def warm_start(model, tokenizer, pairs, settings: LearningSettings, seed: int):
    """SFT on `pairs`: cross-entropy on the answer and EOS, prompt as context; fixed width, so no padding."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.warmup_lr)
    model.train()
    prompt_len = len(prompt_text(0, 0))
    for _ in range(settings.warmup_steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(settings.warmup_batch)]
        ids = torch.tensor(
            [
                tokenizer(prompt_text(a, b) + answer_text(a, b, settings.max_operand), add_special_tokens=False)[
                    "input_ids"
                ]
                + [tokenizer.eos_token_id]
                for a, b in batch
            ]
        )
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _generate(model, tokenizer, pairs, max_new_tokens: int, **kwargs) -> list[str]:
    import torch

    ids = torch.tensor([tokenizer(prompt_text(a, b), add_special_tokens=False)["input_ids"] for a, b in pairs])
    ids = ids.to(model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    model.train(was_training)
    return tokenizer.batch_decode(out[:, ids.size(1) :], skip_special_tokens=True)


def greedy_correct(model, tokenizer, pairs, settings: LearningSettings) -> list[bool]:
    texts = _generate(model, tokenizer, pairs, settings.max_completion_length, do_sample=False)
    reward = task_reward(settings)
    return [bool(r) for r in reward(texts, [answer_text(a, b, settings.max_operand) for a, b in pairs])]


def sampled_correct_counts(model, tokenizer, pairs, settings: LearningSettings, seed: int) -> list[int]:
    """Number of correct completions among `eval_samples` sampled per problem, at the training temperature."""
    import torch

    n = settings.eval_samples
    torch.manual_seed(seed)
    texts = _generate(
        model,
        tokenizer,
        pairs,
        settings.max_completion_length,
        do_sample=True,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
    )
    rewards = task_reward(settings)(
        texts, [answer_text(a, b, settings.max_operand) for a, b in pairs for _ in range(n)]
    )
    return [int(sum(rewards[i * n : (i + 1) * n])) for i in range(len(pairs))]


def evaluate(model, tokenizer, pairs, settings: LearningSettings, seed: int) -> dict:
    greedy = greedy_correct(model, tokenizer, pairs, settings)
    counts = sampled_correct_counts(model, tokenizer, pairs, settings, seed)
    carry = [has_carry(*p) for p in pairs]
    result = {
        "greedy": share(greedy),
        "greedy_carry": share(g for g, c in zip(greedy, carry) if c),
        "greedy_no_carry": share(g for g, c in zip(greedy, carry) if not c),
    }
    for k in settings.pass_k:
        result[f"pass@{k}"] = share(pass_at_k(settings.eval_samples, c, k) for c in counts)
        result[f"pass@{k}_carry"] = share(pass_at_k(settings.eval_samples, c, k) for c, y in zip(counts, carry) if y)
    return result


# ------------------------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------------------------


class _History:
    """Callback: held-out greedy accuracy every `eval_every` steps (greedy decoding draws no random numbers, so it
    leaves training untouched) and HPT's gate metrics from the logs."""

    def __init__(self, tokenizer, pairs, settings: LearningSettings, step_offset: int = 0):
        from transformers import TrainerCallback

        history = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % settings.eval_every == 0 or state.global_step == state.max_steps:
                    correct = greedy_correct(model, tokenizer, pairs, settings)
                    history.curve.append((step_offset + state.global_step, sum(correct) / len(correct)))

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "hpt/sft_fraction" in logs:
                    history.gate.append(
                        (
                            step_offset + state.global_step,
                            logs["hpt/sft_fraction"],
                            logs.get("hpt/prompt_accuracy", float("nan")),
                        )
                    )
                if logs and "hpt/imitation_scale" in logs:
                    history.imitation_scale.append((step_offset + state.global_step, logs["hpt/imitation_scale"]))
                if logs and "hpt/style_scale" in logs:
                    step = step_offset + state.global_step
                    history.style.append((step, logs["hpt/style_scale"], logs.get("hpt/style_gap", float("nan"))))
                if logs and "completions/mean_length" in logs:
                    history.generated_tokens += logs["completions/mean_length"] * history.rows_per_step

        self.callback = _Callback()
        self.curve: list[tuple[int, float]] = []
        self.gate: list[tuple[int, float, float]] = []
        self.imitation_scale: list[tuple[int, float]] = []  # imitation_guard's scale, when it is on
        self.style: list[tuple[int, float, float]] = []  # style_gate's (step, scale, batch gap), when it is on
        self.generated_tokens = 0.0
        self.rows_per_step = settings.prompts_per_step * settings.num_generations


def _trainer_values(settings: LearningSettings, output_dir: str, steps: int, seed: int) -> dict:
    """The `TrainingArguments` every method shares, TRL's SFTTrainer included: optimizer, schedule, budget, logging."""
    return shared_training_values(output_dir, settings.learning_rate, steps, seed)


def _grpo_values(settings: LearningSettings, output_dir: str, steps: int, seed: int) -> dict:
    """The settings every generating method shares: the paper's HPT recipe at toy scale."""
    return dict(
        _trainer_values(settings, output_dir, steps, seed),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        loss_type="dr_grpo",
        scale_rewards="none",
        beta=0.0,
    )


def method_fields(method: str, settings: LearningSettings) -> dict:
    """The HPTConfig fields of an HPTTrainer method, with the settings that parametrise it."""
    fields = dict(HPT_FIELDS[method])
    if method == "hpt_kl":
        fields["beta"] = settings.kl_beta
    if method == "hpt_custom":
        fields.update(custom_fields(settings.custom_fields))
    return fields


def _run_hpt(model, tokenizer, dataset, settings, seed, steps, history, trl_grpo=False, **hpt_fields):
    from trl import GRPOConfig, GRPOTrainer

    from trl_hpt import HPTConfig, HPTTrainer

    name_or_path = model.config._name_or_path
    with tempfile.TemporaryDirectory() as tmp:
        values = {**_grpo_values(settings, tmp, steps, seed), **hpt_fields}
        if values["beta"] != 0.0:
            # GRPOTrainer loads its reference model from the path in the model's config: the starting weights.
            start = Path(tmp) / "reference"
            model.save_pretrained(start)
            model.config._name_or_path = str(start)
        if trl_grpo:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=task_reward(settings),
                args=GRPOConfig(**values),
                train_dataset=dataset.remove_columns("completion"),
                processing_class=tokenizer,
                callbacks=[history.callback],
            )
        else:
            trainer = HPTTrainer(
                model=model,
                reward_funcs=task_reward(settings),
                args=HPTConfig(**{"demonstration_loss_coef": settings.demonstration_loss_coef, **values}),
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[history.callback],
            )
        try:
            trainer.train()
        finally:
            model.config._name_or_path = name_or_path
    return trainer


def _run_sft_trl(model, tokenizer, dataset, settings, seed, steps, history, grpo_order=False):
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.grpo_trainer import RepeatSampler

    class GRPOOrderSFTTrainer(SFTTrainer):
        """SFTTrainer drawing its prompts in the order GRPOTrainer draws them for the same seed (one row each)."""

        def _get_train_sampler(self, *args, **kwargs):
            # GRPOTrainer's sampler with one generation per prompt and one optimizer step per generation batch: the
            # same permutation of the prompts, in chunks of prompts_per_step.
            return RepeatSampler(
                self.train_dataset, mini_repeat_count=1, batch_size=settings.prompts_per_step, seed=self.args.seed
            )

    trainer_class = GRPOOrderSFTTrainer if grpo_order else SFTTrainer
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            **_trainer_values(settings, tmp, steps, seed),
            # The same demonstrations per step as feedback="sft" trains on: one per prompt.
            per_device_train_batch_size=settings.prompts_per_step,
        )
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=dataset.select_columns(["prompt", "completion"]),
            processing_class=tokenizer,
            callbacks=[history.callback],
        )
        trainer.train()
    return trainer


def run_method(method: str, model, tokenizer, dataset, held_out, settings: LearningSettings, seed: int) -> dict:
    """Trains `model` in place with `method`; returns its curve, gate history and generated-token count."""
    steps = settings.steps
    history = _History(tokenizer, held_out, settings)
    if method in HPT_FIELDS:
        _run_hpt(model, tokenizer, dataset, settings, seed, steps, history, **method_fields(method, settings))
    elif method in ("sft_trl", "sft_trl_grpo_order"):
        _run_sft_trl(
            model, tokenizer, dataset, settings, seed, steps, history, grpo_order=method == "sft_trl_grpo_order"
        )
    elif method == "grpo_trl":
        _run_hpt(model, tokenizer, dataset, settings, seed, steps, history, trl_grpo=True)
    elif method == "sft_grpo":
        first = round(steps * settings.sft_grpo_sft_fraction)
        _run_hpt(model, tokenizer, dataset, settings, seed, first, history, **HPT_FIELDS["sft"])
        second = _History(tokenizer, held_out, settings, step_offset=first)
        # Another data seed for the RL half, so it does not replay the SFT half's prompts in the same order.
        _run_hpt(model, tokenizer, dataset, settings, seed + 10_000, steps - first, second, **HPT_FIELDS["grpo"])
        history.curve += second.curve
        history.gate += second.gate
        history.generated_tokens += second.generated_tokens
    else:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    record = {"curve": history.curve, "gate": history.gate, "generated_tokens": round(history.generated_tokens)}
    if history.imitation_scale:
        record["imitation_scale"] = history.imitation_scale
    if history.style:
        record["style_gate"] = history.style
    return record


# ------------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------------


def gradient_scale_diagnostic(model, tokenizer, dataset, settings: LearningSettings, seed: int) -> dict:
    """
    Norms of the gradients of the two terms of the hybrid loss on one batch, from the warm-started weights.

    One generation batch of `prompts_per_step` training prompts (half with a carry) is built per method, then the loss
    is evaluated twice with the weights of the other term's rows set to zero: the denominators stay those of the whole
    micro-batch, so the two gradients add up to the full one. With Adam the update follows the sum, so a term whose
    gradient is much smaller barely steers training.
    """
    import torch

    from trl_hpt import HPTConfig, HPTTrainer
    from trl_hpt.batch import hpt_rows, replace_rows

    carry = [i for i, row in enumerate(dataset) if has_carry(int(row["prompt"][:2]), int(row["prompt"][3:5]))]
    no_carry = [i for i in range(len(dataset)) if i not in set(carry)]
    half = settings.prompts_per_step // 2
    chosen = dataset.select(carry[:half] + no_carry[: settings.prompts_per_step - half])
    out = {}
    for name in ("hpt", "hpt_lt", "luffy", "srft"):
        fields = HPT_FIELDS[name]
        with tempfile.TemporaryDirectory() as tmp:
            values = _grpo_values(settings, tmp, 1, seed)
            values["per_device_train_batch_size"] = len(chosen) * settings.num_generations
            trainer = HPTTrainer(
                model=copy.deepcopy(model),
                reward_funcs=task_reward(settings),
                args=HPTConfig(demonstration_loss_coef=settings.demonstration_loss_coef, **fields, **values),
                train_dataset=chosen,
                processing_class=tokenizer,
            )
        inputs = generation_inputs(trainer, len(chosen), settings.num_generations)
        torch.manual_seed(seed)
        batch = trainer._generate_and_score_completions(inputs)
        rows = hpt_rows(batch)
        demonstration = rows.demonstration
        norms = {}
        for term, keep in (("online", ~demonstration), ("offline", demonstration)):
            partial = replace_rows(batch, weights=rows.weights * keep)
            trainer.model.zero_grad(set_to_none=True)
            trainer._compute_loss(trainer.model, partial).backward()
            grads = [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]
            norms[term] = float(torch.cat(grads).norm()) if grads else 0.0
        online_rows = (~demonstration) & (rows.weights > 0)
        out[name] = {
            "online_grad_norm": norms["online"],
            "offline_grad_norm": norms["offline"],  # the saved reports' key
            "prompts_to_sft": int(demonstration.sum()),
            "online_rows": int(online_rows.sum()),
            "online_rows_nonzero_advantage": int((online_rows & (batch["advantages"].abs() > 0)).sum()),
        }
        if name == "hpt":
            out["demonstration_tokens"] = _demonstration_token_weights(trainer, batch, settings)
        del trainer
    return out


def _demonstration_token_weights(trainer, batch, settings: LearningSettings) -> dict:
    """
    Probability the warm-started model gives the tokens of the placed demonstrations, and the weight each demonstration
    estimator puts on `grad log p` of such a token: SFT 1, SRFT `p`, LUFFY `gamma p / (p + gamma)^2`.
    """
    import torch

    from trl_hpt.batch import hpt_rows
    from trl_hpt.testing import per_token_logps

    demonstration = hpt_rows(batch).demonstration
    if not bool(demonstration.any()):
        return None  # the model solved every prompt of the batch: no demonstration placed
    with torch.no_grad():
        logps = per_token_logps(trainer, batch, rows=demonstration)
    mask = batch["completion_mask"][demonstration].bool()
    p = logps.exp()[mask]
    gamma = trainer.args.demonstration_shaping_gamma
    return {
        "num_tokens": int(mask.sum()),
        "median_p": float(p.median()),
        "mean_p": float(p.mean()),
        "mean_weight_sft": 1.0,
        "mean_weight_srft": float(p.mean()),
        "mean_weight_luffy": float((gamma * p / (p + gamma) ** 2).mean()),
        # The denominators the two aggregations divide by in this batch: token mean vs dr_grpo's rows x max length.
        "sft_denominator_tokens": int(mask.sum()),
        "dr_grpo_denominator": int(batch["completion_ids"].size(0) * settings.max_completion_length),
    }


def run(settings: LearningSettings, methods: list[str], seeds: list[int] | None = None) -> dict:
    from datasets import Dataset

    from trl_hpt.testing import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer(chat_template=False)
    split = task_split(settings.max_operand, settings.held_out, validation=settings.validation)
    dataset = Dataset.from_list(task_rows(split["train"], settings.max_operand, settings.demonstration_style))
    held_out, validation = split["held_out"], split["validation"]
    results = {"split": {k: len(v) for k, v in split.items()}, "seeds": {}}
    results["split"]["held_out_with_carry"] = sum(has_carry(*p) for p in held_out)
    sensitivity = None
    if settings.sensitivity_lr is not None:
        sensitivity = dataclasses.replace(settings, learning_rate=settings.sensitivity_lr)
    for seed in range(settings.seeds) if seeds is None else seeds:
        start = time.time()
        model = build_tiny_model(tokenizer, settings.hidden_size, settings.num_layers, seed=seed)
        warm_start(model, tokenizer, warm_start_problems(split, settings), settings, seed)
        state = copy.deepcopy(model.state_dict())
        per_seed = {"warm_start": evaluate(model, tokenizer, held_out, settings, seed=1000 + seed)}
        if validation:
            per_seed["warm_start_validation"] = evaluate(model, tokenizer, validation, settings, seed=2000 + seed)
        per_seed["warm_start_seconds"] = time.time() - start
        print(
            f"[learning] seed {seed} warm start ({per_seed['warm_start_seconds']:.0f}s): "
            f"{brief_learning(per_seed['warm_start'])}"
        )
        if seed == 0:
            results["gradient_scale"] = gradient_scale_diagnostic(model, tokenizer, dataset, settings, seed)
            print(f"[learning] gradient norms of the loss terms at the warm start: {results['gradient_scale']}")
        runs = [("methods", settings, m) for m in methods]
        if sensitivity is not None:
            runs += [("sensitivity", sensitivity, m) for m in settings.sensitivity_methods]
        for group, method_settings, method in runs:
            start = time.time()
            model.load_state_dict(state)
            record = run_method(method, model, tokenizer, dataset, held_out, method_settings, seed)
            record["final"] = evaluate(model, tokenizer, held_out, method_settings, seed=1000 + seed)
            if validation:
                record["validation"] = evaluate(model, tokenizer, validation, method_settings, seed=2000 + seed)
            record["curve"] = [(0, per_seed["warm_start"]["greedy"]), *record["curve"]]
            record["seconds"] = time.time() - start
            per_seed.setdefault(group, {})[method] = record
            label = method if group == "methods" else f"{method}@lr={method_settings.learning_rate:g}"
            print(
                f"[learning] seed {seed} {label:9s} ({record['seconds']:.0f}s): {brief_learning(record['final'])}"
                + (f"; validation {brief_learning(record['validation'])}" if validation else ""),
                flush=True,
            )
        results["seeds"][seed] = per_seed
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, a few steps, small evaluation")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5; quick: 1)")
    parser.add_argument(
        "--seed-list",
        type=int,
        nargs="+",
        help="run exactly these seeds (more seeds for a stored comparison, or its seeds shared among processes; "
        "merge with --report)",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per method")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=[m for m in METHODS if m not in NOT_DEFAULT]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where learning.{json,md,png} are written")
    parser.add_argument("--json", help="JSON path (default: OUT_DIR/learning.json)")
    parser.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="FIELD=VALUE",
        help="override any LearningSettings field (repeatable)",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON[:METHOD,...]",
        help="train nothing: merge these learning.json files (the same settings; disjoint methods, disjoint seeds or "
        "both; ':m1,m2' takes only those methods from a file) and render them",
    )
    args = parser.parse_args(argv)
    if args.report:
        parts = [read_report_argument(item) for item in args.report]
        return write_report(merge_reports(parts), Path(args.out_dir), args.json)

    setup_environment(args.threads)
    settings = LearningSettings.quick() if args.quick else LearningSettings()
    overrides = settings_overrides(settings, args.set)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.seed_list:
        if len(set(args.seed_list)) != len(args.seed_list):
            parser.error(f"--seed-list {args.seed_list}: a seed is listed twice")
        overrides["seeds"] = len(args.seed_list)
    if args.steps is not None:
        overrides["steps"] = args.steps
    settings = dataclasses.replace(settings, **overrides)

    start = time.time()
    report = {
        "benchmark": "learning",
        "machine": machine_info(),
        "settings": asdict(settings),
        "methods": args.methods,
        "quick": args.quick,
    }
    print(f"[learning] {machine_line(report['machine'])}", flush=True)
    report["results"] = run(settings, args.methods, seeds=args.seed_list)
    report["seconds"] = time.time() - start
    return write_report(report, Path(args.out_dir), args.json)


def summarize(report: dict) -> dict:
    """Adds the aggregates over seeds and the paired differences (HPT variants minus every method) to `report`."""
    settings, methods, results = report["settings"], report["methods"], report["results"]
    report["aggregate"] = learning_aggregate(results, methods)
    if settings.get("validation"):
        report["aggregate_validation"] = learning_aggregate(results, methods, validation=True)
    if settings.get("sensitivity_lr") is not None:
        report["aggregate_sensitivity"] = learning_aggregate(
            results, list(settings["sensitivity_methods"]), "sensitivity"
        )
    report["paired"] = {
        reference: learning_paired(results, methods, reference)
        for reference in ("hpt", "hpt_lt", "hpt_solved", "hpt_coef2", "hpt_custom")
        if reference in methods and len(methods) > 1
    }
    return report


def write_report(report: dict, out_dir: Path, json_path: str | None = None) -> dict:
    """Adds the aggregates and paired differences to `report`, then writes `out_dir/learning.{json,md,png}`."""
    report = summarize(report)
    # The measurements first: a failure to render or plot must not lose them.
    write_json(json_path or out_dir / "learning.json", report, indent=None)
    print(render(report, markdown=out_dir / "learning.md", plot_path=out_dir / "learning.png"))
    print(f"[learning] done in {report['seconds'] / 60:.1f} min; wrote {out_dir}/learning.{{json,md,png}}")
    return report


# Settings that parametrise only some methods, or no method's final numbers: runs that differ in them still pair.
_MERGE_IGNORED = (
    "custom_fields",
    "sensitivity_lr",
    "sensitivity_methods",
    "kl_beta",
    "sft_grpo_sft_fraction",
)


def merge_reports(parts: list[tuple[dict, list[str] | None]]) -> dict:
    """
    One report from runs of the same settings: disjoint methods on the same seeds (a new configuration against stored
    baselines), the same methods on disjoint seeds (more seeds for a stored comparison), or both.

    Args:
        parts (`list[tuple[dict, list[str] | None]]`):
            Each run's report and the methods to take from it (`None`: all of them).

    Every run's settings must agree but for the seed count and those of `_MERGE_IGNORED`, and every run's warm start
    must score the same on every shared seed: the pairs by seed are only pairs if the methods started from the same
    weights. A setting that parametrises one method (`custom_fields`, `kl_beta`, `sft_grpo_sft_fraction`) is taken
    from the runs that have that method, which must agree on it; a method taken from two runs for the same seed is an
    error; a seed that lacks some method is left out, so that every reported seed pairs every method. The
    learning-rate sensitivity runs are not merged.
    """
    if not parts:
        raise ValueError("nothing to merge")
    owners: dict[str, list[dict]] = {}
    claimed: dict[tuple[str, str], dict] = {}
    for report, wanted in parts:
        methods = report["methods"] if wanted is None else wanted
        for method in methods:
            if method not in report["methods"]:
                raise ValueError(f"method {method!r} is not in that run (it has {report['methods']})")
            for seed in report["results"]["seeds"]:
                if (seed, method) in claimed:
                    raise ValueError(f"seed {seed}: method {method!r} is taken from more than one run")
                claimed[(seed, method)] = report
            owners.setdefault(method, []).append(report)
    first = parts[0][0]
    for report, _ in parts[1:]:
        diff = settings_differences(first["settings"], report["settings"], ignore=_MERGE_IGNORED)
        if diff:
            raise ValueError(f"cannot merge runs whose settings differ in {diff}")
    order = [m for m in METHODS if m in owners]
    every_seed = {seed for report, _ in parts for seed in report["results"]["seeds"]}
    seeds = sorted((seed for seed in every_seed if all((seed, m) in claimed for m in order)), key=int)
    if not seeds:
        raise ValueError(f"no seed has every method of {order} in the runs")
    merged_seeds = {}
    for seed in seeds:
        holders = [report for report, _ in parts if seed in report["results"]["seeds"]]
        base = holders[0]["results"]["seeds"][seed]
        for report in holders[1:]:
            other = report["results"]["seeds"][seed]
            for key in ("warm_start", "warm_start_validation"):
                if base.get(key) != other.get(key):
                    raise ValueError(f"seed {seed}: the runs' {key} differ, so their methods did not start alike")
        per_seed = {k: copy.deepcopy(v) for k, v in base.items() if k not in ("methods", "sensitivity")}
        per_seed["methods"] = {
            m: copy.deepcopy(claimed[(seed, m)]["results"]["seeds"][seed]["methods"][m]) for m in order
        }
        merged_seeds[seed] = per_seed
    settings = copy.deepcopy(first["settings"])
    settings.update(seeds=len(merged_seeds), sensitivity_lr=None)
    for field, method in (
        ("custom_fields", "hpt_custom"),
        ("kl_beta", "hpt_kl"),
        ("sft_grpo_sft_fraction", "sft_grpo"),
    ):
        if method in owners:
            values = {json.dumps(r["settings"][field]) for r in owners[method]}
            if len(values) > 1:
                raise ValueError(f"{method!r} is taken from runs whose {field!r} differ: {sorted(values)}")
            settings[field] = owners[method][0]["settings"][field]
    results = {k: v for k, v in first["results"].items() if k != "seeds"}
    # The gradient-scale diagnostic is measured on seed 0, by whichever run had it.
    for report, _ in parts:
        if "gradient_scale" in report["results"]:
            results.setdefault("gradient_scale", report["results"]["gradient_scale"])
    results["seeds"] = merged_seeds
    return {
        "benchmark": "learning",
        "machine": first["machine"],
        "settings": settings,
        "methods": order,
        "quick": first["quick"],
        "results": results,
        "seconds": max(r["seconds"] for r, _ in parts),
        "merged_from": [
            {
                "machine": machine_line(r["machine"]),
                "methods": [m for m in order if any(claimed.get((s, m)) is r for s in seeds)],
                "seeds": [s for s in seeds if any(claimed[(s, m)] is r for m in order)],
            }
            for r, _ in parts
        ],
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
