"""The estimator's presets and aggregations against TRL's own GRPOTrainer code on the same tensors."""

import pytest
import torch
from trl import GRPOTrainer

from trl_hpt.estimator import aggregate_loss, group_advantages, per_token_policy_loss, rollout_spec_from_grpo_config
from trl_hpt.testing import build_char_tokenizer, generation_batch, make_trainer


B, P, T, G = 8, 3, 6, 4


@pytest.fixture(scope="module")
def grpo_trainer(tmp_path_factory):
    trainer = make_trainer(
        tmp_path_factory.mktemp("grpo"),
        build_char_tokenizer(),
        [{"prompt": "1+1="}] * 4,
        lambda completions, **kw: [0.0] * len(completions),
        trainer_cls=GRPOTrainer,
        num_generations=G,
        per_device_train_batch_size=B,
    )
    trainer.model.train()
    return trainer


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old = lp.detach() + torch.empty(B, T, dtype=torch.float64).uniform_(-0.8, 0.8, generator=g)
    lengths = torch.tensor([6, 2, 5, 1, 6, 4, 3, 6])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    inputs = {
        "prompt_ids": torch.ones(B, P, dtype=torch.long),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.randn(B, generator=g, dtype=torch.float64),
        "old_per_token_logps": old,
        # the generation batch spans steps_per_generation micro-batches: more tokens than this one holds
        "num_items_in_batch": torch.tensor(float(mask.sum()) * 3.5),
    }
    return lp, inputs


CASES = [
    (loss_type, level) for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo") for level in ("token", "sequence")
]


@pytest.mark.parametrize("loss_type, level", CASES)
@pytest.mark.parametrize("delta", [None, 1.3])
def test_preset_with_trl_aggregation_equals_trl_compute_loss(grpo_trainer, monkeypatch, loss_type, level, delta):
    trainer = grpo_trainer
    args = trainer.args
    epsilon_high = 5.0 if loss_type == "cispo" else 0.28
    for name, value in {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "epsilon": 0.2,
        "epsilon_high": epsilon_high,
        "delta": delta,
        "steps_per_generation": 4,
        "max_completion_length": 7,
    }.items():
        monkeypatch.setattr(args, name, value)
    for name, value in {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "epsilon_low": 0.2,
        "epsilon_high": epsilon_high,
        "max_completion_length": 7,
        "current_gradient_accumulation_steps": 2,
        "beta": 0.0,
    }.items():
        monkeypatch.setattr(trainer, name, value, raising=False)

    lp, inputs = _inputs(seed=len(loss_type) * 7 + (level == "sequence") + (delta is not None) * 3)
    entropies = torch.zeros(B, T, dtype=torch.float64)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", lambda *a, **k: (lp, entropies, None))
    trl_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, lp)

    spec = rollout_spec_from_grpo_config(args)
    per_token = per_token_policy_loss(
        spec, lp, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"]
    )
    ours = aggregate_loss(
        per_token,
        inputs["completion_mask"],
        loss_type,
        max_completion_length=7,
        num_items_in_batch=inputs["num_items_in_batch"],
        num_processes=1,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
    )
    (our_grad,) = torch.autograd.grad(ours, lp)
    torch.testing.assert_close(ours, trl_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(our_grad, trl_grad, atol=1e-12, rtol=1e-10)
    assert trl_grad.abs().sum() > 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(tmp_path, char_tokenizer, scale):
    values = [1.0, 0.0, None, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.25, 1.0, 0.75, None, None, None, 2.0]

    def reward(prompts, completions, **kwargs):
        return values[: len(completions)]

    rows = [{"prompt": f"{i}+1="} for i in range(4)]
    trainer = make_trainer(tmp_path, char_tokenizer, rows, reward, trainer_cls=GRPOTrainer, scale_rewards=scale)
    out = generation_batch(trainer, G)
    rewards = torch.tensor([float("nan") if v is None else v for v in values])
    torch.testing.assert_close(group_advantages(rewards, G, scale), out["advantages"], atol=1e-6, rtol=1e-6)
