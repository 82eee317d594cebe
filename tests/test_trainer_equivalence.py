"""HPT's limiting cases equal their reference implementations, numerically."""

import pytest
import torch
from trl import GRPOTrainer

from trl_hpt.testing import addition_rows, dense_reward, make_trainer, tiny_model


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": "dapo"},
        {"loss_type": "grpo"},
        {"loss_type": "dr_grpo"},
        {"loss_type": "bnpo"},
        {"loss_type": "dapo", "importance_sampling_level": "sequence"},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_feedback_rl_is_grpo(tmp_path, char_tokenizer, overrides):
    common = dict(per_device_train_batch_size=8, steps_per_generation=2, max_steps=3, **overrides)
    rows = [{"prompt": r["prompt"]} for r in addition_rows([(a, 9 - a) for a in range(10)])]

    initial = _params(tiny_model(char_tokenizer))
    grpo = make_trainer(tmp_path / "grpo", char_tokenizer, rows, dense_reward, trainer_cls=GRPOTrainer, **common)
    grpo.train()
    # A prompt-only GRPO dataset, unchanged: feedback="rl" needs no demonstrations.
    hpt = make_trainer(tmp_path / "hpt", char_tokenizer, rows, dense_reward, feedback="rl", **common)
    hpt.train()
    assert hpt.state.global_step == grpo.state.global_step == 3

    moved = 0.0
    for (name, p_grpo), (_, p_hpt) in zip(grpo.model.named_parameters(), hpt.model.named_parameters()):
        update = (p_grpo.detach() - initial[name]).abs().max().item()
        moved = max(moved, update)
        torch.testing.assert_close(p_hpt.detach(), p_grpo.detach(), atol=1e-6, rtol=1e-5, msg=name)
    assert moved > 1e-3, "the runs must actually move the weights"
    # The logs are GRPOTrainer's plus HPT's.
    assert "hpt/prompt_accuracy" in hpt.state.log_history[0] and "reward" in hpt.state.log_history[0]
    assert hpt.state.log_history[0]["hpt/sft_fraction"] == 0.0


def test_feedback_sft_is_a_cross_entropy_sgd_step(tmp_path, char_tokenizer):
    """One SGD step of feedback='sft' equals SGD on the token-mean cross-entropy of the demonstrations."""
    # Prompts of equal length so that left padding does not shift positions; demonstrations of different lengths.
    pairs = [(1, 2), (7, 8), (9, 9), (4, 0)]
    rows = addition_rows(pairs)
    lr = 0.1
    model = tiny_model(char_tokenizer)
    reference = tiny_model(char_tokenizer)
    trainer = make_trainer(
        tmp_path, char_tokenizer, rows, dense_reward, model=model, feedback="sft", max_steps=1, learning_rate=lr
    )
    trainer.train()

    # By hand: every prompt's demonstration (answer + EOS), prompt as context, token-mean over all their tokens.
    tok = char_tokenizer
    losses, count = [], 0
    for row in rows:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logits = reference(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
        count += len(answer)
    loss = torch.stack(losses).sum() / count
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= lr * p.grad
    for (name, p_hpt), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_hpt.detach(), p_ref.detach(), atol=1e-6, rtol=1e-5, msg=name)
    log = trainer.state.log_history[0]
    assert log["hpt/sft_fraction"] == 1.0 and log["hpt/rl_fraction"] == 0.0
    assert log["hpt/demonstration_loss"] == pytest.approx(loss.item(), rel=1e-5)
