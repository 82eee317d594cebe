"""The KL term (`beta > 0`) acts on rollout rows only.

GRPOTrainer adds `beta * KL(pi_theta || pi_ref)` per token, estimated with the k3 estimator
`exp(ref - lp) - (ref - lp) - 1` from the reference model's log-probs of the rollout. HPTTrainer applies it to rollout
rows and not to demonstration rows (no reference pass is run for them): a demonstration row's gradient is the same
with and without the KL term, and a rollout row's gradient changes by exactly the KL term's gradient, weighted and
aggregated like the rest of the policy term.
"""

import pytest
import torch

from trl_hpt.batch import hpt_rows, replace_rows
from trl_hpt.testing import assert_same, gated_trainer, generation_batch, loss_and_grads, per_token_logps, tiny_model


G = 4
BETA = 0.1


@pytest.fixture
def model_dir(tmp_path, char_tokenizer):
    # beta > 0 makes GRPOTrainer load the reference model from the policy's path: a local directory here.
    path = tmp_path / "tiny"
    tiny_model(char_tokenizer).save_pretrained(str(path))
    return str(path)


def _trainer(tmp_path, tokenizer, model_dir, **overrides):
    # The first two prompts are never solved: switch sends them to SFT.
    return gated_trainer(tmp_path / "out", tokenizer, model=model_dir, beta=BETA, **overrides)


def with_beta(trainer, batch, beta):
    trainer.beta = beta
    return loss_and_grads(trainer, batch)


def explicit_kl(trainer, batch, rows, loss_type, bias_correction):
    """
    `beta * KL` over `rows`, weighted by the rows' HPT weights and aggregated as the config's `loss_type` aggregates, times the
    importance ratio `pi_theta / pi_old` with `use_bias_correction_kl` (value 1 on-policy, but not its gradient).
    """
    trainer.model.zero_grad()
    mask = batch["completion_mask"].float()
    logps = per_token_logps(trainer, batch)
    log_ratio = batch["ref_per_token_logps"][rows] - logps[rows]
    per_token = BETA * (torch.exp(log_ratio) - log_ratio - 1) * mask[rows]
    if bias_correction:
        per_token = per_token * torch.exp(logps[rows] - logps[rows].detach())
    weights = hpt_rows(batch).weights[rows]
    # Demonstrations are rows of the policy term unless they form their own token mean.
    separate = trainer.demonstration_spec.aggregation == "token_mean"
    policy_rows = ~hpt_rows(batch).demonstration if separate else torch.ones_like(hpt_rows(batch).demonstration)
    if loss_type == "dapo":
        loss = (weights * per_token.sum(-1)).sum() / batch["num_items_in_batch"]
    else:  # grpo: per-sequence token mean, over the policy rows of the batch
        loss = (weights * per_token.sum(-1) / mask[rows].sum(-1).clamp(min=1)).sum() / policy_rows.sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def test_a_training_step_with_kl_runs_and_logs_it(tmp_path, char_tokenizer, model_dir):
    trainer = _trainer(tmp_path, char_tokenizer, model_dir, max_steps=2)
    assert trainer.ref_model is not None
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(torch.isfinite(torch.tensor([h["loss"], h["kl"]])).all() for h in logs)
    # The first step starts at the reference (KL 0); after one update the policy has moved away from it.
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[1]["kl"] > 0
    assert logs[0]["hpt/sft_fraction"] == 0.5
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(trainer.model.parameters(), before))


@pytest.mark.parametrize("bias_correction", [True, False], ids=["bias_correction", "plain"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_kl_term_acts_on_rollout_rows_only(tmp_path, char_tokenizer, model_dir, loss_type, bias_correction):
    trainer = _trainer(
        tmp_path, char_tokenizer, model_dir, loss_type=loss_type, use_bias_correction_kl=bias_correction
    )
    # Move the policy off the reference: at pi_theta = pi_ref the KL term and its gradient are zero.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = generation_batch(trainer, G)
    demonstration, weights = hpt_rows(batch).demonstration, hpt_rows(batch).weights
    rollouts = ~demonstration & (weights > 0)
    assert demonstration.sum() == 2 and rollouts.sum() == 2 * G

    # Demonstration rows alone: the KL term changes neither loss nor gradient.
    demos = replace_rows(batch, weights=torch.where(demonstration, weights, torch.zeros_like(weights)))
    with_kl, without_kl = with_beta(trainer, demos, BETA), with_beta(trainer, demos, 0.0)
    assert without_kl[0] > 0
    assert_same(with_kl, without_kl, atol=0, rtol=0)

    # Rollout rows alone, and the whole batch: the KL term adds exactly beta * KL over the rollouts.
    kl = explicit_kl(trainer, batch, rollouts, loss_type, bias_correction)
    assert kl[0] > 0 and any(g.abs().max() > 0 for g in kl[1])
    online = replace_rows(batch, weights=torch.where(demonstration, torch.zeros_like(weights), weights))
    for inputs in (online, batch):
        with_kl, without_kl = with_beta(trainer, inputs, BETA), with_beta(trainer, inputs, 0.0)
        difference = (with_kl[0] - without_kl[0], [a - b for a, b in zip(with_kl[1], without_kl[1])])
        assert_same(difference, kl, atol=1e-6, rtol=1e-4)


def test_kl_term_gives_finite_gradients_on_improbable_demonstrations(tmp_path, char_tokenizer):
    """
    Demonstrations have no reference log-probs (their slots hold a fill value). The KL term must not be evaluated on
    them in a way that overflows: with a token log-prob below about -88, `exp(ref - lp)` is inf in float32, and the
    zero gradient that masks the row out becomes `0 * inf = NaN`.
    """
    # A very confident model: scaled (tied) embeddings give logits in the hundreds, so most tokens, the
    # demonstrations' included, have log-probs far below -88.
    model = tiny_model(char_tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(300)
    path = tmp_path / "confident"
    model.save_pretrained(str(path))
    trainer = _trainer(tmp_path, char_tokenizer, str(path), loss_type="dapo")
    batch = generation_batch(trainer, G)
    demonstration = hpt_rows(batch).demonstration
    assert demonstration.any()

    logps = per_token_logps(trainer, batch)
    assert logps[demonstration][batch["completion_mask"][demonstration].bool()].min() < -100

    loss, grads = with_beta(trainer, batch, BETA)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)
    # And the term still leaves the demonstrations' gradient as it is without KL.
    demos = replace_rows(
        batch, weights=torch.where(demonstration, hpt_rows(batch).weights, torch.zeros_like(hpt_rows(batch).weights))
    )
    assert_same(with_beta(trainer, demos, BETA), with_beta(trainer, demos, 0.0), atol=0, rtol=0)
