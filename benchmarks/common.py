"""Helpers shared by the benchmark scripts' measurements: environment, provenance, statistics and settings.

Only the standard library (and modules of the package that import nothing else) is imported at module level, so the
pure helpers (`summarize`, `share`, `settings_overrides`) are cheap to import and to test. `pass_at_k` is the
evaluation's (`trl_hpt.evaluation.pass_at_k`) and `generation_inputs` the testing module's (`trl_hpt.testing`).
Rendering (Markdown tables, plots) is `benchmarks/report.py`'s.
"""

from __future__ import annotations

import ast
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from trl_hpt.evaluation import pass_at_k
from trl_hpt.testing import generation_inputs


__all__ = [
    "cpu_generation",
    "cpu_model",
    "generation_inputs",
    "git_commit",
    "machine_info",
    "pass_at_k",
    "read_json",
    "read_report_argument",
    "settings_overrides",
    "setup_environment",
    "share",
    "summarize",
    "write_json",
]


REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def setup_environment(num_threads: int | None = None) -> None:
    """Offline, quiet, and a fixed number of intra-op threads, so that runs are comparable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_DISABLED", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    import torch

    torch.set_num_threads(num_threads or max(1, min(2, os.cpu_count() or 1)))
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "trl_hpt", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def git_commit() -> str:
    """Short hash of HEAD, with `+dirty` when the working tree has uncommitted changes (so numbers can be traced)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _first_cpu() -> dict[str, str]:
    """The fields of the first CPU in `/proc/cpuinfo` (Linux); empty where there is none."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(cpu: dict[str, str] | None = None) -> str:
    """The first CPU's model name (`cpu`: its `/proc/cpuinfo` fields, read here when not given)."""
    cpu = _first_cpu() if cpu is None else cpu
    return cpu.get("model name") or platform.processor() or platform.machine()


def cpu_generation(cpu: dict[str, str] | None = None) -> str | None:
    """`family F model M` of the first CPU (x86 Linux), or `None`: one model name can cover several generations."""
    cpu = _first_cpu() if cpu is None else cpu
    if "cpu family" not in cpu or "model" not in cpu:
        return None
    return f"family {cpu['cpu family']} model {cpu['model']}"


def machine_info(device: str = "cpu") -> dict:
    """Date, machine, library versions and commit: what a reader needs to compare two benchmark tables."""
    import torch
    import transformers
    import trl

    cpu = _first_cpu()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(cpu),
        # Two CPU generations under one model name round the same training differently (the toy warm start moves).
        "cpu_generation": cpu_generation(cpu),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "commit": git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ------------------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict:
    """Median, mean, sample std, min and max of a list of measurements."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "median": math.nan, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def share(values) -> float:
    """The mean of `values` (booleans count as 0 or 1), NaN when there are none: an accuracy over problems."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def write_json(path: str | os.PathLike, payload: dict, indent: int | None = 1) -> None:
    """Writes `payload` as JSON; `indent=None` writes it on one line (the learning results hold long histories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if indent is None else None
    path.write_text(json.dumps(payload, indent=indent, separators=separators) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file written by [`write_json`]."""
    return json.loads(Path(path).read_text())


def read_report_argument(item: str) -> tuple[dict, list[str] | None]:
    """A `--report` argument `JSON[:METHOD,...]`: the report, and the methods to take from it (`None`: all)."""
    path, _, wanted = item.partition(":")
    return read_json(path), wanted.split(",") if wanted else None


def settings_differences(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings two runs disagree on, but for the seed count and `ignore` (tuples and JSON lists compare equal)."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    keys = (set(a) | set(b)) - {"seeds", *ignore}
    return sorted(k for k in keys if a.get(k) != b.get(k))


def same_settings(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> bool:
    """Whether two runs' settings agree but for the seed count and `ignore`."""
    return not settings_differences(a, b, ignore)


def shared_training_values(output_dir: str, learning_rate: float, steps: int, seed: int, device: str = "cpu") -> dict:
    """
    The `TrainingArguments` every method of a learning comparison shares, TRL's SFTTrainer and GRPOTrainer included:
    AdamW at one constant learning rate, gradient clip 1.0, the same step budget, per-step logs, nothing saved.
    """
    return dict(
        output_dir=output_dir,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        activation_checkpointing=False,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=False,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def settings_overrides(settings, items: Sequence[str]) -> dict:
    """
    The `--set FIELD=VALUE` overrides of a settings dataclass, each value cast to the type of the field's default.

    Args:
        settings:
            The settings dataclass instance the overrides apply to.
        items (`Sequence[str]`):
            `FIELD=VALUE` strings. `none` (any case) sets `None`; a tuple field takes comma-separated values.

    Returns:
        `dict`: The overrides by field, for `dataclasses.replace(settings, **overrides)`.
    """
    overrides = {}
    for item in items:
        name, value = item.split("=", 1)
        # The class default, because an instance's value may be None (a step turned off) and say nothing of the type.
        default = getattr(type(settings), name, getattr(settings, name))
        if value.lower() == "none":
            overrides[name] = None
        elif isinstance(default, tuple):
            cast = type(default[0]) if default else str
            overrides[name] = tuple(cast(v) for v in value.split(","))
        else:
            overrides[name] = type(default if default is not None else 0.0)(value)
    return overrides


def custom_fields(items: Sequence[str]) -> dict:
    """`field=value` strings as HPTConfig fields (`hpt_custom`); a value that is not a Python literal stays a string."""
    fields = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"custom_fields entries are field=value, got {item!r}")
        try:
            fields[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[name] = value
    return fields
