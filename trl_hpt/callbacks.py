"""Trainer callbacks of trl-hpt: a per-run report of HPT's gate decisions."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


__all__ = [
    "GATE_HISTORY_FILE",
    "REPORT_JSON_FILE",
    "REPORT_PLOT_FILE",
    "HPTReportCallback",
    "plot_gate_summary",
    "read_gate_history",
    "summarize_gate_history",
]

logger = logging.getLogger(__name__)

GATE_HISTORY_FILE = "hpt_gate_history.jsonl"
REPORT_JSON_FILE = "hpt_report.json"
REPORT_PLOT_FILE = "hpt_report.png"


def read_gate_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """
    Reads the gate records of a `hpt_gate_history.jsonl` file, one JSON object per line.

    A last line cut off by a crash mid-write is ignored rather than failing the whole report.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning(f"Skipping an unreadable line of {path}: {line[:80]!r}")
    return records


def summarize_gate_history(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Aggregates gate records (as in [`~trl_hpt.HPTTrainer`]'s `gate_history`) per training step.

    A record's `step` is the trainer's `global_step` when its batch was generated, so the batch first trains step
    `step + 1`: the summary uses that step, the one under which the Trainer logs `hpt/sft_fraction` (and TensorBoard
    and other trackers show it).

    Args:
        records (`Iterable[dict]`):
            Records with `step`, `accuracy`, `alpha` and `sft` keys.

    Returns:
        `list[dict]`: One entry per step, sorted by step, with `step`, `sft_fraction` (share of the step's prompts sent
        to SFT), `rl_fraction` (share with an RL weight `alpha > 0`), `accuracy` (mean prompt accuracy `P` over the
        prompts whose `P` is known, as `hpt/prompt_accuracy`; `None` when no rollout of the step was scored),
        `unscored_fraction` (share of prompts none of whose rollouts was scored: their record's `accuracy` is `None`)
        and `num_prompts`.
    """
    by_step: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_step.setdefault(int(record["step"]), []).append(record)
    summary = []
    for step in sorted(by_step):
        group = by_step[step]
        count = len(group)
        scored = [float(r["accuracy"]) for r in group if r.get("accuracy") is not None]
        summary.append(
            {
                "step": step + 1,
                "sft_fraction": sum(bool(r["sft"]) for r in group) / count,
                "rl_fraction": sum(float(r.get("alpha", 0.0)) > 0 for r in group) / count,
                "accuracy": sum(scored) / len(scored) if scored else None,
                "unscored_fraction": (count - len(scored)) / count,
                "num_prompts": count,
            }
        )
    return summary


def plot_gate_summary(summary: list[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> bool:
    """
    Draws the SFT fraction and the mean prompt accuracy per step into a PNG.

    The figure is drawn on matplotlib's Agg canvas directly, without pyplot, so the caller's backend and open
    figures are left alone (and no display is needed).

    Args:
        summary (`list[dict]`):
            The output of [`summarize_gate_history`].
        path (`str` or `os.PathLike`):
            Where to write the PNG.
        title (`str`, *optional*):
            Figure title.

    Returns:
        `bool`: Whether the PNG was written (`False` when matplotlib is not installed or there is nothing to plot).
    """
    if not summary:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            "matplotlib is not installed, so the HPT report plot is skipped (the JSON report is still written). "
            "Install it with `pip install trl-hpt[plot]`."
        )
        return False

    steps = [entry["step"] for entry in summary]
    figure = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # Markers keep short runs readable; on long runs they would only clutter the lines.
    marker = "o" if len(steps) <= 60 else None
    axes.plot(steps, [e["sft_fraction"] for e in summary], marker=marker, color="tab:orange", label="SFT fraction")
    # A step without any scored prompt has no accuracy: a gap in the line rather than a fake 0.
    accuracy = [float("nan") if e["accuracy"] is None else e["accuracy"] for e in summary]
    axes.plot(steps, accuracy, marker=marker, color="tab:blue", label="mean prompt accuracy P")
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("training step")
    axes.set_ylabel("share of prompts / accuracy")
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    axes.set_title(title or "HPT: prompts learnt by SFT vs. rollout accuracy")
    figure.tight_layout()
    figure.savefig(str(path), format="png")
    return True


class HPTReportCallback(TrainerCallback):
    r"""
    Records [`~trl_hpt.HPTTrainer`]'s per-prompt gate decisions during training and writes a report at the end.

    On the main process:

    - at each step end, the records of `trainer.gate_history` not yet written (one per prompt: `step`,
      `prompt_index`, `accuracy`, `alpha`, `beta`, `sft`) are appended to `<output_dir>/hpt_gate_history.jsonl`;
    - at the end of training, `<output_dir>/hpt_report.json` (per step: `sft_fraction`, `rl_fraction`, `accuracy`,
      `unscored_fraction`, `num_prompts`; see [`summarize_gate_history`]) and `<output_dir>/hpt_report.png` (SFT
      fraction and mean prompt accuracy over steps; skipped with a warning when matplotlib is missing) are written
      from the whole file.

    Resuming from a checkpoint is safe: at the start of training, records of batches generated at or after the
    resumed `global_step` (whose training the checkpoint does not contain, and which are generated again) are
    removed from the file, so no step is counted twice. A fresh run (`global_step` 0) in the same `output_dir`
    starts a new file.

    [`~trl_hpt.HPTTrainer`] registers one of these itself when `HPTConfig.hpt_report` is `True` (the default), so
    there is normally nothing to add. Add one only to write a second report elsewhere (another `output_dir`), or
    with `hpt_report=False` to choose `plot` yourself. Of several callbacks of the same trainer writing into the
    same directory, only the first registered one writes; the others log a warning and do nothing, so every record
    is written once.

    Args:
        trainer ([`~trl_hpt.HPTTrainer`]):
            The trainer whose `gate_history` is reported.
        output_dir (`str`, *optional*):
            Directory of the report files. `None`: the training arguments' `output_dir`.
        plot (`bool`, *optional*, defaults to `True`):
            Whether to draw `hpt_report.png`.

    Example:

    ```python
    >>> trainer = HPTTrainer(model, reward_funcs, args=config, train_dataset=dataset)  # adds the report itself
    >>> trainer.add_callback(HPTReportCallback(trainer, output_dir="reports/run-1"))  # a second copy elsewhere
    >>> trainer.train()  # writes hpt_gate_history.jsonl, hpt_report.json and hpt_report.png into both directories
    ```
    """

    def __init__(self, trainer, output_dir: str | os.PathLike | None = None, plot: bool = True):
        self.trainer = trainer
        self.output_dir = output_dir
        self.plot = plot
        self._written = 0
        self._warned_inactive = False

    def _directory(self, args) -> Path:
        return Path(self.output_dir if self.output_dir is not None else args.output_dir)

    def _is_active(self, args) -> bool:
        """
        Whether this callback writes the report: it is the first registered `HPTReportCallback` of its trainer for
        its directory. Decided on each event from the trainer's callback list, so removing the first one hands the
        report to the next.
        """
        handler = getattr(self.trainer, "callback_handler", None)
        if handler is None:  # not registered with a Trainer (e.g. driven by hand): nothing to share with
            return True
        directory = self._directory(args).resolve()
        for callback in handler.callbacks:
            if (
                isinstance(callback, HPTReportCallback)
                and callback.trainer is self.trainer
                and callback._directory(args).resolve() == directory
            ):
                if callback is self:
                    return True
                if not self._warned_inactive:
                    self._warned_inactive = True
                    logger.warning(
                        f"Another HPTReportCallback already reports this trainer into {directory} (HPTTrainer adds "
                        "one itself when HPTConfig.hpt_report=True), so this one writes nothing; there is no need "
                        "to add it. Give it another `output_dir` for a second copy of the report."
                    )
                return False
        return True  # not in the list at all: driven by hand

    def _history(self) -> list[dict[str, Any]]:
        return getattr(self.trainer, "gate_history", None) or []

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if not self._is_active(args):
            # Kept in step, so that this callback writes from the right record if it ever takes the report over.
            self._written = len(self._history())
            return
        directory = self._directory(args)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / GATE_HISTORY_FILE
        kept = [record for record in read_gate_history(path) if int(record["step"]) < state.global_step]
        # Written to a side file and renamed, so a crash here cannot lose the records already kept.
        partial = path.with_name(path.name + ".tmp")
        with partial.open("w", encoding="utf-8") as file:
            file.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(partial, path)
        # Records made before this train() call (e.g. by manual generation) are not part of the run.
        self._written = len(self._history())

    def _append_new_records(self, args) -> None:
        history = self._history()
        if self._written > len(history):  # the trainer's list was replaced
            self._written = 0
        new = history[self._written :]
        if not new:
            return
        with (self._directory(args) / GATE_HISTORY_FILE).open("a", encoding="utf-8") as file:
            file.writelines(json.dumps(record) + "\n" for record in new)
            file.flush()
        self._written = len(history)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self._is_active(args):
            self._append_new_records(args)
        else:
            self._written = len(self._history())

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self._is_active(args):
            return
        self._append_new_records(args)
        directory = self._directory(args)
        summary = summarize_gate_history(read_gate_history(directory / GATE_HISTORY_FILE))
        report = {
            "gate_history": GATE_HISTORY_FILE,
            "global_step": state.global_step,
            "num_records": sum(entry["num_prompts"] for entry in summary),
            "steps": summary,
        }
        with (directory / REPORT_JSON_FILE).open("w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
        if self.plot:
            plot_gate_summary(summary, directory / REPORT_PLOT_FILE)
