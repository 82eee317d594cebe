"""Skipping zero-weight rows in the loss pass changes nothing: loss, gradients and every logged value.

HPT's switch gate gives the rollouts of a prompt sent to SFT weight zero; the loss pass leaves those rows out of the
forward. Each configuration of the GRPO parity tests is checked here with demonstrations in play, against the same
pass with every row run through the model.
"""

import pytest
import torch
from datasets import Dataset

from tests.conftest import assert_same, generation_batch, slot_reward, tiny_model, train_args
from tests.test_parity import CONFIGS
from trl_hpt import HPTTrainer
from trl_hpt.demo import addition_rows


G = 4
PAIRS = [(1, 2), (3, 4), (5, 5), (2, 7)]
# The first two prompts are never solved (switch sends them to SFT: their rollouts get weight zero).
NUM_CORRECT = [0, 0, 2, 1]


def _trainer(tmp_path, tokenizer, overrides):
    rows = addition_rows(PAIRS)
    model = tiny_model(tokenizer)
    if overrides.get("beta"):
        model.save_pretrained(str(tmp_path / "policy"))
        model = str(tmp_path / "policy")
    args = train_args(tmp_path / "out", per_device_train_batch_size=len(rows) * G, num_generations=G, **overrides)
    return HPTTrainer(
        model=model,
        reward_funcs=slot_reward(rows, NUM_CORRECT, G),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def _off_policy(trainer, batch):
    """The batch as a later update sees it: old log-probs apart from the current ones, so ratios clip and mask."""
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, batch["completion_ids"].size(1)
        )
    noise = torch.empty_like(logps).uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(0))
    return dict(batch, old_per_token_logps=logps + noise)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_skipping_zero_weight_rows_changes_no_loss_gradient_or_metric(tmp_path, char_tokenizer, name):
    trainer = _trainer(tmp_path, char_tokenizer, CONFIGS[name])
    batch = _off_policy(trainer, generation_batch(trainer, G))
    assert int((batch["hpt_weight"] == 0).sum()) == 2 * (G - 1)  # two gated groups' rollouts
    sizes = []
    forward = trainer._get_per_token_logps_and_entropies

    def counting(model, input_ids, *args, **kwargs):
        sizes.append(input_ids.size(0))
        return forward(model, input_ids, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = counting

    def run(skip):
        trainer._skip_zero_weight_rows = skip
        trainer._metrics["train"].clear()
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, dict(batch))
        loss.backward()
        logged = {k: list(v) for k, v in trainer._metrics["train"].items()}
        return (loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]), logged

    # Adaptive entropy updates its controller on every call: start both passes from the same state.
    state = (trainer.entropy_coef, trainer._last_world_entropy)
    skipped, logged_skipped = run(skip=True)
    trainer.entropy_coef, trainer._last_world_entropy = state
    full, logged_full = run(skip=False)
    assert sizes == [len(PAIRS) * G - 2 * (G - 1), len(PAIRS) * G]
    assert_same(skipped, full, atol=1e-6, rtol=1e-5)
    assert logged_skipped.keys() == logged_full.keys()
    for key in logged_full:
        assert logged_skipped[key] == pytest.approx(logged_full[key], rel=1e-5, abs=1e-7, nan_ok=True), key


def _tiny_moe(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        output_router_logits=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def test_router_aux_loss_is_the_same_with_skipping(tmp_path, char_tokenizer):
    """A router's aux loss is over every token it routes, so with one the loss pass keeps every row."""
    rows = addition_rows(PAIRS)
    args = train_args(tmp_path, per_device_train_batch_size=len(rows) * G, num_generations=G)
    trainer = HPTTrainer(
        model=_tiny_moe(char_tokenizer),
        reward_funcs=slot_reward(rows, NUM_CORRECT, G),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=char_tokenizer,
    )
    assert trainer.aux_loss_enabled
    batch = generation_batch(trainer, G)

    def run(skip):
        trainer._skip_zero_weight_rows = skip
        trainer._metrics["train"].clear()
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, dict(batch))
        loss.backward()
        return (loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]), list(
            trainer._metrics["train"]["aux_loss"]
        )

    skipped, aux_skipped = run(True)
    full, aux_full = run(False)
    assert_same(skipped, full, atol=1e-6, rtol=1e-5)
    assert aux_skipped == pytest.approx(aux_full, rel=1e-6)
