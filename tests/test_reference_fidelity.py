"""One HPTTrainer configuration reproduces the loss arithmetic of the paper's reference code, on the same batch.

The reference (TsinghuaC3I/Unify-Post-Training, verl: `mix_src/mix_actor.py`, `mix_core_alg.py`,
`trainer/ppo/core_algos.py`, `exp_scripts/train.sh`) computes, per micro-batch, with `switch` removing the rollouts of
the prompts it sends to SFT:

    L = c * mean_{demonstration tokens}(-log p)                       compute_sft_pure_loss, demonstration_loss_coef
        + sum_{rollout tokens}(-A * r) / max_response_length          loss_remove_token_mean, loss_remove_clip
        - 0.001 * mean_{every token of the micro-batch}(entropy)      entropy_coeff, demonstrations included

with `A = R - mean_group(R)` over the prompt's rollouts (grpo_use_std=False), `r = pi_theta / pi_old` unclipped,
gradient accumulation 1 (micro-batches add up), then a gradient clip at 1.0 and no step at all when the norm exceeds 80.
"""

import pytest
import torch

from trl_hpt import HPTConfig
from trl_hpt.batch import hpt_rows
from trl_hpt.testing import PAIRS, addition_rows, dense_reward, generation_batch, make_trainer, slot_reward, train_args


G = 4
NUM_CORRECT = [0, 2, 0, 1]  # prompts 0 and 2 are never solved: switch sends them to SFT
COEF = 0.3
# The paper recipes' HPT configuration of the reference's arithmetic.
REFERENCE = dict(
    feedback="switch",
    switch_gate=0.0,
    demonstration_loss="sft",
    demonstration_aggregation="token_mean",
    rl_aggregation="max_length_sum",
    loss_type="dr_grpo",
    scale_rewards="none",
    epsilon=1e9,  # loss_remove_clip: the ratio is never clipped
    beta=0.0,
    entropy_coef=0.001,
    demonstration_loss_coef=COEF,
    max_grad_norm=1.0,
    skip_grad_norm_above=80.0,
)


def test_one_configuration_reproduces_the_reference_loss_and_gradients(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    trainer = make_trainer(tmp_path, char_tokenizer, rows, slot_reward(rows, NUM_CORRECT, G), **REFERENCE)
    batch = generation_batch(trainer, G)
    model = trainer.model
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, width)
    # A second update on the same rollouts (the reference's second mini-batch): old log-probs differ, r != 1.
    old = logps + torch.empty_like(logps).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(0))
    batch = dict(batch, old_per_token_logps=old)

    model.zero_grad()
    loss = trainer._compute_loss(model, dict(batch))
    loss.backward()
    hpt_grads = [p.grad.clone() for p in model.parameters()]

    # The reference, written from its formulas on the same rows.
    demonstration = hpt_rows(batch).demonstration.view(-1, G)
    sft_prompts = demonstration[:, -1]
    assert sft_prompts.tolist() == [True, False, True, False]
    demo_rows = demonstration.reshape(-1)
    rollout_rows = (~sft_prompts).repeat_interleave(G)  # the RL prompts' rollouts; switch removed the others
    rewards = torch.tensor([1.0 if j < k else 0.2 * j for k in NUM_CORRECT for j in range(G)])
    advantages = (rewards.view(-1, G) - rewards.view(-1, G).mean(1, keepdim=True)).reshape(-1)
    mask = batch["completion_mask"].float()
    model.zero_grad()
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, ids, attention, width, compute_entropy=True
    )
    sft = (-logps * mask)[demo_rows].sum() / mask[demo_rows].sum()
    ratio = torch.exp(logps - old)
    rl = (-advantages.unsqueeze(1) * ratio * mask)[rollout_rows].sum() / trainer.max_completion_length
    kept = demo_rows | rollout_rows
    entropy = (entropies * mask)[kept].sum() / mask[kept].sum()
    reference = COEF * sft + rl - 0.001 * entropy
    reference.backward()

    torch.testing.assert_close(loss.detach(), reference.detach(), atol=1e-6, rtol=1e-6)
    for got, expected in zip(hpt_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5)
    # Not TRL's dr_grpo, which divides the RL term by the number of rows as well.
    assert rl.abs().item() > 1e-3


@pytest.mark.parametrize("threshold, skipped", [(1e-9, True), (1e9, False)])
def test_steps_whose_gradient_norm_exceeds_the_threshold_are_skipped(tmp_path, char_tokenizer, threshold, skipped):
    rows = addition_rows(PAIRS)
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        rows,
        dense_reward,
        max_steps=1,
        optim="adamw_torch",
        max_grad_norm=1.0,
        skip_grad_norm_above=threshold,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
    assert changed is not skipped
    # A skipped step leaves the optimizer as it was: AdamW has no moments yet.
    assert (len(trainer.optimizer.state) == 0) is skipped
    assert trainer.state.log_history[0]["hpt/skipped_step"] == float(skipped)
    assert trainer.state.log_history[0]["grad_norm"] > 0


def test_reference_fields_are_validated(tmp_path):
    with pytest.raises(ValueError, match="rl_aggregation='sum'"):
        train_args(tmp_path, rl_aggregation="sum")
    with pytest.raises(ValueError, match="skip_grad_norm_above must be a positive"):
        train_args(tmp_path, skip_grad_norm_above=0.0)
    assert isinstance(train_args(tmp_path, **REFERENCE), HPTConfig)
