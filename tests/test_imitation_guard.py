"""The imitation controls: `imitation_guard` (a replay of the policy's correct rollouts) and `style_gate`."""

import json
import math

import pytest
import torch

from trl_hpt.batch import hpt_rows
from trl_hpt.config import HPTConfig
from trl_hpt.guard import ImitationGuard, StyleGate, next_scale, replay_drift, style_scale
from trl_hpt.testing import PAIRS, addition_rows, generation_batch, make_trainer, slot_reward


G = 4


def test_next_scale_steps_up_while_the_replay_holds_and_down_when_it_falls():
    up, down = math.exp(0.1), math.exp(-0.1)
    assert next_scale(1.0, 0.0, 0.1, 0.05, 4.0, 0.0) == pytest.approx(up)
    assert next_scale(1.0, -0.01, 0.1, 0.05, 4.0, 0.0) == pytest.approx(down)
    assert next_scale(1.0, -0.01, 0.1, 0.05, 4.0, 0.02) == pytest.approx(up)  # within the tolerance
    assert next_scale(3.9, 1.0, 0.1, 0.05, 4.0, 0.0) == 4.0  # clipped
    assert next_scale(0.051, -1.0, 0.1, 0.05, 4.0, 0.0) == 0.05
    assert next_scale(0.7, float("nan"), 0.1, 0.05, 4.0, 0.0) == 0.7  # nothing measured


def test_replay_drift_skips_entries_without_a_baseline():
    now = torch.tensor([-1.0, -2.0, -0.5])
    baselines = torch.tensor([-0.5, float("nan"), -1.0])
    total, count = replay_drift(now, baselines)
    assert count == 2 and total == pytest.approx(-0.5 + 0.5)


def test_replay_keeps_the_first_rollouts_laid_out_like_a_grpo_batch():
    guard = ImitationGuard(capacity=2, rate=0.1, min_scale=0.05, max_scale=4.0)
    assert not guard.add([4], [])  # an empty completion is not kept
    assert guard.add([1, 2], [3])
    assert guard.add([9, 9, 9], [6])
    assert not guard.add([5], [7, 8])  # full: the first ones stay
    assert [entry[:2] for entry in guard.entries] == [[[1, 2], [3]], [[9, 9, 9], [6]]]
    ids, attention, completion_mask = guard.inputs(pad_token_id=0, device="cpu")
    assert ids.tolist() == [[0, 1, 2, 3], [9, 9, 9, 6]]  # prompts left-padded, completions right-padded
    assert attention.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert completion_mask.tolist() == [[1], [1]]

    logps = torch.tensor([[-1.0], [-3.0]])
    assert guard.measure(logps, completion_mask) == (0.0, 0)  # first measurement: baselines only
    assert guard.measure(logps - 0.5, completion_mask) == (pytest.approx(-1.0), 2)
    assert [entry[2] for entry in guard.entries] == [-1.0, -3.0]  # baselines kept from their first measurement


def test_a_restored_replay_keeps_its_first_rollouts():
    saved = ImitationGuard(capacity=3, rate=0.1, min_scale=0.05, max_scale=4.0, scale=0.5)
    for k in range(3):
        saved.add([k], [k + 10])
    smaller = ImitationGuard(capacity=2, rate=0.1, min_scale=0.05, max_scale=4.0)
    smaller.load_state_dict(saved.state_dict())
    assert smaller.scale == 0.5 and [entry[1] for entry in smaller.entries] == [[10], [11]]


def _trainer(tmp_path, tokenizer, counts, **overrides):
    rows = addition_rows(PAIRS)
    return make_trainer(tmp_path, tokenizer, rows, slot_reward(rows, counts, G, wrong=0.0), **overrides)


def test_trainer_scales_the_demonstration_rows_and_reads_the_drift(tmp_path, char_tokenizer):
    counts = [0, 1, 2, 0]  # prompts 0 and 3 go to SFT; 3 correct rollouts enter the replay per batch
    trainer = _trainer(tmp_path, char_tokenizer, counts, imitation_guard=True, imitation_guard_rate=0.2)
    guard = trainer.imitation_guard
    torch.manual_seed(0)
    first = generation_batch(trainer, G)
    assert len(guard.entries) == 3 and guard.scale == 1.0  # nothing measured yet
    rows = hpt_rows(first)
    assert rows.weights[rows.demonstration].tolist() == [1.0, 1.0]

    generation_batch(trainer, G)  # the first entries take their baselines
    assert guard.scale == 1.0 and len(guard.entries) == 6
    baselines = torch.tensor([entry[2] for entry in list(guard.entries)[:3]])
    assert torch.isfinite(baselines).all()

    # Move the policy, then check the drift the trainer logs against the replay scored by hand.
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, attention, completion_mask = guard.inputs(char_tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, completion_mask.size(1)
        )
    mask = completion_mask.float()
    now = ((logps * mask).sum(-1) / mask.sum(-1))[:6]
    measured = torch.tensor([entry[2] for entry in guard.entries])
    expected = float((now - measured)[torch.isfinite(measured)].mean())
    third = generation_batch(trainer, G)
    assert trainer._metrics["train"]["hpt/replay_drift"][-1] == pytest.approx(expected, abs=1e-5)
    scale = math.exp(0.2) if expected >= 0 else math.exp(-0.2)
    assert guard.scale == pytest.approx(scale)
    assert trainer._metrics["train"]["hpt/imitation_scale"][-1] == pytest.approx(scale)
    rows = hpt_rows(third)
    torch.testing.assert_close(rows.weights[rows.demonstration], torch.full((2,), scale))


def test_off_by_default_and_validated(tmp_path, char_tokenizer):
    config = HPTConfig(str(tmp_path), use_cpu=True)
    assert config.imitation_guard is False
    trainer = _trainer(tmp_path, char_tokenizer, [0, 1, 2, 0])
    assert trainer.imitation_guard is None
    started = _trainer(tmp_path / "s", char_tokenizer, [0, 1, 2, 0], imitation_guard=True, imitation_guard_start=0.1)
    assert started.imitation_guard.scale == 0.1
    rows = hpt_rows(generation_batch(started, G))
    torch.testing.assert_close(rows.weights[rows.demonstration], torch.full((2,), 0.1))
    for field, bad in [
        ("imitation_guard_size", 0),
        ("imitation_guard_rate", 0.0),
        ("imitation_guard_min", 0.0),
        ("imitation_guard_min", 1.5),
        ("imitation_guard_max", 0.5),
        ("imitation_guard_start", 5.0),
        ("imitation_guard_tolerance", -0.1),
    ]:
        with pytest.raises(ValueError, match=field):
            HPTConfig(str(tmp_path), use_cpu=True, **{field: bad})
    with pytest.raises(ValueError, match="imitation_guard.*feedback='rl'"):
        HPTConfig(str(tmp_path), use_cpu=True, imitation_guard=True, feedback="rl")


def test_the_guard_resumes_with_its_checkpoint(tmp_path, char_tokenizer):
    run = dict(max_steps=4, save_strategy="steps", save_steps=2, imitation_guard=True, imitation_guard_rate=0.3)
    trainer = _trainer(tmp_path / "a", char_tokenizer, [0, 1, 2, 0], **run)
    trainer.train()
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / "hpt_imitation_guard-0.json").read_text())
    assert len(saved["entries"]) == 6  # 3 correct rollouts per generation batch, two batches
    scales = [h["hpt/imitation_scale"] for h in trainer.state.log_history if "hpt/imitation_scale" in h]
    assert saved["scale"] == pytest.approx(scales[1])

    resumed = _trainer(tmp_path / "a", char_tokenizer, [0, 1, 2, 0], **run)
    loaded = []
    original = resumed.imitation_guard.load_state_dict
    resumed.imitation_guard.load_state_dict = lambda state: (loaded.append(state), original(state))
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint, checkpoint-4
    assert loaded and loaded[0]["scale"] == pytest.approx(scales[3])
    assert resumed.state.global_step == 4


# ----------------------------------------------------------------------------------------------------------------------
# style_gate: the demonstration coefficient scaled by the demonstrations' log-probability gap on solved prompts
# ----------------------------------------------------------------------------------------------------------------------


def test_style_scale_and_its_moving_average():
    assert style_scale(float("nan"), 0.1) == 1.0  # nothing measured
    assert style_scale(0.3, 0.1) == 1.0  # demonstrations likelier than the model's own answers: no reduction
    assert style_scale(-0.2, 0.1) == pytest.approx(math.exp(-2.0))
    gate = StyleGate(temperature=0.5, momentum=0.75)
    assert gate.update(0.0, 0) == 1.0 and math.isnan(gate.gap)  # no solved prompt: unchanged
    assert gate.update(-2.0, 4) == pytest.approx(math.exp(-1.0))  # the first batch's gap as it is
    gate.update(-1.0, 1)
    assert gate.gap == pytest.approx(0.75 * -0.5 + 0.25 * -1.0)
    kept = StyleGate(temperature=0.5, momentum=1.0)
    kept.update(-1.0, 2)
    kept.update(3.0, 1)
    assert kept.gap == -0.5  # momentum 1: the first gap for the whole run
    restored = StyleGate(temperature=0.5, momentum=0.75)
    restored.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert restored.gap == gate.gap
    fresh = StyleGate(temperature=0.5, momentum=0.75)
    fresh.load_state_dict(json.loads(json.dumps(StyleGate(0.5, 0.75).state_dict())))
    assert math.isnan(fresh.gap)


def test_style_gate_pools_its_first_measurement_over_min_prompts():
    gate = StyleGate(temperature=0.1, momentum=0.9, floor=0.05, start=0.0, min_prompts=4)
    assert gate.update(-0.1, 1) == 0.0 and math.isnan(gate.gap)  # one prompt's gap does not decide
    assert gate.update(-1.4, 2) == 0.0 and math.isnan(gate.gap) and gate.pooled_count == 3
    # A saved gate waiting for prompts resumes its pool.
    restored = StyleGate(temperature=0.1, momentum=0.9, floor=0.05, start=0.0, min_prompts=4)
    restored.load_state_dict(json.loads(json.dumps(gate.state_dict())))
    assert (restored.pooled_sum, restored.pooled_count) == (pytest.approx(-1.5), 3)
    for g in (gate, restored):
        g.update(-0.5, 1)  # the fourth prompt: the mean of all four is the first gap, the pool is emptied
        assert g.gap == pytest.approx(-0.5) and g.pooled_count == 0 and g.scale == 0.0  # exp(-5) < floor
        g.update(1.0, 1)  # then the moving average, batch by batch
        assert g.gap == pytest.approx(0.9 * -0.5 + 0.1 * 1.0)
    # Checkpoints written before pooling existed hold only the gap.
    old = StyleGate(temperature=0.1, momentum=0.9, min_prompts=4)
    old.load_state_dict({"gap": None})
    assert math.isnan(old.gap) and old.pooled_count == 0
    # The first batch decides alone by default.
    single = StyleGate(temperature=0.1, momentum=0.9)
    single.update(-0.1, 1)
    assert single.gap == pytest.approx(-0.1)


def test_trainer_waits_for_min_prompts_before_the_style_gate_opens(tmp_path, char_tokenizer):
    counts = [0, 1, 2, 0]  # two solved prompts with a demonstration per generation batch
    fields = dict(style_gate=True, style_gate_start=0.0, style_gate_floor=0.0, style_gate_temperature=100.0)
    trainer = _trainer(tmp_path, char_tokenizer, counts, style_gate_min_prompts=3, **fields)
    torch.manual_seed(0)
    first = hpt_rows(generation_batch(trainer, G))
    # Two prompts scored, three needed: still closed, and every prompt keeps its rollouts.
    assert math.isnan(trainer.style_gate.gap) and trainer.style_gate.pooled_count == 2
    assert not first.demonstration.any() and trainer._metrics["train"]["hpt/style_scale"] == [0.0]
    assert trainer._metrics["train"]["hpt/style_measured"] == [0.0]
    second = hpt_rows(generation_batch(trainer, G))
    gaps = trainer._metrics["train"]["hpt/style_gap"]
    # The first gap is the mean over the four pooled prompts (each batch's logged gap is its own mean of two).
    assert trainer.style_gate.gap == pytest.approx(sum(gaps) / 2, abs=1e-6) and trainer.style_gate.pooled_count == 0
    assert second.demonstration.sum() == 2 and trainer._metrics["train"]["hpt/style_measured"] == [0.0, 1.0]
    scale = math.exp(min(trainer.style_gate.gap, 0.0) / 100.0)
    torch.testing.assert_close(second.weights[second.demonstration], torch.full((2,), scale))


def _mean_logp(trainer, prompt, completion):
    """One pair scored on its own (no padding), independently of the trainer's batching."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, torch.ones_like(ids), len(completion)
        )
    return float(logps.mean())


def test_trainer_scales_the_demonstration_rows_by_the_style_gap(tmp_path, char_tokenizer):
    counts = [0, 1, 2, 0]  # prompts 1 and 2 are solved (their first rollout correct); 0 and 3 go to SFT
    trainer = _trainer(
        tmp_path, char_tokenizer, counts, style_gate=True, style_gate_temperature=0.5, style_gate_momentum=0.5
    )
    gate, gaps = trainer.style_gate, []
    torch.manual_seed(0)
    for step in range(2):
        batch = generation_batch(trainer, G)
        per_prompt = []
        for j in (1, 2):
            row = G * j
            prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
            own = batch["completion_ids"][row][batch["completion_mask"][row].bool()].tolist()
            demo = list(trainer.demonstrations.lookup(trainer.train_dataset[j]).ids)
            per_prompt.append(_mean_logp(trainer, prompt, demo) - _mean_logp(trainer, prompt, own))
        gaps.append(sum(per_prompt) / 2)
        assert trainer._metrics["train"]["hpt/style_gap"][-1] == pytest.approx(gaps[-1], abs=1e-5)
        expected_gap = gaps[0] if step == 0 else 0.5 * gaps[0] + 0.5 * gaps[1]
        assert gate.gap == pytest.approx(expected_gap, abs=1e-5)
        scale = math.exp(min(expected_gap, 0.0) / 0.5)
        assert trainer._metrics["train"]["hpt/style_scale"][-1] == pytest.approx(scale, rel=1e-5)
        rows = hpt_rows(batch)
        torch.testing.assert_close(rows.weights[rows.demonstration], torch.full((2,), scale))
    assert gaps[0] < 0  # an untrained model finds neither likely, but the demonstrations' digits less so


def test_style_gate_without_solved_prompts_and_with_the_guard(tmp_path, char_tokenizer):
    unsolved = _trainer(tmp_path / "u", char_tokenizer, [0, 0, 0, 0], style_gate=True)
    rows = hpt_rows(generation_batch(unsolved, G))
    assert math.isnan(unsolved.style_gate.gap) and "hpt/style_gap" not in unsolved._metrics["train"]
    torch.testing.assert_close(rows.weights[rows.demonstration], torch.ones(4))
    # Closed until measured: nothing placed, every rollout kept.
    waiting = _trainer(
        tmp_path / "w", char_tokenizer, [0, 0, 0, 0], style_gate=True, style_gate_floor=0.05, style_gate_start=0.0
    )
    rows = hpt_rows(generation_batch(waiting, G))
    assert waiting.style_gate.scale == 0.0 and not rows.demonstration.any()
    torch.testing.assert_close(rows.weights, torch.ones_like(rows.weights))

    both = _trainer(
        tmp_path / "b", char_tokenizer, [0, 1, 2, 0], style_gate=True, imitation_guard=True, imitation_guard_start=0.5
    )
    rows = hpt_rows(generation_batch(both, G))
    expected = 0.5 * both.style_gate.scale
    assert both.style_gate.scale < 1
    torch.testing.assert_close(rows.weights[rows.demonstration], torch.full((2,), expected))


@pytest.mark.parametrize("feedback", ["switch", "soft"])
def test_a_closed_style_gate_trains_exactly_as_grpo_trainer(tmp_path, char_tokenizer, feedback):
    from trl import GRPOTrainer

    counts = [0, 1, 2, 0]
    # Momentum 1 keeps the first batch's gap, so the gate stays closed for the whole run.
    closed = dict(feedback=feedback, style_gate=True, style_gate_floor=0.999, style_gate_momentum=1.0)
    if feedback == "soft":
        closed["demonstration_loss"] = "luffy"  # its demonstrations would join the groups' advantages
    grpo = _trainer(tmp_path / "g", char_tokenizer, counts, trainer_cls=GRPOTrainer)
    hpt = _trainer(tmp_path / "h", char_tokenizer, counts, **closed)
    torch.manual_seed(0)
    grpo.train()
    torch.manual_seed(0)
    hpt.train()
    assert 0 < style_scale(hpt.style_gate.gap, 0.1) < 0.999 and hpt.style_gate.scale == 0.0
    assert all(h["hpt/sft_fraction"] == 0 for h in hpt.state.log_history if "hpt/sft_fraction" in h)
    for (name, p_grpo), (_, p_hpt) in zip(grpo.model.named_parameters(), hpt.model.named_parameters()):
        torch.testing.assert_close(p_hpt.detach(), p_grpo.detach(), atol=1e-6, rtol=1e-5, msg=name)

    # The same run with the gate open (floor 0) places demonstrations and moves elsewhere.
    opened = _trainer(tmp_path / "o", char_tokenizer, counts, **{**closed, "style_gate_floor": 0.0})
    torch.manual_seed(0)
    opened.train()
    assert opened.style_gate.scale > 0
    assert any(h["hpt/sft_fraction"] > 0 for h in opened.state.log_history if "hpt/sft_fraction" in h)
    moved = max(
        (a.detach() - b.detach()).abs().max().item()
        for a, b in zip(opened.model.parameters(), grpo.model.parameters())
    )
    assert moved > 1e-5


def test_style_gate_off_by_default_validated_and_resumed(tmp_path, char_tokenizer):
    assert HPTConfig(str(tmp_path), use_cpu=True).style_gate is False
    assert _trainer(tmp_path / "d", char_tokenizer, [0, 1, 2, 0]).style_gate is None
    for field, bad in [
        ("style_gate_temperature", 0.0),
        ("style_gate_temperature", math.inf),
        ("style_gate_momentum", 1.5),
        ("style_gate_floor", 1.0),
        ("style_gate_floor", -0.1),
        ("style_gate_start", 1.5),
        ("style_gate_min_prompts", 0),
        ("style_gate_min_prompts", 2.5),
    ]:
        with pytest.raises(ValueError, match=field):
            HPTConfig(str(tmp_path), use_cpu=True, **{field: bad})
    with pytest.raises(ValueError, match="style_gate.*feedback='rl'"):
        HPTConfig(str(tmp_path), use_cpu=True, style_gate=True, feedback="rl")

    run = dict(max_steps=4, save_strategy="steps", save_steps=2, style_gate=True)
    trainer = _trainer(tmp_path / "a", char_tokenizer, [0, 1, 2, 0], **run)
    trainer.train()
    saved = json.loads((tmp_path / "a" / "checkpoint-4" / "hpt_style_gate-0.json").read_text())
    assert saved["gap"] == pytest.approx(trainer.style_gate.gap)
    resumed = _trainer(tmp_path / "a", char_tokenizer, [0, 1, 2, 0], **{**run, "max_steps": 5})
    resumed.train(resume_from_checkpoint=True)
    gaps = [h["hpt/style_gap"] for h in resumed.state.log_history if "hpt/style_gap" in h]
    # The fifth step continues the saved average instead of starting from its own gap.
    assert resumed.style_gate.gap == pytest.approx(0.9 * saved["gap"] + 0.1 * gaps[-1], abs=1e-6)
