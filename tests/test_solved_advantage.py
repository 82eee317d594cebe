"""`solved_advantage`: the correct rollouts of solved prompts (P = 1) train as SFT on the model's own answers."""

import pytest
import torch

from trl_hpt.batch import hpt_rows
from trl_hpt.config import HPTConfig
from trl_hpt.testing import PAIRS, addition_rows, generation_batch, loss_and_grads, make_trainer, slot_reward


G = 4


def _trainer(tmp_path, tokenizer, counts, **overrides):
    rows = addition_rows(PAIRS)
    return make_trainer(tmp_path, tokenizer, rows, slot_reward(rows, counts, G, wrong=0.0), **overrides)


@pytest.mark.parametrize("feedback", ["switch", "rl", "soft"])
def test_only_the_rollouts_of_solved_prompts_get_the_advantage(tmp_path, char_tokenizer, feedback):
    counts = [0, 1, 4, 4]  # prompts 2 and 3 solved by every rollout
    extra = {"demonstration_loss": "luffy"} if feedback == "soft" else {}
    torch.manual_seed(0)
    plain = generation_batch(_trainer(tmp_path / "a", char_tokenizer, counts, feedback=feedback, **extra), G)
    torch.manual_seed(0)
    trainer = _trainer(tmp_path / "b", char_tokenizer, counts, feedback=feedback, solved_advantage=0.5, **extra)
    bonus = generation_batch(trainer, G)
    rows = hpt_rows(bonus)
    demonstration = rows.demonstration if rows is not None else torch.zeros(len(PAIRS) * G, dtype=torch.bool)
    expected = plain["advantages"].view(-1, G).clone()
    solved_rows = ~demonstration.view(-1, G)
    solved_rows[:2] = False
    expected[solved_rows] += 0.5
    torch.testing.assert_close(bonus["advantages"].view(-1, G), expected)
    assert (plain["advantages"].view(-1, G)[2:][solved_rows[2:]] == 0).all()  # what the bonus replaces: nothing
    assert trainer._metrics["train"]["hpt/solved_fraction"][-1] == pytest.approx(0.5)


def test_gradient_is_cross_entropy_on_the_own_correct_rollouts(tmp_path, char_tokenizer):
    # Every prompt solved: every rollout has advantage c, and on-policy the dapo loss's gradient is c times that of
    # the mean token cross-entropy of the rollouts.
    c = 0.7
    trainer = _trainer(tmp_path, char_tokenizer, [G] * len(PAIRS), solved_advantage=c, loss_type="dapo")
    batch = generation_batch(trainer, G)
    assert torch.equal(batch["advantages"], torch.full_like(batch["advantages"], c))
    loss, grads = loss_and_grads(trainer, batch)

    def cross_entropy(trainer, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, attention, inputs["completion_ids"].size(1)
        )
        mask = inputs["completion_mask"]
        return -c * (logps * mask).sum() / mask.sum()

    _, expected = loss_and_grads(trainer, batch, cross_entropy)
    assert any(g.abs().max() > 1e-4 for g in expected)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert loss.item() == pytest.approx(-c)  # ratio 1 on-policy


def test_off_by_default_and_validated(tmp_path):
    assert HPTConfig(str(tmp_path), use_cpu=True).solved_advantage == 0.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="solved_advantage"):
            HPTConfig(str(tmp_path), use_cpu=True, solved_advantage=bad)


def test_solved_rollouts_are_the_correct_rollouts_of_fully_solved_prompts():
    from trl_hpt.feedback import prompt_accuracy, solved_rollouts

    # Three prompts, two rollouts each: solved; half solved; solved with one rollout unscored (NaN, left out of P).
    verifier = torch.tensor([1.0, 1.0, 1.0, 0.0, float("nan"), 1.0])
    accuracy = prompt_accuracy(verifier, 2)
    placed = torch.tensor([False, True, False, False, False, False])  # a demonstration in the first group's slot
    assert accuracy.tolist() == [1.0, 0.5, 1.0]
    assert solved_rollouts(verifier, accuracy, placed).tolist() == [True, False, False, False, False, True]
