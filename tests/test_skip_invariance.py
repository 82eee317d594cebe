"""Skipping zero-weight rows in the loss pass changes nothing: loss, gradients and every logged value.

HPT's switch gate gives the rollouts of a prompt sent to SFT weight zero; the loss pass leaves those rows out of the
forward. Each configuration of the GRPO parity tests is checked here with demonstrations in play, against the same
pass with every row run through the model.
"""

import pytest
import torch
from transformers import Qwen2MoeConfig

from trl_hpt.batch import hpt_rows
from trl_hpt.testing import (
    LOSS_CONFIGS,
    PAIRS,
    assert_same,
    build_tiny_model,
    count_forward_rows,
    gated_trainer,
    generation_batch,
    loss_and_grads,
    per_token_logps,
)


G = 4


def _off_policy(trainer, batch):
    """The batch as a later update sees it: old log-probs apart from the current ones, so ratios clip and mask."""
    with torch.no_grad():
        logps = per_token_logps(trainer, batch)
    noise = torch.empty_like(logps).uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(0))
    return dict(batch, old_per_token_logps=logps + noise)


def _pass(trainer, batch, skip):
    """Loss and gradients of one loss pass, with zero-weight rows skipped or not, and what it logged."""
    trainer._skip_zero_weight_rows = skip
    trainer._metrics["train"].clear()
    result = loss_and_grads(trainer, batch)
    return result, {k: list(v) for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_skipping_zero_weight_rows_changes_no_loss_gradient_or_metric(tmp_path, char_tokenizer, name):
    # The first two prompts are never solved: switch sends them to SFT, their rollouts get weight zero.
    trainer = gated_trainer(tmp_path / "out", char_tokenizer, **LOSS_CONFIGS[name])
    batch = _off_policy(trainer, generation_batch(trainer, G))
    assert int((hpt_rows(batch).weights == 0).sum()) == 2 * (G - 1)  # two gated groups' rollouts
    sizes = count_forward_rows(trainer)

    # Adaptive entropy updates its controller on every call: start both passes from the same state.
    state = (trainer.entropy_coef, trainer._last_world_entropy)
    skipped, logged_skipped = _pass(trainer, batch, skip=True)
    trainer.entropy_coef, trainer._last_world_entropy = state
    full, logged_full = _pass(trainer, batch, skip=False)
    assert sizes == [len(PAIRS) * G - 2 * (G - 1), len(PAIRS) * G]
    assert_same(skipped, full, atol=1e-6, rtol=1e-5)
    assert logged_skipped.keys() == logged_full.keys()
    for key in logged_full:
        assert logged_skipped[key] == pytest.approx(logged_full[key], rel=1e-5, abs=1e-7, nan_ok=True), key


def _tiny_moe(tokenizer):
    return build_tiny_model(
        tokenizer,
        hidden_size=32,
        config_class=Qwen2MoeConfig,
        tie_word_embeddings=False,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
    )


def test_router_aux_loss_is_the_same_with_skipping(tmp_path, char_tokenizer):
    """A router's aux loss is over every token it routes, so with one the loss pass keeps every row."""
    trainer = gated_trainer(tmp_path, char_tokenizer, model=_tiny_moe(char_tokenizer))
    assert trainer.aux_loss_enabled
    batch = generation_batch(trainer, G)

    skipped, logged_skipped = _pass(trainer, batch, True)
    full, logged_full = _pass(trainer, batch, False)
    assert_same(skipped, full, atol=1e-6, rtol=1e-5)
    assert logged_skipped["aux_loss"] == pytest.approx(logged_full["aux_loss"], rel=1e-6)
