"""HPT's metrics reach every callback and tracker, and HPTReportCallback writes a faithful, resume-safe report."""

import importlib.util
import json
import logging
import shutil
import sys
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback, TrainerState

from trl_hpt.callbacks import (
    GATE_HISTORY_FILE,
    REPORT_JSON_FILE,
    REPORT_PLOT_FILE,
    HPTReportCallback,
    plot_gate_summary,
    read_gate_history,
    summarize_gate_history,
)
from trl_hpt.testing import addition_rows, build_char_tokenizer, make_trainer, slot_reward


G = 4
PROMPTS_PER_STEP = 4
STEPS = 4
# The metric names every tracker must see.
HPT_METRICS = [
    "hpt/sft_fraction",
    "hpt/rl_fraction",
    "hpt/prompt_accuracy",
    "hpt/demonstration_loss",
    "hpt/rl_loss",
    "hpt/skipped_rows",
    "hpt/demo_truncated_fraction",
    "hpt/no_demo_fraction",
]
PAIRS = [(1, 2), (3, 4), (5, 5), (2, 7), (6, 1), (8, 0), (4, 4), (9, 3)]
# Correct rollouts per prompt: 0 sends the prompt to SFT (switch gate 0), 1 or 2 to RL. Steps draw different
# prompts, so the SFT fraction changes from step to step.
CORRECT = {row["prompt"]: i % 3 for i, row in enumerate(addition_rows(PAIRS))}
# The first CORRECT[prompt] rollouts of each group are correct: the prompt's accuracy is exactly k / G.
K_OF_G_REWARD = slot_reward(addition_rows(PAIRS), list(CORRECT.values()), G, wrong=0.0)
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


class Recorder(TrainerCallback):
    """A user's own callback: keeps what `on_log` receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def _trainer(output_dir, char_tokenizer, callbacks=(), **overrides):
    values = {"per_device_train_batch_size": PROMPTS_PER_STEP * G, "max_steps": STEPS}
    rows = addition_rows(PAIRS)
    return make_trainer(
        output_dir, char_tokenizer, rows, K_OF_G_REWARD, callbacks=list(callbacks), **{**values, **overrides}
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 4-step HPT run, shared by the tests below: a user callback, the report, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("callbacks")
    recorder = Recorder()
    trainer = _trainer(
        root / "out",
        build_char_tokenizer(),
        callbacks=[recorder],
        report_to=["tensorboard"] if HAS_TENSORBOARD else "none",
        save_strategy="steps",
        save_steps=2,
    )
    report_dir = root / "report"
    trainer.add_callback(HPTReportCallback(trainer, output_dir=report_dir))
    trainer.train()
    return SimpleNamespace(trainer=trainer, recorder=recorder, report_dir=report_dir, output_dir=root / "out")


def train_logs(history):
    return [entry for entry in history if "hpt/sft_fraction" in entry]


# ---------------------------------------------------------------------------------------------------------------------
# (a) and (b): metrics reach callbacks and trackers
# ---------------------------------------------------------------------------------------------------------------------


def test_user_callback_receives_every_hpt_metric(run):
    logs = train_logs(run.recorder.logs)
    assert [entry["step"] for entry in logs] == list(range(1, STEPS + 1))
    for entry in logs:
        missing = [name for name in HPT_METRICS if name not in entry]
        assert not missing, f"step {entry['step']}: {missing} not logged"
    # The gate is mixed in this run: both terms are in play and both fractions move.
    assert any(0 < entry["hpt/sft_fraction"] < 1 for entry in logs)
    assert all(entry["hpt/no_demo_fraction"] == 0.0 for entry in logs)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_event_file_has_hpt_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(run.output_dir.rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file written"
    tags = set()
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    for name in HPT_METRICS:
        assert f"train/{name}" in tags, name
    scalars = [e.value for f in event_files for e in _scalars(f, "train/hpt/sft_fraction")]
    logged = [entry["hpt/sft_fraction"] for entry in train_logs(run.trainer.state.log_history)]
    assert scalars == pytest.approx(logged)


def _scalars(event_file, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_file))
    accumulator.Reload()
    return accumulator.Scalars(tag) if tag in accumulator.Tags()["scalars"] else []


# ---------------------------------------------------------------------------------------------------------------------
# (c) the report
# ---------------------------------------------------------------------------------------------------------------------


def test_report_files_match_the_logged_metrics(run):
    records = read_gate_history(run.report_dir / GATE_HISTORY_FILE)
    # One record per prompt per step, exactly the trainer's own history, in order.
    assert records == run.trainer.gate_history
    assert [r["step"] for r in records] == [s for s in range(STEPS) for _ in range(PROMPTS_PER_STEP)]
    for record in records:
        prompt = addition_rows(PAIRS)[record["prompt_index"]]["prompt"]
        assert record["accuracy"] == CORRECT[prompt] / G
        assert record["sft"] == (CORRECT[prompt] == 0)

    report = json.loads((run.report_dir / REPORT_JSON_FILE).read_text())
    assert report["global_step"] == STEPS and report["num_records"] == STEPS * PROMPTS_PER_STEP
    logs = train_logs(run.trainer.state.log_history)
    assert [entry["step"] for entry in report["steps"]] == [entry["step"] for entry in logs]
    assert [e["sft_fraction"] for e in report["steps"]] == pytest.approx([e["hpt/sft_fraction"] for e in logs])
    assert [e["rl_fraction"] for e in report["steps"]] == pytest.approx([e["hpt/rl_fraction"] for e in logs])
    assert [e["accuracy"] for e in report["steps"]] == pytest.approx([e["hpt/prompt_accuracy"] for e in logs])
    assert all(e["num_prompts"] == PROMPTS_PER_STEP for e in report["steps"])

    png = (run.report_dir / REPORT_PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 5_000
    image = pytest.importorskip("matplotlib.image").imread(str(run.report_dir / REPORT_PLOT_FILE))
    assert image.shape[0] > 200 and image.shape[1] > 300 and image[..., :3].std() > 0.01  # not a blank canvas


def test_report_is_resume_safe(run, tmp_path, char_tokenizer):
    # The first run went on to step 4 after its step-2 checkpoint; resuming from that checkpoint replays steps 3 and
    # 4, whose records (generated at global_step 2 and 3) must replace the old ones rather than be added twice.
    report_dir = tmp_path / "report"
    shutil.copytree(run.report_dir, report_dir)
    output_dir = tmp_path / "out"
    shutil.copytree(run.output_dir / "checkpoint-2", output_dir / "checkpoint-2")
    trainer = _trainer(output_dir, char_tokenizer, save_strategy="no")
    trainer.add_callback(HPTReportCallback(trainer, output_dir=report_dir))
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-2"))

    records = read_gate_history(report_dir / GATE_HISTORY_FILE)
    assert [r["step"] for r in records] == [s for s in range(STEPS) for _ in range(PROMPTS_PER_STEP)]
    assert records[: 2 * PROMPTS_PER_STEP] == run.trainer.gate_history[: 2 * PROMPTS_PER_STEP]
    assert records[2 * PROMPTS_PER_STEP :] == trainer.gate_history
    report = json.loads((report_dir / REPORT_JSON_FILE).read_text())
    assert [e["step"] for e in report["steps"]] == list(range(1, STEPS + 1))


def test_a_second_report_callback_for_the_same_directory_writes_nothing(tmp_path, char_tokenizer, caplog):
    # The old docs said to add the callback by hand, but HPTTrainer (hpt_report=True) already has one: following
    # them must not write every record twice. The same directory spelt differently is still the same directory.
    steps = 2
    trainer = _trainer(tmp_path / "out", char_tokenizer, max_steps=steps)
    trainer.add_callback(HPTReportCallback(trainer))
    trainer.add_callback(HPTReportCallback(trainer, output_dir=tmp_path / "x" / ".." / "out"))
    reports = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, HPTReportCallback)]
    assert len(reports) == 3
    with caplog.at_level(logging.WARNING, logger="trl_hpt.callbacks"):
        trainer.train()

    records = read_gate_history(tmp_path / "out" / GATE_HISTORY_FILE)
    assert len(trainer.gate_history) == steps * PROMPTS_PER_STEP
    assert records == trainer.gate_history
    report = json.loads((tmp_path / "out" / REPORT_JSON_FILE).read_text())
    assert report["num_records"] == steps * PROMPTS_PER_STEP
    assert [e["num_prompts"] for e in report["steps"]] == [PROMPTS_PER_STEP] * steps
    warnings = [r.getMessage() for r in caplog.records if "Another HPTReportCallback" in r.getMessage()]
    assert len(warnings) == 2  # once per extra callback, not once per step


# ---------------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------------


def _record(step, accuracy, sft, alpha=None):
    alpha = (0.0 if sft else 1.0) if alpha is None else alpha
    return {"step": step, "prompt_index": 0, "accuracy": accuracy, "alpha": alpha, "beta": float(sft), "sft": sft}


def test_summary_aggregates_per_step():
    records = [_record(0, 0.0, True), _record(0, 0.5, False), _record(0, 1.0, False), _record(2, 0.0, True)]
    expected = [
        {"step": 1, "sft_fraction": 1 / 3, "rl_fraction": 2 / 3, "accuracy": 0.5, "num_prompts": 3},
        {"step": 3, "sft_fraction": 1.0, "rl_fraction": 0.0, "accuracy": 0.0, "num_prompts": 1},
    ]
    assert summarize_gate_history(records) == [{**entry, "unscored_fraction": 0.0} for entry in expected]
    assert summarize_gate_history([]) == []


def test_summary_leaves_unscored_prompts_out_of_the_accuracy(tmp_path):
    # A prompt none of whose rollouts was scored has `accuracy: None` in its record (P unknown, trained by RL).
    records = [_record(0, None, False), _record(0, 0.5, False), _record(1, None, False)]
    summary = summarize_gate_history(records)
    assert [(e["accuracy"], e["unscored_fraction"], e["num_prompts"]) for e in summary] == [
        (0.5, 0.5, 2),
        (None, 1, 1),
    ]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot_gate_summary(summary, tmp_path / "gaps.png") is True


def _events(callback, directory, global_step=0, world_zero=True):
    state = TrainerState()
    state.global_step = global_step
    state.is_world_process_zero = world_zero
    return SimpleNamespace(output_dir=str(directory)), state, None


def test_callback_appends_only_new_records_and_truncates_on_resume(tmp_path):
    trainer = SimpleNamespace(gate_history=[_record(9, 0.0, True)])  # made before train(): not part of the run
    callback = HPTReportCallback(trainer, plot=False)
    args, state, control = _events(callback, tmp_path)
    callback.on_train_begin(args, state, control)
    for step in range(3):
        trainer.gate_history += [_record(step, 0.0, True), _record(step, 1.0, False)]
        state.global_step = step + 1
        callback.on_step_end(args, state, control)
    callback.on_step_end(args, state, control)  # nothing new: nothing written
    assert [r["step"] for r in read_gate_history(tmp_path / GATE_HISTORY_FILE)] == [0, 0, 1, 1, 2, 2]

    # A new trainer resumes from the step-1 checkpoint: records generated at step >= 1 are dropped.
    resumed = SimpleNamespace(gate_history=[])
    callback = HPTReportCallback(resumed, plot=False)
    args, state, control = _events(callback, tmp_path, global_step=1)
    callback.on_train_begin(args, state, control)
    assert [r["step"] for r in read_gate_history(tmp_path / GATE_HISTORY_FILE)] == [0, 0]
    resumed.gate_history += [_record(1, 0.5, False), _record(2, 0.5, False)]
    state.global_step = 3
    callback.on_train_end(args, state, control)
    assert [r["step"] for r in read_gate_history(tmp_path / GATE_HISTORY_FILE)] == [0, 0, 1, 2]
    report = json.loads((tmp_path / REPORT_JSON_FILE).read_text())
    assert [e["sft_fraction"] for e in report["steps"]] == [0.5, 0.0, 0.0]
    assert not (tmp_path / REPORT_PLOT_FILE).exists()  # plot=False

    # A fresh run (global_step 0) in the same directory starts a new history.
    callback = HPTReportCallback(SimpleNamespace(gate_history=[]), plot=False)
    args, state, control = _events(callback, tmp_path)
    callback.on_train_begin(args, state, control)
    assert read_gate_history(tmp_path / GATE_HISTORY_FILE) == []


def test_callback_writes_nothing_off_the_main_process(tmp_path):
    trainer = SimpleNamespace(gate_history=[_record(0, 0.0, True)])
    callback = HPTReportCallback(trainer)
    args, state, control = _events(callback, tmp_path, world_zero=False)
    callback.on_train_begin(args, state, control)
    callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_skips_the_plot_with_one_warning(tmp_path, monkeypatch, caplog):
    # None in sys.modules makes these imports fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    trainer = SimpleNamespace(gate_history=[])
    callback = HPTReportCallback(trainer)
    args, state, control = _events(callback, tmp_path)
    callback.on_train_begin(args, state, control)
    trainer.gate_history.append(_record(0, 0.0, True))
    state.global_step = 1
    with caplog.at_level(logging.WARNING, logger="trl_hpt.callbacks"):
        callback.on_train_end(args, state, control)
    warnings = [r for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(warnings) == 1
    assert (tmp_path / REPORT_JSON_FILE).is_file() and not (tmp_path / REPORT_PLOT_FILE).exists()
    assert plot_gate_summary([], tmp_path / "empty.png") is False
