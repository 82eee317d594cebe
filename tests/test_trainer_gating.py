"""Per-prompt gating: weights, demonstration placement, row skipping and the metrics."""

import logging

import pytest
import torch

from trl_hpt.batch import hpt_rows, replace_rows
from trl_hpt.testing import (
    PAIRS,
    addition_rows,
    count_forward_rows,
    dense_reward,
    generation_batch,
    loss_and_grads,
    make_trainer,
    per_token_logps,
    slot_reward,
    train_args,
)


G = 4
PROMPTS = [row["prompt"] for row in addition_rows(PAIRS)]


def rollout_index_reward(correct_per_prompt):
    """Marks the first k rollouts of each prompt correct, k = correct_per_prompt[prompt]: P = k / G exactly."""
    rows = [{"prompt": prompt} for prompt in correct_per_prompt]
    return slot_reward(rows, list(correct_per_prompt.values()), G, wrong=0.0)


def correct_counts(*counts):
    """{prompt: number of correct rollouts} for the prompts of PAIRS, in order."""
    return dict(zip(PROMPTS, counts))


@pytest.mark.parametrize("gate", [0.0, 0.5])
def test_switch_sends_exactly_the_unsolved_prompts_to_sft(tmp_path, char_tokenizer, gate):
    rows = addition_rows(PAIRS)
    k = correct_counts(0, 1, 2, 4)
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        rows,
        rollout_index_reward(k),
        switch_gate=gate,
        demonstration_aggregation="token_mean",
    )
    out = generation_batch(trainer, G)
    accuracy = torch.tensor([k[r["prompt"]] / G for r in rows])
    to_sft = accuracy <= gate
    demonstration, weights = hpt_rows(out).demonstration.view(-1, G), hpt_rows(out).weights.view(-1, G)
    # Exactly the gated prompts get their demonstration, in the last slot, with weight beta = 1.
    assert demonstration[:, -1].tolist() == to_sft.tolist() and not demonstration[:, :-1].any()
    assert weights[to_sft].tolist() == [[0.0, 0.0, 0.0, 1.0]] * int(to_sft.sum())
    assert weights[~to_sft].tolist() == [[1.0] * G] * int((~to_sft).sum())
    for row, demo in zip(
        out["completion_ids"].view(len(rows), G, -1)[to_sft, -1], [r for r, s in zip(rows, to_sft) if s]
    ):
        expected = char_tokenizer(demo["completion"], add_special_tokens=False)["input_ids"] + [
            char_tokenizer.eos_token_id
        ]
        assert (
            row[: len(expected)].tolist() == expected and (row[len(expected) :] == char_tokenizer.pad_token_id).all()
        )
    metrics = trainer._metrics["train"]
    assert metrics["hpt/sft_fraction"][-1] == pytest.approx(to_sft.float().mean().item())
    assert metrics["hpt/rl_fraction"][-1] == pytest.approx(1 - to_sft.float().mean().item())
    assert metrics["hpt/prompt_accuracy"][-1] == pytest.approx(accuracy.mean().item())
    # global token count is recomputed over the rows the policy term sees (demonstration rows excluded for sft)
    mask = out["completion_mask"][~hpt_rows(out).demonstration]
    assert out["num_items_in_batch"].item() == mask.sum().item()
    assert hpt_rows(out).separate_tokens == out["completion_mask"][hpt_rows(out).demonstration].sum().item()


@pytest.mark.parametrize(
    "feedback, expected",
    [
        ("soft", lambda p: (1.0, 1.0)),
        ("linear", lambda p: (p, 1 - p)),
        ("rl", lambda p: (1.0, 0.0)),
        ("sft", lambda p: (0.0, 1.0)),
        (lambda p: (0.5 + p, 2.0 if p < 0.3 else 0.0), None),
    ],
    ids=["soft", "linear", "rl", "sft", "callable"],
)
def test_feedback_strategies_produce_their_weights(tmp_path, char_tokenizer, feedback, expected):
    rows = addition_rows(PAIRS)
    k = correct_counts(0, 1, 2, 4)
    kwargs = {"feedback": feedback} if isinstance(feedback, str) else {}
    trainer = make_trainer(tmp_path, char_tokenizer, rows, rollout_index_reward(k), **kwargs)
    if callable(feedback):
        trainer.feedback_fn, expected = feedback, feedback
    out = generation_batch(trainer, G)
    if feedback == "rl":
        # Nothing of HPT's in the batch: it is GRPOTrainer's own, trained by GRPOTrainer's loss.
        assert hpt_rows(out) is None
        return
    weights, demonstration = hpt_rows(out).weights.view(-1, G), hpt_rows(out).demonstration.view(-1, G)
    for i, row in enumerate(rows):
        alpha, beta = expected(k[row["prompt"]] / G)
        assert demonstration[i, -1].item() == (beta > 0)
        assert weights[i, -1].item() == pytest.approx(beta if beta > 0 else alpha)
        assert weights[i, :-1].tolist() == pytest.approx([alpha] * (G - 1))


@pytest.mark.parametrize("demonstration_loss", ["luffy", "srft", "chord_phi"])
def test_offline_losses_train_end_to_end(tmp_path, char_tokenizer, demonstration_loss):
    rows = addition_rows(PAIRS)
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        rows,
        dense_reward,
        feedback="soft",
        demonstration_loss=demonstration_loss,
        max_steps=2,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(trainer.model.parameters(), before))
    assert trainer.state.log_history[0]["hpt/sft_fraction"] == 1.0


def test_luffy_advantages_include_the_demonstration_in_the_group(tmp_path, char_tokenizer):
    """A group nobody solves has no GRPO signal; with LUFFY the demonstration (reward 1) gives it one."""
    rows = addition_rows(PAIRS)
    k = correct_counts(0, 1, 2, 4)

    def reward(prompts, completions, solution, **kwargs):
        # demonstrations are scored with the same function: they are correct answers
        return [
            1.0 if str(c).strip() == s else (1.0 if i % G < k[p] else 0.0)
            for i, (p, c, s) in enumerate(zip(prompts, completions, solution))
        ]

    trainer = make_trainer(
        tmp_path, char_tokenizer, rows, reward, feedback="soft", demonstration_loss="luffy", scale_rewards="none"
    )
    out = generation_batch(trainer, G)
    adv = out["advantages"].view(-1, G)
    # prompt 0: rollouts all wrong (unless one happens to be right), demo right -> [-.25, -.25, -.25, .75]
    completions = out["completion_ids"].view(len(rows), G, -1)
    for i, row in enumerate(rows):
        texts = char_tokenizer.batch_decode(completions[i, :-1], skip_special_tokens=True)
        rewards = torch.tensor(
            [1.0 if t.strip() == row["solution"] or j < k[row["prompt"]] else 0.0 for j, t in enumerate(texts)] + [1.0]
        )
        torch.testing.assert_close(adv[i], rewards - rewards.mean())


def test_zero_weight_rows_are_skipped_with_identical_loss_and_gradients(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    k = correct_counts(0, 0, 2, 4)
    trainer = make_trainer(tmp_path, char_tokenizer, rows, rollout_index_reward(k), loss_type="grpo")
    batch = generation_batch(trainer, G)
    sizes = count_forward_rows(trainer)
    trainer._skip_zero_weight_rows = True
    loss_skip, grads_skip = loss_and_grads(trainer, batch)
    trainer._skip_zero_weight_rows = False  # every row through the model, same weights
    loss_all, grads_all = loss_and_grads(trainer, batch)
    assert sizes == [2 * 1 + 2 * G, 4 * G]  # two gated groups keep only their demonstration row
    torch.testing.assert_close(loss_skip, loss_all, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_skip, grads_all):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rank_with_only_zero_weight_rows_still_runs_forward_backward(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    trainer = make_trainer(tmp_path, char_tokenizer, rows, rollout_index_reward(correct_counts(0, 0, 0, 0)))
    batch = generation_batch(trainer, G)
    batch = replace_rows(batch, weights=torch.zeros_like(hpt_rows(batch).weights))
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_conversational_demonstration_tokens_are_the_assistant_turn(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS, conversational=True)
    trainer = make_trainer(tmp_path, char_tokenizer, rows, dense_reward)
    for row in trainer.train_dataset:
        demo_ids = trainer.demonstrations.lookup(row).ids
        full = char_tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)[
            "input_ids"
        ]
        prompt = char_tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        assert demo_ids == full[len(prompt) :]
        tokens = char_tokenizer.convert_ids_to_tokens(demo_ids)
        assert tokens == [*row["solution"], "<|end|>"]


def test_standard_demonstration_is_completion_plus_eos(tmp_path, char_tokenizer):
    trainer = make_trainer(tmp_path, char_tokenizer, addition_rows(PAIRS), dense_reward)
    for row in trainer.train_dataset:
        ids = trainer.demonstrations.lookup(row).ids
        assert char_tokenizer.convert_ids_to_tokens(ids) == [*row["completion"], "<|end|>"]


def test_missing_demonstration_column_is_named(tmp_path, char_tokenizer):
    rows = [{"prompt": "1+2=", "answer": "3"}]
    with pytest.raises(
        ValueError, match=r"no demonstration column 'completion'.*\['prompt', 'answer'\].*demonstration_column"
    ):
        make_trainer(tmp_path, char_tokenizer, rows, dense_reward)
    with pytest.raises(ValueError, match="'target'"):
        make_trainer(tmp_path, char_tokenizer, rows, dense_reward, demonstration_column="target")


def test_rows_without_demonstration_train_by_rl_and_are_counted(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    rows[0]["completion"], rows[1]["completion"] = None, "  "
    trainer = make_trainer(
        tmp_path, char_tokenizer, rows, rollout_index_reward(dict.fromkeys([r["prompt"] for r in rows], 0))
    )
    out = generation_batch(trainer, G)
    demonstration, weights = hpt_rows(out).demonstration.view(-1, G), hpt_rows(out).weights.view(-1, G)
    assert demonstration[:, -1].tolist() == [False, False, True, True]
    assert weights[:2].tolist() == [[1.0] * G] * 2  # RL only, as under GRPO
    assert trainer._metrics["train"]["hpt/no_demo_fraction"][-1] == 0.5


def test_long_demonstration_is_truncated_once_and_counted(tmp_path, char_tokenizer, caplog):
    rows = addition_rows(PAIRS)
    rows[2]["completion"] = "1234567890"
    with caplog.at_level(logging.WARNING, logger="trl_hpt"):
        trainer = make_trainer(
            tmp_path,
            char_tokenizer,
            rows,
            rollout_index_reward(dict.fromkeys([r["prompt"] for r in rows], 0)),
            max_demonstration_length=5,
        )
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 4" in warnings[0].getMessage()
    assert len(trainer.demonstrations.lookup(trainer.train_dataset[2]).ids) == 5
    generation_batch(trainer, G)
    assert trainer._metrics["train"]["hpt/demo_truncated_fraction"][-1] == 0.25


def test_reward_none_counts_as_neither_success_nor_failure(tmp_path, char_tokenizer):
    """None (NaN) rewards are skipped, as GRPOTrainer skips them: P is over scored rollouts, unknown P is not SFT."""
    rows = addition_rows(PAIRS)
    # prompt 0: nothing scored; prompt 1: one unscored, one correct of three scored; prompt 2: all wrong; 3: solved.
    table = {0: [None] * G, 1: [None, 1.0, 0.0, 0.0], 2: [0.0] * G, 3: [1.0] * G}
    index = {row["prompt"]: i for i, row in enumerate(rows)}

    def reward(prompts, completions, **kwargs):
        return [table[index[p]][i % G] for i, p in enumerate(prompts)]

    trainer = make_trainer(tmp_path, char_tokenizer, rows, reward)
    out = generation_batch(trainer, G)
    demonstration, weights = hpt_rows(out).demonstration.view(-1, G), hpt_rows(out).weights.view(-1, G)
    # Only prompt 2 (scored, never correct) goes to SFT; the unscored prompt trains as GRPO would (weight 1).
    assert demonstration[:, -1].tolist() == [False, False, True, False]
    assert weights[0].tolist() == [1.0] * G
    metrics = trainer._metrics["train"]
    assert metrics["hpt/prompt_accuracy"][-1] == pytest.approx((1 / 3 + 0 + 1) / 3)  # mean over known P
    assert metrics["hpt/unscored_fraction"][-1] == 0.25
    assert [r["accuracy"] for r in trainer.gate_history[-4:]] == [None, pytest.approx(1 / 3), 0.0, 1.0]


def test_verifier_reward_index_selects_one_function(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    always = lambda completions, **kw: [1.0] * len(completions)  # noqa: E731
    never = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    trainer = make_trainer(tmp_path, char_tokenizer, rows, [always, never], verifier_reward_index=1)
    generation_batch(trainer, G)
    assert trainer._metrics["train"]["hpt/prompt_accuracy"][-1] == 0.0
    with pytest.raises(ValueError, match="verifier_reward_index=2"):
        make_trainer(tmp_path, char_tokenizer, rows, [always, never], verifier_reward_index=2)


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo", "grpo"])
@pytest.mark.parametrize("aggregation", ["token_mean", "loss_type"])
def test_offline_aggregation_loss_equals_its_closed_form(tmp_path, char_tokenizer, aggregation, loss_type):
    """
    token_mean: L = sum_rollouts(TRL's loss_type) + c * (sum of demonstration -log p) / (demonstration tokens).
    loss_type: demonstration rows are rows of the policy term with per-token loss -log p and weight c * beta.
    """
    rows = addition_rows(PAIRS)
    k = correct_counts(0, 1, 0, 4)
    coef = 0.5
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        rows,
        rollout_index_reward(k),
        loss_type=loss_type,
        scale_rewards="none",
        demonstration_loss_coef=coef,
        demonstration_aggregation=aggregation,
    )
    assert trainer.demonstration_spec.aggregation == aggregation
    batch = generation_batch(trainer, G)
    loss = trainer._compute_loss(trainer.model, dict(batch))

    with torch.no_grad():
        logps = per_token_logps(trainer, batch)
    mask = batch["completion_mask"].float()
    demonstration, weight = hpt_rows(batch).demonstration, hpt_rows(batch).weights
    # One update per generation batch: the ratio is 1, a rollout token's loss is -A; a demonstration token's -log p.
    per_token = torch.where(demonstration.unsqueeze(1), -logps, -batch["advantages"].view(-1, 1).expand_as(logps))
    row_weight = torch.where(demonstration, coef * weight, weight).unsqueeze(1)
    policy = ~demonstration if aggregation == "token_mean" else torch.ones_like(demonstration)
    weighted = per_token * row_weight * mask
    if loss_type == "dr_grpo":
        expected = weighted[policy].sum() / (policy.sum() * trainer.max_completion_length)
    elif loss_type == "dapo":
        expected = weighted[policy].sum() / mask[policy].sum()
    else:
        expected = (weighted[policy].sum(1) / mask[policy].sum(1)).sum() / policy.sum()
    if aggregation == "token_mean":
        expected = expected + weighted[demonstration].sum() / mask[demonstration].sum()
    assert demonstration.sum() == 2
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)


def test_offline_aggregation_is_validated(tmp_path):
    with pytest.raises(ValueError, match="demonstration_aggregation='sum'"):
        train_args(tmp_path, demonstration_aggregation="sum")
    with pytest.raises(ValueError, match="demonstration_loss='luffy'"):
        train_args(tmp_path, demonstration_loss="luffy", demonstration_aggregation="token_mean")
    assert (
        train_args(tmp_path, demonstration_loss="luffy", demonstration_aggregation="loss_type").demonstration_loss
        == "luffy"
    )


@pytest.mark.parametrize(
    "feedback, demonstration_loss, expected",
    [
        ("sft", "sft", "token_mean"),  # no RL term: exactly cross-entropy training
        ("switch", "sft", "loss_type"),  # beside an RL term: a demonstration token weighs a rollout token's
        ("linear", "chord_phi", "loss_type"),
        ("soft", "luffy", "loss_type"),
    ],
)
def test_default_offline_aggregation_depends_on_whether_an_rl_term_exists(
    tmp_path, char_tokenizer, feedback, demonstration_loss, expected
):
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        addition_rows(PAIRS),
        dense_reward,
        feedback=feedback,
        demonstration_loss=demonstration_loss,
    )
    assert trainer.args.demonstration_aggregation is None
    assert trainer.demonstration_spec.aggregation == expected


def test_gate_decision_is_a_pure_function_of_accuracy_and_demonstrations():
    from trl_hpt.config import HPTConfig
    from trl_hpt.feedback import STRATEGIES, decide_gate

    # HPTConfig's choices are the registry's names.
    assert HPTConfig.__dataclass_fields__["feedback"].metadata["choices"] == list(STRATEGIES)
    accuracy = torch.tensor([0.0, 0.25, float("nan"), 1.0, 0.0])
    has_demo = torch.tensor([True, True, True, True, False])
    expected = {
        "switch": ([0, 1, 1, 1, 1], [1, 0, 0, 0, 0]),
        "linear": ([0, 0.25, 1, 1, 1], [1, 0.75, 0, 0, 0]),
        "soft": ([1, 1, 1, 1, 1], [1, 1, 1, 1, 0]),
        "rl": ([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]),
        "sft": ([0, 0, 0, 0, 1], [1, 1, 1, 1, 0]),  # a prompt without a demonstration is left to RL
    }
    for name, (alpha, beta) in expected.items():
        decision = decide_gate(name, accuracy, has_demo)
        assert decision.alpha.tolist() == pytest.approx(alpha), name
        assert decision.beta.tolist() == pytest.approx(beta), name
        assert decision.placed.tolist() == [b > 0 for b in beta], name
    with pytest.raises(ValueError, match="Unknown feedback strategy 'sometimes'"):
        decide_gate("sometimes", accuracy, has_demo)
