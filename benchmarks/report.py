"""Markdown tables and plots of the benchmarks' JSON reports, and the statistics over seeds those reports store.

The measurement scripts (`speed.py`, `learning.py`, `real_model.py`) measure, write their JSON report and call this
module for its Markdown (and, for `learning.py`, its plot). The same functions re-render any report they wrote,
without torch or a model:

    python benchmarks/report.py benchmarks/results/learning.json                  # the Markdown, on stdout
    python benchmarks/report.py benchmarks/results/learning.json --markdown out.md --plot out.png

A report names its benchmark in its `"benchmark"` field; reports written before that field existed are recognised
by their keys. Only the standard library is imported at module level (matplotlib when plotting).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


__all__ = [
    "LEARNING_METHODS",
    "REAL_MODEL_METHODS",
    "aggregate",
    "benchmark_of",
    "brief_competence",
    "brief_learning",
    "brief_real_model",
    "learning_aggregate",
    "learning_paired",
    "machine_line",
    "markdown_table",
    "mean_std",
    "paired_differences",
    "plot",
    "real_model_aggregate",
    "real_model_paired",
    "render",
    "render_learning",
    "render_markdown",
    "render_real_model",
    "render_speed",
]


BENCHMARKS = ("speed", "learning", "real_model")

# The methods of each comparison, in table order, with their labels. The measurement scripts take their method
# choices from here, so that every method they can train has a row label.
LEARNING_METHODS = {
    "sft": 'SFT (`feedback="sft"`)',
    "sft_trl": "SFT (TRL `SFTTrainer`)",
    "sft_trl_grpo_order": "SFT (TRL `SFTTrainer`, GRPOTrainer's prompt order)",
    "grpo": 'GRPO (`feedback="rl"`)',
    "grpo_trl": "GRPO (TRL `GRPOTrainer`)",
    "sft_grpo": "SFT -> GRPO",
    "luffy": "LUFFY (`soft`, `luffy`)",
    "srft": "SRFT (`soft`, `srft`)",
    "hpt": 'HPT (`switch`, gate 0, `demonstration_aggregation="token_mean"`)',
    "hpt_lt": 'HPT, demonstration tokens aggregated like rollout tokens (`demonstration_aggregation="loss_type"`, the default)',
    "hpt_solved": 'HPT, `demonstration_aggregation="loss_type"`, `solved_advantage=1`',
    "hpt_chord": 'HPT, `demonstration_loss="chord_phi"`, `demonstration_aggregation="loss_type"`',
    "hpt_coef2": 'HPT, `demonstration_aggregation="loss_type"`, `demonstration_loss_coef=2`',
    "hpt_kl": 'HPT, `demonstration_aggregation="loss_type"`, KL to the start (`beta=kl_beta`)',
    "hpt_custom": "HPT with `custom_fields`",
}

REAL_MODEL_METHODS = {
    "sft": "SFT (TRL `SFTTrainer`)",
    "grpo": "GRPO (TRL `GRPOTrainer`)",
    "sft_grpo": "SFT -> GRPO",
    "luffy": 'LUFFY (`feedback="soft"`, `demonstration_loss="luffy"`)',
    "hpt": "HPT (`HPTTrainer` defaults)",
    "hpt_paper": "HPT, paper recipe scaled down",
    "hpt_solved": "HPT + `solved_advantage=1`",
    "hpt_chord": 'HPT + CHORD-phi demonstrations (`demonstration_loss="chord_phi"`)',
    "hpt_coef025": "HPT, `demonstration_loss_coef=0.25`",
    "hpt_coef2": "HPT, `demonstration_loss_coef=2`",
    "hpt_custom": "HPT with `custom_fields`",
}

# The metrics of the learning benchmark's paired differences (its final metrics hold more).
LEARNING_PAIRED_METRICS = ("greedy", "greedy_carry", "greedy_no_carry", "pass@4")


# ------------------------------------------------------------------------------------------------------------------
# Tables and provenance
# ------------------------------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """
    A GitHub Markdown table.

    Args:
        headers (`Sequence[str]`):
            The column titles.
        rows (`Sequence[Sequence]`):
            The rows, each with one cell per column; cells are converted with `str`, and a `|` in a cell is escaped.
        align (`str`, *optional*):
            One character per column: `l`, `r` or `c`. Defaults to the first column left, the others right.

    Returns:
        `str`: The table, without a final newline.
    """
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join(rule[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    """One line of the date, machine, library versions and commit of `benchmarks.common.machine_info`."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    generation = f" {info['cpu_generation']}" if info.get("cpu_generation") else ""
    return (
        f"{info['date']}, {info['cpu']}{generation} ({info['cpu_cores']} cores, {info['torch_threads']} torch "
        f"threads){gpu}, "
        f"torch {info['torch']}, trl {info['trl']}, transformers {info['transformers']}, commit {info['commit']}"
    )


def _fmt_range(s: dict, digits: int = 3) -> str:
    return f"{s['min']:.{digits}f}-{s['max']:.{digits}f}"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _points(mean_and_std) -> str:
    return f"{100 * mean_and_std[0]:+.1f} +- {100 * mean_and_std[1]:.1f}"


def _nats(mean_and_std) -> str:
    return f"{mean_and_std[0]:+.4f} +- {mean_and_std[1]:.4f}"


def paired_tables(
    paired: dict,
    labels: dict,
    caption: str,
    columns: Sequence[tuple[str, str, Callable]],
    count_key: str,
) -> list[str]:
    """
    Lines of one table per reference method: the reference minus each other method, paired by seed.

    Args:
        paired (`dict`):
            `{reference: {method: differences}}`, as [`paired_differences`] returns per reference.
        labels (`dict`):
            The row label of every method.
        caption (`str`):
            What follows "`<reference>` minus each method, " in the line above each table.
        columns (`Sequence[tuple[str, str, Callable]]`):
            `(header, metric, format)` of every column between the method and the seed count.
        count_key (`str`):
            The key of the number of seeds on which the reference is ahead.

    Returns:
        `list[str]`: The lines, each table preceded by an empty line, its caption and another empty line.
    """
    lines = []
    for reference, differences in paired.items():
        rows = [
            [labels[m], *(fmt(d[metric]) for _, metric, fmt in columns), f"{d[count_key]}/{d['n']} seeds"]
            for m, d in differences.items()
        ]
        lines += [
            "",
            f"{labels[reference]} minus each method, {caption}:",
            "",
            markdown_table(["method", *(header for header, _, _ in columns), "ahead (greedy)"], rows),
        ]
    return lines


# ------------------------------------------------------------------------------------------------------------------
# Statistics over seeds
# ------------------------------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(
    per_seed: Sequence[dict],
    methods: Sequence[str],
    metrics: Sequence[str],
    extras: Callable[[list[dict]], dict] | None = None,
    key: str = "final",
) -> dict:
    """
    Mean and std over seeds of every final metric, per method.

    Args:
        per_seed (`Sequence[dict]`):
            One `{method: record}` per seed, each record with its final metrics under `"final"`.
        methods (`Sequence[str]`):
            The methods to aggregate.
        metrics (`Sequence[str]`):
            The final metrics to aggregate.
        extras (`Callable[[list[dict]], dict]`, *optional*):
            Called with a method's records of every seed; what it returns is added to that method's entry.
        key (`str`, *optional*, defaults to `"final"`):
            The key of each record that holds the metrics (`"validation"`: the learning benchmark's validation split).

    Returns:
        `dict`: `{method: {metric: (mean, std), **extras(records)}}`.
    """
    out = {}
    for method in methods:
        records = [s[method] for s in per_seed]
        out[method] = {k: mean_std(r[key][k] for r in records) for k in metrics}
        if extras is not None:
            out[method].update(extras(records))
    return out


def paired_differences(
    per_seed: Sequence[dict], methods: Sequence[str], reference: str, metrics: Sequence[str], count_key: str
) -> dict:
    """
    `reference` minus every other method, seed by seed (methods of one seed share their starting point).

    Args:
        per_seed (`Sequence[dict]`):
            One `{method: record}` per seed, each record with its final metrics under `"final"`.
        methods (`Sequence[str]`):
            The methods to compare with `reference` (`reference` itself is skipped).
        reference (`str`):
            The method subtracted from.
        metrics (`Sequence[str]`):
            The final metrics to compare.
        count_key (`str`):
            The key under which to store the number of seeds where `reference` has the higher greedy accuracy.

    Returns:
        `dict`: `{method: {metric: (mean, std) of the differences, count_key: int, "n": number of seeds}}`.
    """
    out = {}
    for method in methods:
        if method == reference:
            continue
        diffs = {k: [s[reference]["final"][k] - s[method]["final"][k] for s in per_seed] for k in metrics}
        out[method] = {k: mean_std(v) for k, v in diffs.items()}
        out[method][count_key] = sum(d > 0 for d in diffs["greedy"])
        out[method]["n"] = len(per_seed)
    return out


def _learning_extras(records: list[dict]) -> dict:
    out = {
        "generated_tokens": mean_std(r["generated_tokens"] for r in records),
        "seconds": mean_std(r["seconds"] for r in records),
    }
    gates = [r["gate"] for r in records if r["gate"]]
    if gates:
        first = [statistics.fmean(g[1] for g in gate[: max(1, len(gate) // 10)]) for gate in gates]
        last = [statistics.fmean(g[1] for g in gate[-max(1, len(gate) // 10) :]) for gate in gates]
        out["sft_fraction_first_10pct"] = mean_std(first)
        out["sft_fraction_last_10pct"] = mean_std(last)
    return out


def learning_aggregate(
    results: dict, methods: Sequence[str], group: str = "methods", validation: bool = False
) -> dict:
    """
    The learning benchmark's aggregate: mean and std over seeds of every final metric, per method of `group`
    (`"methods"` or `"sensitivity"`) and for the warm start, with generated tokens, seconds and HPT's SFT share; with
    `validation`, the metrics on the validation problems instead (and nothing else).
    """
    warm, key = ("warm_start_validation", "validation") if validation else ("warm_start", "final")
    seeds = list(results["seeds"].values())
    metrics = list(seeds[0][warm].keys())
    out = {"warm_start": {k: mean_std(s[warm][k] for s in seeds) for k in metrics}}
    extras = None if validation else _learning_extras
    out.update(aggregate([s[group] for s in seeds], methods, metrics, extras, key=key))
    return out


def custom_label(settings: dict) -> str:
    """The label of an `hpt_custom` method: its `custom_fields`."""
    return "HPT, " + ", ".join(f"`{field}`" for field in settings["custom_fields"])


def learning_config_label(settings: dict, method: str) -> str:
    """A learning method's label with the settings that parametrise it (`custom_fields`, `kl_beta`, the SFT share);
    `warm_start`, the aggregates' row of the starting weights, is "warm start"."""
    if method == "warm_start":
        return "warm start"
    if method == "hpt_custom":
        return custom_label(settings)
    if method == "hpt_kl":
        return f"HPT, KL to the start (`beta={settings['kl_beta']:g}`)"
    if method == "sft_grpo":
        return f"SFT -> GRPO, {settings.get('sft_grpo_sft_fraction', 0.5):g} of the steps on SFT"
    return LEARNING_METHODS[method]


def check_warm_starts(reports: Sequence[dict]) -> None:
    """
    Raise unless the learning reports of each task share their warm start on every seed they have in common.

    Rows from runs whose methods started from other weights (another machine or library version can move the warm
    start) do not compare; a table of them would silently show one run's warm start for all.
    """
    seen: dict[tuple[str, str], dict] = {}
    for report in reports:
        style = report["settings"].get("demonstration_style", "plain")
        for seed, per_seed in report["results"]["seeds"].items():
            start = {k: per_seed.get(k) for k in ("warm_start", "warm_start_validation")}
            first = seen.setdefault((style, seed), {"start": start, "report": report})
            if first["start"] != start:
                raise ValueError(
                    f"task {style!r}, seed {seed}: the warm start differs between the run of "
                    f"{machine_line(first['report']['machine'])} and that of {machine_line(report['machine'])}, so "
                    "their methods did not start alike; rerun one of them where the other ran"
                )


def learning_sweep_table(reports: Sequence[dict]) -> str:
    """
    Validation accuracy of every configuration in `reports` (learning reports with a validation split), one column
    pair per task (demonstration style), with the mean greedy accuracy over the tasks a configuration ran on.
    """
    check_warm_starts(reports)
    styles, table = [], {}
    for report in reports:
        if "aggregate_validation" not in report:
            raise ValueError("a sweep needs learning reports with a validation split (validation > 0)")
        settings = report["settings"]
        style = settings.get("demonstration_style", "plain")
        if style not in styles:
            styles.append(style)
        for method, values in report["aggregate_validation"].items():
            label = learning_config_label(settings, method)
            table.setdefault(label, {})[style] = (values["greedy"][0], values["greedy_no_carry"][0])
    headers = ["configuration"]
    for style in styles:
        headers += [f"{style}: greedy", f"{style}: no carry"]
    headers.append("mean greedy")
    rows = []
    for label, by_style in table.items():
        row = [label]
        for style in styles:
            greedy, no_carry = by_style.get(style, (None, None))
            row += [
                "" if greedy is None else f"{100 * greedy:.1f}",
                "" if no_carry is None else f"{100 * no_carry:.1f}",
            ]
        row.append(f"{100 * statistics.fmean(g for g, _ in by_style.values()):.1f}")
        rows.append(row)
    return markdown_table(headers, rows)


def learning_frontier_table(reports: Sequence[dict]) -> str:
    """
    What each configuration in `reports` (learning reports of one task, with a validation split) learnt against what
    it kept: validation accuracy on the problems with a carry (the skill the warm start lacks) and on those without
    (its retention), mean over seeds, ordered by the first. A configuration is on the frontier when no other one is
    at least as accurate on both kinds and more accurate on one; the last column names, for each other one, a
    configuration that dominates it.
    """
    check_warm_starts(reports)
    styles = sorted({report["settings"].get("demonstration_style", "plain") for report in reports})
    if len(styles) != 1:
        raise ValueError(f"a frontier compares configurations of one task, got the tasks {styles}")
    points: dict[str, tuple[float, float, float]] = {}
    for report in reports:
        if "aggregate_validation" not in report:
            raise ValueError("a frontier needs learning reports with a validation split (validation > 0)")
        for method, values in report["aggregate_validation"].items():
            label = learning_config_label(report["settings"], method)
            points.setdefault(label, (values["greedy_carry"][0], values["greedy_no_carry"][0], values["greedy"][0]))

    def dominates(a, b):
        return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])

    rows = []
    for label, point in sorted(points.items(), key=lambda item: (item[1][0], item[1][1])):
        better = [other for other, p in points.items() if dominates(p, point)]
        # The dominating configuration that learnt the least: the nearest evidence that this one is not needed.
        witness = min(better, key=lambda other: points[other][0]) if better else ""
        cells = [f"{100 * v:.1f}" for v in point]
        rows.append([label, *cells, "yes" if not better else "", witness])
    headers = ["configuration", "with a carry", "without (retention)", "all", "frontier", "dominated by"]
    return markdown_table(headers, rows, align="lrrrcl")


def learning_tasks_tables(reports: Sequence[dict], reference: str = "hpt_custom") -> str:
    """
    Held-out accuracy of every method in `reports` (learning reports, one per task and configuration), one column pair
    per task (demonstration style), mean +- std over seeds; then `reference` of each report minus every other method
    of that report, paired by seed (greedy, with the seeds ahead, and no-carry accuracy, the task's retention).
    """
    check_warm_starts(reports)
    styles, table, pairs = [], {}, {}
    for report in reports:
        settings = report["settings"]
        style = settings.get("demonstration_style", "plain")
        if style not in styles:
            styles.append(style)
        for method, values in report["aggregate"].items():
            label = learning_config_label(settings, method)
            table.setdefault(label, {}).setdefault(style, (values["greedy"], values["greedy_no_carry"]))
        if reference in report["methods"]:
            results, methods = report["results"], report["methods"]
            for method, diff in learning_paired(results, methods, reference).items():
                key = (learning_config_label(settings, reference), learning_config_label(settings, method))
                pairs.setdefault(key, {})[style] = diff
    headers = ["method"] + [f"{style}: {column}" for style in styles for column in ("greedy", "no carry")]
    rows = []
    for label, by_style in table.items():
        row = [label]
        for style in styles:
            row += [f"{100 * m:.1f} +- {100 * sd:.1f}" for m, sd in by_style[style]] if style in by_style else ["", ""]
        rows.append(row)
    lines = [markdown_table(headers, rows)]
    if pairs:
        rows = []
        for (ours, other), by_style in pairs.items():
            row = [ours, other]
            for style in styles:
                d = by_style.get(style)
                row += (
                    [f"{_points(d['greedy'])} ({d['wins']}/{d['n']})", _points(d["greedy_no_carry"])]
                    if d
                    else ["", ""]
                )
            rows.append(row)
        lines += ["", markdown_table(["configuration", "minus", *headers[1:]], rows)]
    return "\n".join(lines)


def learning_paired(results: dict, methods: Sequence[str], reference: str = "hpt") -> dict:
    """The learning benchmark's `reference` minus every other method, seed by seed (they share the warm start)."""
    per_seed = [s["methods"] for s in results["seeds"].values()]
    return paired_differences(per_seed, methods, reference, LEARNING_PAIRED_METRICS, "wins")


def real_model_metrics(settings: dict) -> list[str]:
    """The final metrics the real-model benchmark aggregates and compares (the tuning split's when it has one)."""
    metrics = ["greedy", *(f"pass@{k}" for k in settings["pass_k"]), "boxed", "retention", "kl"]
    if settings.get("tuning_size"):
        metrics += ["tuning_greedy", *(f"tuning_pass@{k}" for k in settings["pass_k"]), "tuning_boxed"]
    return metrics


def _real_model_extras(records: list[dict]) -> dict:
    steps = [t for r in records for t in r["step_seconds"]]
    out = {
        "step_seconds": statistics.median(steps) if steps else float("nan"),
        "seconds": mean_std(r["seconds"] for r in records),
    }
    fractions = [e["hpt/sft_fraction"] for r in records for e in r["logs"] if "hpt/sft_fraction" in e]
    if fractions:
        out["sft_fraction"] = statistics.fmean(fractions)
    rewards = [e["reward"] for r in records for e in r["logs"] if "reward" in e]
    if rewards:
        out["train_reward"] = statistics.fmean(rewards)
    return out


def real_model_aggregate(results: dict, methods: Sequence[str], settings: dict) -> dict:
    """
    The real-model benchmark's aggregate: mean and std over seeds of every final metric, per method, with the median
    seconds per step, seconds per run, HPT's mean SFT share and the mean training reward.
    """
    per_seed = list(results["seeds"].values())
    return aggregate(per_seed, methods, real_model_metrics(settings), _real_model_extras)


def real_model_paired(results: dict, methods: Sequence[str], settings: dict, reference: str = "hpt") -> dict:
    """The real-model benchmark's `reference` minus every other method, seed by seed (same split, model and seed)."""
    per_seed = list(results["seeds"].values())
    return paired_differences(per_seed, methods, reference, real_model_metrics(settings), "ahead")


# ------------------------------------------------------------------------------------------------------------------
# speed.py
# ------------------------------------------------------------------------------------------------------------------


def _ratio_row(label: str, s: dict, digits: int, target: float | None) -> list[str]:
    verdict = "(context)" if target is None else f"<= {target}: {_met(s['ratio']['median'] <= target)}"
    return [
        label,
        f"{s['grpo']['median']:.{digits}f}",
        f"{s['hpt']['median']:.{digits}f}",
        f"{s['ratio']['median']:.3f}",
        _fmt_range(s["ratio"]),
        verdict,
    ]


def render_speed(report: dict) -> str:
    """The Markdown of a `speed.py` report: step time, memory, overhead by component and the loss pass."""
    info, settings, targets = report["machine"], report["settings"], report["targets"]
    device = info["device"]
    headline = "wall" if device.startswith("cuda") else "cpu"
    lines = [f"Machine: {machine_line(info)}."]
    if "load_average_start" in report and "load_average_end" in report:
        lines[0] += (
            f" 1-minute load average {report['load_average_start'][0]:.1f} at the start, "
            f"{report['load_average_end'][0]:.1f} at the end (other jobs share the machine)."
        )
    if "seconds" in report:
        lines[0] += f" Whole run: {report['seconds']:.0f} s."
    lines.append("")
    if report.get("quick"):
        lines += ["**Quick mode (smoke test): sizes too small for the ratios or the targets to mean anything.**", ""]
    rows = []
    step, memory = report.get("step_time"), report.get("memory")
    if step is not None or memory is not None:
        lines += [
            f'**(a) Step time and memory**, `HPTTrainer(feedback="rl")` vs `GRPOTrainer`: Qwen2-style model hidden '
            f"{settings['step_hidden']}, {settings['step_layers']} layers, {settings['step_prompts']} prompts x "
            f"{settings['num_generations']} generations, up to {settings['step_completion']} completion tokens, "
            f"{settings['steps']} steps per run (first dropped).",
            "",
        ]
    if step is not None:
        lines += [
            f"Time: {settings['repetitions']} repetitions after a warm-up one; in each, the two trainers train in "
            "lockstep (one optimizer step each in turn, the leader alternating between repetitions). Seconds per "
            "optimizer step: median over repetitions of the per-repetition median; HPT/GRPO: median over "
            "repetitions of the median of the step-by-step ratios (HPT step k / GRPO step k), and their range over "
            f"repetitions. Same rollouts in both trainers: {step['same_rollouts']}; same final loss: "
            f"{step['same_final_loss']}.",
            "",
        ]
        labels = {
            "cpu": "CPU time per step (s)",
            "wall": "wall time per step (s)",
            "trl_step_time": "TRL `step_time` metric, wall (s)",
        }
        for key in ("cpu", "wall", "trl_step_time"):
            s = step[key]
            is_target = key == headline
            rows.append(_ratio_row(labels[key], s, 4, targets["time_ratio"] if is_target else None))
        if "cuda_peak_mib" in step:
            rows.append(
                _ratio_row(
                    "`torch.cuda.max_memory_allocated` (MiB)", step["cuda_peak_mib"], 1, targets["memory_ratio"]
                )
            )
    if memory is not None:
        rows.append(
            _ratio_row("peak RSS minus pre-train RSS (MiB)", memory["train_increment_mib"], 1, targets["memory_ratio"])
        )
        rows.append(_ratio_row("peak RSS of the whole process (MiB)", memory["peak_rss_mib"], 1, None))
    if rows:
        lines.append(markdown_table(["measure", "GRPO", "HPT (rl)", "HPT/GRPO", "min-max", "target"], rows))
    if memory is not None:
        lines += [
            "",
            f"Memory: {settings['memory_repetitions']} fresh subprocesses per trainer, alternating, same config as "
            "the step-time runs.",
        ]
    components = report.get("components")
    if components is not None:
        step_ms = 1000 * step[headline]["grpo"]["median"] if step is not None else None
        rows = []
        labels = {
            "generate_and_score": "`_generate_and_score_completions`",
            "loss_backward": "`_compute_loss` + backward",
        }
        for name, c in components.items():
            rows.append(
                [
                    labels[name],
                    f"{1000 * c['grpo']['median']:.1f}",
                    f"{1000 * c['hpt']['median']:.1f}",
                    f"{c['difference_ms']:+.1f}",
                    f"{100 * c['difference_ms'] / step_ms:+.1f}%" if step_ms else "",
                    f"{c['host_syncs']['grpo']} / {c['host_syncs']['hpt']}",
                ]
            )
        if step_ms:
            extra = sum(c["difference_ms"] for c in components.values())
            rows.append(
                ["sum: estimated HPT/GRPO step ratio", "", "", f"{extra:+.1f}", f"{1 + extra / step_ms:.3f}", ""]
            )
        lines += [
            "",
            f"Overhead by component (same config, one batch, {settings['component_repetitions']} alternating "
            f"repetitions, medians of {headline} time): HPT's override against GRPOTrainer's method on the same "
            "trainer and inputs. Host syncs: tensor-to-Python conversions per call (`item`, `bool`, `float`, `int`, "
            "`tolist`), each a device synchronisation on a GPU.",
            "",
            markdown_table(
                ["component", "GRPO (ms)", "HPT (ms)", "HPT - GRPO (ms)", "of a GRPO step", "host syncs GRPO / HPT"],
                rows,
            ),
        ]
    if "loss_pass" in report:
        tolerance = targets["loss_pass"]
        lines += [
            "",
            f"**(b) Loss pass** (`_compute_loss` + `backward`), a fraction g of the groups sent to SFT: hidden "
            f"{settings['loss_hidden']}, {settings['loss_layers']} layers, {settings['loss_prompts']} prompts x "
            f"{settings['num_generations']} generations = {settings['loss_prompts'] * settings['num_generations']} "
            f"rows, completions and demonstrations up to {settings['loss_completion']} tokens, "
            f"{settings['loss_repetitions']} alternating repetitions after a warm-up. HPT/GRPO = ratio of medians "
            f"({headline} time); ideal = 1 - g + g/G; target: within {tolerance:.0%} of ideal.",
            "",
        ]
        rows = []
        for e in report["loss_pass"]["results"]:
            s = e[headline]
            dev = s["deviation_from_ideal"]
            row = [
                f"{e['g']:.2f}",
                f"{e['rows_through_model_hpt']}/{e['rows_through_model_grpo']}",
                f"{s['grpo']['median']:.4f}",
                f"{s['hpt']['median']:.4f}",
                f"{s['ratio_of_medians']:.3f}",
                _fmt_range(s["pair_ratio"]),
                f"{e['ideal_ratio']:.3f}",
                f"{dev:+.1%}",
            ]
            if headline == "cpu":
                row.append(f"{e['wall']['ratio_of_medians']:.3f}")
            row.append(_met(abs(dev) <= tolerance))
            rows.append(row)
        headers = ["g", "rows HPT/GRPO", "GRPO (s)", "HPT (s)", "HPT/GRPO", "pair min-max", "ideal", "vs ideal"]
        headers += ["wall HPT/GRPO"] if headline == "cpu" else []
        lines.append(markdown_table([*headers, "target"], rows))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# learning.py
# ------------------------------------------------------------------------------------------------------------------


def brief_learning(metrics: dict) -> str:
    """One progress line of a learning benchmark evaluation: greedy accuracies and pass@k."""
    return (
        f"greedy {metrics['greedy']:.2f} (carry {metrics['greedy_carry']:.2f}, no carry "
        f"{metrics['greedy_no_carry']:.2f}), "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("pass@") and "_" not in k)
    )


def learning_method_table(agg: dict, methods: Sequence[str], ks: Sequence[int]) -> str:
    """The learning benchmark's table of final metrics: the warm start, then every method of `methods`."""

    def cell(metric, method):
        mean, std = agg[method][metric]
        return f"{100 * mean:.1f} +- {100 * std:.1f}"

    headers = ["method", "greedy", "greedy, carry", "greedy, no carry"]
    headers += [f"pass@{k}" for k in ks] + [f"pass@{k}, carry" for k in ks]
    headers += ["generated tokens", "SFT share (first/last 10%)", "s/run"]
    rows = []
    for method in ["warm_start", *methods]:
        row = [LEARNING_METHODS.get(method, "warm start (before post-training)")]
        row += [cell(m, method) for m in ("greedy", "greedy_carry", "greedy_no_carry")]
        row += [cell(f"pass@{k}", method) for k in ks] + [cell(f"pass@{k}_carry", method) for k in ks]
        if method == "warm_start":
            row += ["", "", ""]
        else:
            row.append(f"{agg[method]['generated_tokens'][0]:.0f}")
            if "sft_fraction_first_10pct" in agg[method]:
                first, last = agg[method]["sft_fraction_first_10pct"][0], agg[method]["sft_fraction_last_10pct"][0]
                row.append(f"{first:.2f} / {last:.2f}")
            else:
                row.append("")
            row.append(f"{agg[method]['seconds'][0]:.0f}")
        rows.append(row)
    return markdown_table(headers, rows)


def render_learning(report: dict) -> str:
    """The Markdown of a `learning.py` report: task and settings, the method tables, gradient scales, paired tables."""
    settings, agg, methods = report["settings"], report["aggregate"], report["methods"]
    split = report["results"]["split"]
    ks = settings["pass_k"]
    lines = [
        f"Machine: {machine_line(report['machine'])}. Whole run: {report['seconds'] / 60:.1f} min.",
        "",
        f"Task: `aa+bb=` -> `cc`, a, b in [0, {settings['max_operand']}); "
        + (
            "demonstrations in a style the model never wrote (`c c`, digits spaced; the verifier accepts both); "
            if settings.get("demonstration_style", "plain") == "spaced"
            else ""
        )
        + f"{split['train']} post-training prompts, "
        f"{split['held_out']} held-out ({split['held_out_with_carry']} with a carry). Model: Qwen2-style, hidden "
        f"{settings['hidden_size']}, {settings['num_layers']} layers, warm-started {settings['warmup_steps']} steps "
        f"(lr {settings['warmup_lr']}, batch {settings['warmup_batch']}) on "
        + (
            f"the {split['warm_start']} no-carry post-training problems"
            if settings.get("warm_start_set", "no_carry") == "no_carry"
            else f"{settings['warm_start_size']} random post-training problems (carry or not)"
        )
        + f". Every method: {settings['steps']} optimizer steps from the warm start, "
        f"{settings['prompts_per_step']} prompts per step, {settings['num_generations']} rollouts per prompt "
        f"(up to {settings['max_completion_length']} tokens, temperature {settings['temperature']}), AdamW lr "
        f'{settings["learning_rate"]} constant, `loss_type="dr_grpo"`, `scale_rewards="none"`, '
        + (f"no KL but for `hpt_kl` (beta {settings['kl_beta']}), " if "hpt_kl" in methods else "no KL, ")
        + (f"`custom_fields` {', '.join(settings['custom_fields'])}, " if "hpt_custom" in methods else "")
        + (
            f"SFT -> GRPO with {settings.get('sft_grpo_sft_fraction', 0.5):g} of the steps on SFT, "
            if "sft_grpo" in methods
            else ""
        )
        + f"`demonstration_loss_coef={settings.get('demonstration_loss_coef', settings.get('sft_loss_coef'))}`. {settings['seeds']} seed(s); mean +- std over seeds. pass@k "
        f"from {settings['eval_samples']} samples per problem at temperature {settings['temperature']}.",
        "",
    ]

    for part in report.get("merged_from", ()):
        lines.append(f"Merged: {', '.join(part['methods'])} from the run on {part['machine']}.")
    if "merged_from" in report:
        lines.append("")
    lines.append(learning_method_table(agg, methods, ks))
    lines += [
        "",
        "Accuracies in %, mean +- std over seeds. Generated tokens: completion tokens sampled during post-training "
        "(mean over seeds; TRL's SFTTrainer samples none). SFT share: HPT's `hpt/sft_fraction`, the share of prompts "
        "sent to SFT, averaged over the first and the last 10% of the steps.",
    ]
    if "aggregate_validation" in report:
        validation = report["aggregate_validation"]
        rows = [
            [LEARNING_METHODS.get(m, "warm start (before post-training)")]
            + [f"{100 * validation[m][k][0]:.1f} +- {100 * validation[m][k][1]:.1f}" for k in LEARNING_PAIRED_METRICS]
            for m in ["warm_start", *methods]
        ]
        lines += [
            "",
            f"On the {split['validation']} validation problems (set aside from the post-training prompts; settings are "
            "chosen on these):",
            "",
            markdown_table(["method", "greedy", "greedy, carry", "greedy, no carry", "pass@4"], rows),
        ]
    if "aggregate_sensitivity" in report:
        sensitivity = report["aggregate_sensitivity"]
        lines += [
            "",
            f"Learning-rate sensitivity: the same runs with lr {settings['sensitivity_lr']} instead of "
            f"{settings['learning_rate']}:",
            "",
            learning_method_table(sensitivity, list(settings["sensitivity_methods"]), ks),
        ]
    if "gradient_scale" in report["results"]:
        rows = []
        for name, d in report["results"]["gradient_scale"].items():
            if name == "demonstration_tokens":
                continue
            ratio = d["offline_grad_norm"] / d["online_grad_norm"] if d["online_grad_norm"] > 0 else float("inf")
            rows.append(
                [
                    name,
                    d["prompts_to_sft"],
                    f"{d['online_rows_nonzero_advantage']}/{d['online_rows']}",
                    f"{d['online_grad_norm']:.4f}",
                    f"{d['offline_grad_norm']:.4f}",
                    f"{ratio:.1f}",
                ]
            )
        lines += [
            "",
            f"Gradient norms of the two loss terms on one batch at the warm start (seed 0, {settings['prompts_per_step']} "
            "training prompts, half with a carry):",
            "",
            markdown_table(
                [
                    "method",
                    "demonstrations placed",
                    "rollout rows with A != 0",
                    "RL term grad norm",
                    "demonstration term grad norm",
                    "ratio",
                ],
                rows,
            ),
        ]
        tokens = report["results"]["gradient_scale"].get("demonstration_tokens")
        if tokens:
            lines += [
                "",
                f"Tokens of the demonstrations HPT placed in that batch ({tokens['num_tokens']}): the warm-started model "
                f"gives them probability p with median {tokens['median_p']:.2g} (mean {tokens['mean_p']:.2g}). The "
                f"mean weight on `grad log p` is 1 for SFT, {tokens['mean_weight_srft']:.2g} for SRFT (`p`) and "
                f"{tokens['mean_weight_luffy']:.2g} for LUFFY (`gamma p / (p + gamma)^2`); SFT divides by the "
                f"{tokens['sft_denominator_tokens']} demonstration tokens, LUFFY and SRFT by dr_grpo's "
                f"{tokens['dr_grpo_denominator']} (rows x max completion length).",
            ]
    columns = [
        (header, metric, _points)
        for header, metric in zip(("greedy", "greedy, carry", "greedy, no carry", "pass@4"), LEARNING_PAIRED_METRICS)
    ]
    lines += paired_tables(
        report.get("paired", {}),
        LEARNING_METHODS,
        "paired by seed (same warm start), mean +- std over seeds, in points",
        columns,
        "wins",
    )
    return "\n".join(lines) + "\n"


def plot_learning(report: dict, path: Path) -> None:
    """Final held-out accuracies (bars) and held-out greedy accuracy over the steps (curves) of a learning report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, agg = report["methods"], report["aggregate"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    names = ["warm_start", *methods]
    x = range(len(names))
    width = 0.27
    for offset, (metric, label) in zip(
        (-width, 0.0, width), (("greedy", "greedy"), ("greedy_carry", "greedy, carry"), ("pass@4", "pass@4"))
    ):
        means = [100 * agg[m][metric][0] for m in names]
        stds = [100 * agg[m][metric][1] for m in names]
        left.bar([i + offset for i in x], means, width, yerr=stds, capsize=3, label=label)
    left.set_xticks(list(x))
    left.set_xticklabels(["warm start", *methods], rotation=30, ha="right")
    left.set_ylabel("held-out accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title(f"Final held-out accuracy, mean +- std over {report['settings']['seeds']} seed(s)")
    left.legend(loc="upper left")
    seeds = list(report["results"]["seeds"].values())
    for method in methods:
        curves = [s["methods"][method]["curve"] for s in seeds]
        steps = [p[0] for p in curves[0]]
        values = [[p[1] for p in c] for c in curves]
        stats = [mean_std(v) for v in zip(*values)]
        mean, std = [m * 100 for m, _ in stats], [d * 100 for _, d in stats]
        (line,) = right.plot(steps, mean, marker="o", markersize=3, label=method)
        right.fill_between(
            steps,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            alpha=0.12,
            color=line.get_color(),
        )
    right.set_xlabel("optimizer step")
    right.set_ylabel("held-out greedy accuracy (%)")
    right.set_ylim(0, 105)
    right.set_title("Held-out greedy accuracy during post-training")
    right.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# real_model.py
# ------------------------------------------------------------------------------------------------------------------


def brief_competence(results: dict) -> str:
    """One progress line of the base model's competence on the validation split."""
    c = results["base_competence"]
    return (
        f"greedy {c['greedy']:.2f}; {c['solved_by_some_rollout']}/{c['problems']} problems solved by some of "
        f"{c['samples_per_problem']} rollouts, {c['never_solved']} by none (rollout accuracy {c['rollout_accuracy']:.2f})"
    )


def brief_real_model(metrics: dict, pass_k: Sequence[int]) -> str:
    """One progress line of a real-model evaluation: greedy accuracy, pass@k, boxed share, retention and KL."""
    passes = ", ".join(f"pass@{k} {metrics[f'pass@{k}']:.2f}" for k in pass_k)
    return (
        f"greedy {metrics['greedy']:.2f}, {passes}, boxed {metrics['boxed']:.2f}, retention "
        f"{metrics['retention']:.2f}, KL {metrics['kl']:.4f}"
    )


def render_real_model(report: dict) -> str:
    """The Markdown of a `real_model.py` report: model, task and settings, base competence, methods, paired tables."""
    settings, agg, methods, results = report["settings"], report["aggregate"], report["methods"], report["results"]
    ks = settings["pass_k"]
    split, competence = results["split"], results["base_competence"]
    example = results["example_problem"]
    lines = [
        f"Machine: {machine_line(report['machine'])}. Whole run: {report['seconds'] / 60:.1f} min"
        + (" (`--quick` smoke run: too small to compare methods)." if report["quick"] else "."),
        "",
        f"Model: SmolLM2-135M-Instruct (`{Path(report['model_dir']).name}`), LoRA r={settings['lora_r']} "
        f"alpha={settings['lora_alpha']} on every linear layer, device {report['device']}. Task: additions "
        f"({', '.join(settings['families'])}), {split['train']} train / {split['validation']} validation / "
        f"{split['test']} test problems, e.g. `{example['question']}` with the demonstration "
        f"`{example['solution']}`. Every method: {settings['steps']} optimizer steps, {settings['prompts_per_step']} "
        f"prompts per step ({settings['num_generations']} rollouts each, up to {settings['max_completion_length']} "
        f"tokens, temperature {settings['temperature']}), AdamW lr {settings['learning_rate']} constant; "
        f"SFT -> GRPO: {settings.get('sft_grpo_sft_fraction', 0.5):g} of the steps on SFT. "
        f"{settings['seeds']} seed(s) ({', '.join(str(k) for k in results['seeds'])}), mean +- std over seeds.",
        "",
        f"Base model on the {competence['problems']} validation problems: greedy accuracy "
        f"{100 * competence['greedy']:.0f}%; with {competence['samples_per_problem']} rollouts each, "
        f"{competence['solved_by_some_rollout']} problems solved by at least one, {competence['solved_by_every_rollout']} "
        f"by all, {competence['never_solved']} by none (rollout accuracy {100 * competence['rollout_accuracy']:.0f}%).",
        "",
    ]
    headers = ["method", "greedy", *(f"pass@{k}" for k in ks), "boxed", "retention", "KL to start", "s/step", "s/run"]
    headers += ["SFT share"]
    rows = []
    base = results["base"]
    rows.append(
        [
            "base model (before post-training)",
            *(f"{100 * base[m]:.1f}" for m in ("greedy", *(f"pass@{k}" for k in ks), "boxed", "retention")),
            f"{base['kl']:.4f}",
            "",
            "",
            "",
        ]
    )
    labels = dict(REAL_MODEL_METHODS)
    if "hpt_custom" in methods:
        labels["hpt_custom"] = custom_label(settings)
    for method in methods:
        a = agg[method]
        row = [labels[method]]
        row += [
            f"{100 * a[m][0]:.1f} +- {100 * a[m][1]:.1f}"
            for m in ("greedy", *(f"pass@{k}" for k in ks), "boxed", "retention")
        ]
        row += [f"{a['kl'][0]:.4f} +- {a['kl'][1]:.4f}", f"{a['step_seconds']:.1f}", f"{a['seconds'][0]:.0f}"]
        row.append(f"{a['sft_fraction']:.2f}" if "sft_fraction" in a else "")
        rows.append(row)
    lines.append(markdown_table(headers, rows))
    lines += [
        "",
        f"Test accuracies in % (final answer, the last box or else the last number, by the math verifier; "
        f"{split['test']} problems; pass@k from {settings['eval_samples']} samples "
        f"on the first {min(settings['pass_k_problems'], split['test'])} at temperature {settings['temperature']}); "
        "boxed: share of greedy test answers with a `\\boxed{}`. Retention: greedy accuracy on "
        f"{settings['retention_size']} one-digit sums asked plainly (last number written). KL to start: mean per-token "
        f"KL(policy || start) on the starting model's answers to {settings['general_prompts']} everyday prompts. "
        "s/step: median seconds per optimizer step; s/run: training and evaluation. SFT share: mean share of prompts "
        "HPTTrainer sent to the demonstration term.",
    ]
    tuning = settings.get("tuning_size", 0)
    if tuning:
        tuning_metrics = ["tuning_greedy", *(f"tuning_pass@{k}" for k in ks), "tuning_boxed"]
        rows = [
            [
                labels[method],
                *(f"{100 * agg[method][m][0]:.1f} +- {100 * agg[method][m][1]:.1f}" for m in tuning_metrics),
            ]
            for method in methods
        ]
        base_row = [
            "base model (before post-training)",
            *(f"{100 * base.get(m, math.nan):.1f}" for m in tuning_metrics),
        ]
        lines += [
            "",
            f"Tuning split ({tuning} problems, disjoint from train and test; pass@k from {settings['eval_samples']} "
            "samples on every problem), the split configurations are chosen on:",
            "",
            markdown_table(["method", "greedy", *(f"pass@{k}" for k in ks), "boxed"], [base_row, *rows]),
        ]
    metrics = real_model_metrics(settings)
    headers = ["greedy", *(f"pass@{k}" for k in ks), "boxed", "retention", "KL"]
    if tuning:
        headers += ["tuning greedy", *(f"tuning pass@{k}" for k in ks), "tuning boxed"]
    columns = [(h, m, _nats if m == "kl" else _points) for h, m in zip(headers, metrics)]
    lines += paired_tables(
        report.get("paired", {}),
        labels,
        "paired by seed, mean +- std over seeds (points; KL in nats)",
        columns,
        "ahead",
    )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# Any report
# ------------------------------------------------------------------------------------------------------------------


def benchmark_of(report: dict) -> str:
    """
    Which benchmark wrote `report`: its `"benchmark"` field, or for reports written before that field, the keys only
    that benchmark writes (`model_dir`: real_model; `targets`: speed; the warm start's aggregate: learning).
    """
    if "benchmark" in report:
        if report["benchmark"] not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {report['benchmark']!r}; expected one of {BENCHMARKS}")
        return report["benchmark"]
    if "model_dir" in report:
        return "real_model"
    if "targets" in report:
        return "speed"
    if "warm_start" in report.get("aggregate", {}):
        return "learning"
    raise ValueError(f"not a report of {', '.join(BENCHMARKS)} (keys: {sorted(report)})")


def render_markdown(report: dict) -> str:
    """The Markdown of a report of any of the benchmarks (see [`benchmark_of`])."""
    renderers = {"speed": render_speed, "learning": render_learning, "real_model": render_real_model}
    return renderers[benchmark_of(report)](report)


def plot(report: dict, path: str | os.PathLike) -> None:
    """Plots a report to `path` (an image file); only the learning benchmark has a plot."""
    benchmark = benchmark_of(report)
    if benchmark != "learning":
        raise ValueError(f"the {benchmark} benchmark has no plot")
    plot_learning(report, Path(path))


def render(report: dict, markdown: str | os.PathLike | None = None, plot_path: str | os.PathLike | None = None) -> str:
    """
    Renders a report, and writes its Markdown and plot where asked.

    Args:
        report (`dict`):
            A report as one of the benchmark scripts writes it.
        markdown (`str` or `os.PathLike`, *optional*):
            Where to write the Markdown (parent folders are created).
        plot_path (`str` or `os.PathLike`, *optional*):
            Where to write the plot (see [`plot`]).

    Returns:
        `str`: The Markdown.
    """
    text = render_markdown(report)
    if markdown is not None:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(text)
    if plot_path is not None:
        plot(report, plot_path)
    return text


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "json", type=Path, nargs="+", help="a report written by speed.py, learning.py or real_model.py"
    )
    parser.add_argument("--markdown", type=Path, help="write the Markdown here instead of printing it")
    parser.add_argument("--plot", type=Path, help="write the plot here (learning reports only)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="learning reports with a validation split: one table of every configuration's validation accuracy",
    )
    parser.add_argument(
        "--frontier",
        action="store_true",
        help="learning reports of one task with a validation split: every configuration's accuracy with and without "
        "a carry, and which configurations no other one beats on both",
    )
    parser.add_argument(
        "--tasks",
        action="store_true",
        help="learning reports of several tasks: one table of every method's held-out accuracy, and each report's "
        "hpt_custom minus its other methods, paired by seed",
    )
    args = parser.parse_args(argv)
    tables = {
        flag: function
        for flag, function in (
            ("--sweep", learning_sweep_table),
            ("--tasks", learning_tasks_tables),
            ("--frontier", learning_frontier_table),
        )
        if getattr(args, flag[2:])
    }
    if len(tables) > 1:
        parser.error(f"one of {', '.join(tables)}, not several")
    if tables:
        (table_of,) = tables.values()
        try:
            text = table_of([json.loads(path.read_text()) for path in args.json]) + "\n"
        except ValueError as error:
            parser.error(str(error))
        if args.markdown is not None:
            args.markdown.write_text(text)
        else:
            sys.stdout.write(text)
        return text
    if len(args.json) > 1:
        parser.error("one report at a time (several only with --sweep, --tasks or --frontier)")
    args.json = args.json[0]
    report = json.loads(args.json.read_text())
    try:
        benchmark = benchmark_of(report)
    except ValueError as error:
        parser.error(f"{args.json}: {error}")
    if args.plot is not None and benchmark != "learning":
        parser.error(f"--plot: the {benchmark} benchmark has no plot")
    text = render(report, markdown=args.markdown, plot_path=args.plot)
    if args.markdown is None:
        sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
