"""`HPTTrainer(feedback="rl")` is `GRPOTrainer`: same parameters and the same logged metrics, step by step.

Each configuration trains three times on the same data: `GRPOTrainer`; `HPTTrainer(feedback="rl")` as shipped (a batch
with nothing of HPT's in it goes to GRPOTrainer's own loss); and HPTTrainer with that hand-off switched off, so its
own hybrid loss pass (the one demonstrations go through) must reproduce GRPOTrainer's arithmetic and metrics itself.
"""

import math

import pytest
import torch
from trl import GRPOTrainer

from trl_hpt import HPTTrainer
from trl_hpt.testing import LOSS_CONFIGS, addition_rows, dense_reward, make_trainer, tiny_model


# Wall-clock keys differ between any two runs.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
ROWS = [{"prompt": r["prompt"]} for r in addition_rows([(a, 9 - a) for a in range(10)])]


def _run(trainer_cls, tmp_path, tokenizer, overrides, delegate=True):
    # Two optimizer updates per generation batch (num_iterations=2) make the ratios, clipping and masks non-trivial.
    extra = {} if trainer_cls is GRPOTrainer else {"feedback": "rl"}
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        ROWS,
        dense_reward,
        trainer_cls=trainer_cls,
        per_device_train_batch_size=8,
        steps_per_generation=2,
        num_iterations=2,
        max_steps=3,
        **extra,
        **overrides,
    )
    if not delegate:
        trainer._delegate_plain_batches = False
    trainer.train()
    return trainer


def _assert_same_logs(grpo_logs, hpt_logs, hybrid):
    assert len(grpo_logs) == len(hpt_logs)
    for step, (expected, got) in enumerate(zip(grpo_logs, hpt_logs)):
        missing = set(expected) - set(got)
        extra = {k for k in set(got) - set(expected) if not k.startswith("hpt/")}
        assert not missing and not extra, f"log {step}: missing {missing}, unexpected {extra}"
        for key, value in expected.items():
            if key in TIMING_KEYS or not isinstance(value, float | int):
                continue
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), (step, key)
                continue
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"log {step}, {key} (hybrid pass: {hybrid})"


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_feedback_rl_equals_grpo_trainer_in_parameters_and_logs(tmp_path, char_tokenizer, name):
    overrides = LOSS_CONFIGS[name]
    grpo = _run(GRPOTrainer, tmp_path / "grpo", char_tokenizer, overrides)
    initial = dict(tiny_model(char_tokenizer).named_parameters())
    moved = max((p.detach() - initial[n]).abs().max().item() for n, p in grpo.model.named_parameters())
    assert moved > 1e-3, "the runs must actually move the weights"
    for delegate in (True, False):
        hpt = _run(HPTTrainer, tmp_path / f"hpt_{delegate}", char_tokenizer, overrides, delegate=delegate)
        assert hpt.state.global_step == grpo.state.global_step == 3
        for (param_name, p_grpo), (_, p_hpt) in zip(grpo.model.named_parameters(), hpt.model.named_parameters()):
            torch.testing.assert_close(
                p_hpt.detach(), p_grpo.detach(), atol=1e-6, rtol=1e-5, msg=f"{param_name} (delegate={delegate})"
            )
        _assert_same_logs(grpo.state.log_history, hpt.state.log_history, hybrid=not delegate)
        if not delegate:
            assert "hpt/rl_loss" in hpt.state.log_history[0]  # the hybrid pass really ran
