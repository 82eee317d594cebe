"""Regression tests for the findings of a line-by-line review of HPTTrainer against GRPOTrainer.

Each test failed on the trainer before the fix it names (see CHANGELOG); the parity and skip-invariance tests live in
`test_parity.py` and `test_skip_invariance.py`.
"""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trl import GRPOTrainer
from trl.rewards import accuracy_reward, get_soft_overlong_punishment

from trl_hpt import HPTTrainer
from trl_hpt.batch import attach_rows, hpt_rows
from trl_hpt.demonstrations import Demonstration, tokenize_demonstration
from trl_hpt.testing import PAIRS, addition_rows, dense_reward, generation_batch, make_trainer


G = 4
REPO = Path(__file__).resolve().parents[1]


def _demo_advantages(out):
    return out["advantages"].view(-1, G)[:, -1][hpt_rows(out).demonstration.view(-1, G)[:, -1]]


# ---------------------------------------------------------------------------------------------------------------
# Demonstrations are scored through GRPOTrainer's own reward path
# ---------------------------------------------------------------------------------------------------------------


def test_luffy_demonstrations_in_a_solution_column_score_with_trls_accuracy_reward(tmp_path, char_tokenizer):
    # MATH-style rows: the demonstration is the `solution` column that TRL's accuracy_reward reads as gold.
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "solution": f"$\\boxed{{{a + b}}}$"} for a, b in PAIRS
    ]
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        rows,
        accuracy_reward,
        feedback="soft",
        demonstration_loss="luffy",
        demonstration_column="solution",
        scale_rewards="none",
    )
    out = generation_batch(trainer, G)  # raised TypeError: missing 'solution' before
    # A demonstration matches its own gold (reward 1); the random model's rollouts do not (0): A = 1 - 1/4.
    assert _demo_advantages(out).tolist() == pytest.approx([0.75] * len(rows))


@pytest.mark.parametrize(
    "prompt_kind, demonstration, expected_completion",
    [
        ("conversational", {"role": "assistant", "content": "3"}, [{"role": "assistant", "content": "3"}]),
        ("string", [{"role": "assistant", "content": "3"}], "3"),
        ("conversational", "3", [{"role": "assistant", "content": "3"}]),
    ],
    ids=["single-message-dict", "messages-for-string-prompt", "string-for-conversational-prompt"],
)
def test_demonstrations_reach_rewards_in_the_rollouts_format(
    tmp_path, char_tokenizer, prompt_kind, demonstration, expected_completion
):
    prompt = [{"role": "user", "content": "1+2="}] if prompt_kind == "conversational" else "1+2="
    rows = [{"prompt": prompt, "completion": demonstration}]
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append((completions, completion_ids))
        return [1.0 if c == expected_completion else 0.0 for c in completions]

    trainer = make_trainer(tmp_path, char_tokenizer, rows, reward, feedback="soft", demonstration_loss="srft")
    out = generation_batch(trainer, G)
    demo_completions, demo_ids = seen[-1]
    assert demo_completions == [expected_completion]
    assert demo_ids == [trainer.demonstrations.lookup(rows[0]).ids]
    assert _demo_advantages(out).item() > 0  # scored 1, against rollouts scored 0


def test_token_id_rewards_score_demonstrations_by_their_tokens(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    rows[0]["completion"] = "1" * 30  # a long demonstration: DAPO's overlong punishment must see its length
    overlong = get_soft_overlong_punishment(max_completion_len=24, soft_punish_cache=8)
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        rows,
        overlong,
        feedback="soft",
        demonstration_loss="luffy",
        max_completion_length=31,
        scale_rewards="none",
    )
    out = generation_batch(trainer, G)  # completion_ids=None broke this reward before
    rewards = torch.tensor(list(trainer._logs["rewards"][trainer.reward_func_names[0]])[-len(rows) * G :]).view(-1, G)
    advantages = _demo_advantages(out)
    # The long demonstration (31 tokens > 24) scores -1 and sits below its group's mean; the short ones score 0.
    mixed_first = torch.cat([rewards[0, :-1], torch.tensor([-1.0])])
    assert advantages[0].item() == pytest.approx((mixed_first[-1] - mixed_first.mean()).item())


def test_demonstration_format_does_not_depend_on_the_hash_seed(tmp_path):
    """Message prompts with string demonstrations: rewards get messages under every PYTHONHASHSEED."""
    script = textwrap.dedent(
        """
        import sys, tempfile
        sys.path.insert(0, sys.argv[1])
        from trl_hpt.testing import build_char_tokenizer, generation_batch, make_trainer

        tokenizer = build_char_tokenizer()
        rows = [{"prompt": [{"role": "user", "content": "1+2="}], "completion": "3"}]

        def reward(completions, **kwargs):
            assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), completions
            return [1.0] * len(completions)

        trainer = make_trainer(tempfile.mkdtemp(), tokenizer, rows, reward, feedback="soft", demonstration_loss="luffy")
        generation_batch(trainer, 4)
        print("ok")
        """
    )
    for seed in ("0", "1"):  # the reported failure was under seed 1
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        result = subprocess.run(
            [sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0 and "ok" in result.stdout, f"PYTHONHASHSEED={seed}:\n{result.stderr[-3000:]}"


def test_mixed_groups_follow_normalize_then_sum(tmp_path, char_tokenizer):
    from trl_hpt.grpo_mirror import grpo_advantages

    rows = addition_rows(PAIRS)
    always = lambda completions, **kw: [1.0] * len(completions)  # noqa: E731
    trainer = make_trainer(
        tmp_path,
        char_tokenizer,
        rows,
        [dense_reward, always],
        feedback="soft",
        demonstration_loss="luffy",
        multi_objective_aggregation="normalize_then_sum",
    )
    out = generation_batch(trainer, G)
    per_func = torch.stack(
        [torch.tensor(list(trainer._logs["rewards"][name])[-len(rows) * G :]) for name in trainer.reward_func_names], 1
    )
    demos = [r["completion"] for r in rows]
    demo_rewards = torch.tensor([[dense_reward([d])[0], 1.0] for d in demos])
    mixed = per_func.clone().view(-1, G, 2)
    mixed[:, -1] = demo_rewards
    expected = grpo_advantages(mixed.view(-1, 2), torch.ones(2), G, "group", "normalize_then_sum")
    torch.testing.assert_close(out["advantages"], expected)
    # Not the weighted-total recipe the trainer used before.
    other = grpo_advantages(mixed.view(-1, 2), torch.ones(2), G, "group", "sum_then_normalize")
    assert not torch.allclose(out["advantages"], other)


def test_grpo_advantages_equal_grpo_trainers(tmp_path, char_tokenizer):
    """The advantage recipe the mixed groups reuse is GRPOTrainer's, for both aggregations and every scaling."""
    from trl_hpt.grpo_mirror import grpo_advantages

    rows = [{"prompt": r["prompt"]} for r in addition_rows(PAIRS)]
    flaky = lambda completions, **kw: [None if i % 3 == 0 else 0.5 * i for i in range(len(completions))]  # noqa: E731
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        for scale in ("group", "batch", "none"):
            grpo = make_trainer(
                tmp_path,
                char_tokenizer,
                rows,
                [dense_reward, flaky],
                trainer_cls=GRPOTrainer,
                multi_objective_aggregation=aggregation,
                scale_rewards=scale,
                reward_weights=[1.0, 0.5],
            )
            out = generation_batch(grpo, G)
            per_func = torch.stack([torch.tensor(grpo._logs["rewards"][n]) for n in grpo.reward_func_names], 1)
            expected = grpo_advantages(per_func, grpo.reward_weights, G, scale, aggregation)
            torch.testing.assert_close(out["advantages"], expected, msg=f"{aggregation}, {scale}")


# ---------------------------------------------------------------------------------------------------------------
# Widening, padding and denominators
# ---------------------------------------------------------------------------------------------------------------


def test_widening_covers_prompt_plus_completion_keys_and_pads_with_the_pad_token(tmp_path, char_tokenizer):
    trainer = make_trainer(tmp_path, char_tokenizer, addition_rows(PAIRS), dense_reward)
    char_tokenizer.pad_token = "#"  # a pad id other than 0, so padding with 0 would show
    prompt_width, width, rows = 3, 2, 4
    output = {
        "prompt_ids": torch.randint(10, 20, (rows, prompt_width)),
        "completion_ids": torch.randint(10, 20, (rows, width)),
        "completion_mask": torch.ones(rows, width, dtype=torch.long),
        "token_type_ids": torch.zeros(rows, prompt_width + width, dtype=torch.long),
        "mm_token_type_ids": torch.ones(rows, prompt_width + width, dtype=torch.long),
        "advantages": torch.zeros(rows),
    }
    demo = [30, 31, 32, 33, char_tokenizer.eos_token_id]
    demonstration = torch.tensor([False, False, False, True])
    trainer._place_demonstrations(output, demonstration, [Demonstration(demo)] * rows)
    assert output["completion_ids"].shape == (rows, len(demo))
    for key in ("token_type_ids", "mm_token_type_ids"):
        assert output[key].shape == (rows, prompt_width + len(demo)), key  # was left at prompt + 2: IndexError
        assert output[key][3, prompt_width:].eq(0).all(), key
    # The rollouts' new padding is the pad token, not id 0.
    assert output["completion_ids"][:3, width:].eq(char_tokenizer.pad_token_id).all()
    assert char_tokenizer.pad_token_id != 0


def test_denominators_are_clamped_before_they_are_spread(tmp_path, char_tokenizer):
    """One demonstration token and one policy row in a generation batch split over 2 micro-batches."""
    trainer = make_trainer(
        tmp_path, char_tokenizer, addition_rows(PAIRS), dense_reward, loss_type="grpo", steps_per_generation=2
    )
    inputs = attach_rows(
        {"completion_mask": torch.ones(2, 3)},
        demonstration=torch.tensor([False, True]),
        weights=torch.ones(2),
        policy_rows=1.0,
        separate_tokens=1.0,
    )
    policy, token_mean = trainer._denominators(inputs, accumulation=1, training=True)
    # Half of the batch's one row / one token per micro-batch: before, both read 1 (the SFT term weighed half).
    assert (policy, token_mean) == (0.5, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# What user code sees
# ---------------------------------------------------------------------------------------------------------------


def test_user_code_sees_grpo_trainers_rows(tmp_path, char_tokenizer):
    rows = [{**r, "extra": i} for i, r in enumerate(addition_rows(PAIRS))]
    calls = {}

    def recording(name):
        def reward(prompts, completions, **kwargs):
            calls.setdefault(name, []).append(sorted(kwargs))
            return dense_reward(completions)

        return reward

    prepared = {}
    for name, cls, feedback in (
        ("grpo", GRPOTrainer, None),
        ("rl", HPTTrainer, "rl"),
        ("switch", HPTTrainer, "switch"),
    ):
        extra = {} if feedback is None else {"feedback": feedback}
        trainer = make_trainer(
            tmp_path / name, char_tokenizer, rows, recording(name), trainer_cls=cls, max_steps=1, **extra
        )
        assert trainer.train_dataset.column_names == ["prompt", "completion", "solution", "extra"]
        original = trainer._prepare_inputs

        def spy(batch, _name=name, _original=original):
            prepared.setdefault(_name, []).append(sorted(batch[0]))
            return _original(batch)

        trainer._prepare_inputs = spy
        trainer.train()
    assert prepared["rl"] == prepared["switch"] == prepared["grpo"]
    assert calls["rl"] == calls["switch"][:1] == calls["grpo"]


def test_prompt_only_dataset_error_suggests_feedback_rl(tmp_path, char_tokenizer):
    rows = [{"prompt": r["prompt"]} for r in addition_rows(PAIRS)]
    with pytest.raises(ValueError, match=r"HPTConfig\(feedback='rl'\).*exactly GRPOTrainer"):
        make_trainer(tmp_path, char_tokenizer, rows, dense_reward, per_device_train_batch_size=8)


# ---------------------------------------------------------------------------------------------------------------
# Design decisions
# ---------------------------------------------------------------------------------------------------------------


def test_all_missing_demonstrations_are_refused(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    for row in rows:
        row["completion"] = None
    with pytest.raises(ValueError, match=r"Every demonstration in column 'completion' is missing.*feedback='rl'"):
        make_trainer(tmp_path, char_tokenizer, rows, dense_reward)


def test_several_rewards_without_a_verifier_index_warn(tmp_path, char_tokenizer, caplog):
    always = lambda completions, **kw: [1.0] * len(completions)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="trl_hpt"):
        make_trainer(tmp_path, char_tokenizer, addition_rows(PAIRS), [dense_reward, always])
    assert any("verifier_reward_index" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_hpt"):
        make_trainer(tmp_path, char_tokenizer, addition_rows(PAIRS), [dense_reward, always], verifier_reward_index=0)
    assert not any("verifier_reward_index" in r.getMessage() for r in caplog.records)


def test_truncated_demonstrations_follow_mask_truncated_completions(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    rows[0]["completion"] = "1234567890"
    never = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    for masked in (False, True):
        trainer = make_trainer(
            tmp_path / str(masked),
            char_tokenizer,
            rows,
            never,
            max_demonstration_length=5,
            mask_truncated_completions=masked,
        )
        out = generation_batch(trainer, G)
        # Masked: the cut demonstration is not trained (its prompt stays RL); otherwise it is, like the others.
        assert hpt_rows(out).demonstration.view(-1, G)[:, -1].tolist() == [not masked, True, True, True]


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chatml_demonstrations_end_at_the_end_of_turn_token(char_tokenizer):
    """ChatML renders a newline after the end-of-turn token; a rollout stops at the token, so the demonstration does."""
    char_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    prompt = [{"role": "user", "content": "1+2="}]
    ids = tokenize_demonstration(prompt, "3", char_tokenizer, chat_template=CHATML).ids
    assert char_tokenizer.convert_ids_to_tokens(ids) == ["3", "<|end|>"]


def test_tool_messages_in_demonstrations_are_masked(char_tokenizer):
    prompt = [{"role": "user", "content": "1+2="}]
    demonstration = [
        {"role": "assistant", "content": "call"},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "3"},
    ]
    tokenized = tokenize_demonstration(prompt, demonstration, char_tokenizer)
    tokens = char_tokenizer.convert_ids_to_tokens(tokenized.ids)
    trained = "".join(t for t, m in zip(tokens, tokenized.tool_mask) if m)
    masked = "".join(t for t, m in zip(tokens, tokenized.tool_mask) if not m)
    assert "call" in trained and trained.endswith("3<|end|>")
    assert "tool" in masked and "3" in masked  # the tool's turn, header and output, is the environment's


def test_message_demonstrations_for_string_prompts_keep_only_assistant_turns(tmp_path, char_tokenizer):
    rows = addition_rows(PAIRS)
    for row in rows:
        row["completion"] = [{"role": "assistant", "content": row["completion"]}]
    rows[1]["completion"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "7"}]
    with pytest.raises(ValueError, match=r"column 'completion', row 1: .*role\(s\) \['user'\]"):
        make_trainer(tmp_path, char_tokenizer, rows, dense_reward)


def test_demonstration_flags_and_completions_as_reward_functions_see_them():
    from trl_hpt.demonstrations import Demonstration, demonstration_completion, demonstration_flags

    demos = [Demonstration([1, 2]), Demonstration([]), Demonstration([3], truncated=True)]
    assert demonstration_flags(demos, 3, drop_truncated=False).tolist() == [
        [True, False],
        [False, False],
        [True, True],
    ]
    assert demonstration_flags(demos, 3, drop_truncated=True)[:, 0].tolist() == [True, False, False]
    assert not demonstration_flags(None, 2, drop_truncated=True).any()
    message = [{"role": "assistant", "content": "4"}]
    assert demonstration_completion([{"role": "user", "content": "2+2?"}], "4") == message
    assert demonstration_completion("2+2?", message) == "4"
