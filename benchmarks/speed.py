"""Speed and memory of `HPTTrainer` against TRL's `GRPOTrainer`, measured side by side in one process.

(a) **Step time and peak memory, `HPTTrainer(feedback="rl")` vs `GRPOTrainer`.** The same tiny model (reloaded from one
    state dict), data, seed and config, sampling on. Both trainers generate the same rollouts (the run is numerically
    GRPO's), so any difference is HPT's overhead: the gate, its metrics and the hybrid loss.
    *Time*: this machine's speed drifts over seconds, so whole runs timed one after the other differ by more than the
    overhead being measured. The two trainers therefore train in lockstep ([`lockstep_pair`]): one optimizer step
    each in turn, so that step k of HPT is compared with step k of GRPO a fraction of a second away. Per step we read
    the wall time and the thread CPU time between `on_step_begin` and `on_step_end` (the whole optimizer step:
    generation, scoring, loss, backward, optimizer) and TRL's own `step_time` metric (the time inside
    `training_step`: the same minus the optimizer step). On a CPU shared with other jobs, wall time measures the
    neighbours as much as the code; CPU time with one torch thread measures the work done, so it is the headline.
    *Components*: HPT's `_generate_and_score_completions` and `_compute_loss` + backward against GRPOTrainer's own
    methods on the same trainer and inputs, alternating call by call, with the host synchronisations each makes.
    *Peak memory on CPU*: torch's CPU allocator keeps no statistics and `tracemalloc` does not see tensors, so every
    memory repetition runs in a fresh subprocess (alternating G H H G ...) that reports its peak resident set size
    (`ru_maxrss`) and its RSS just before `train()`: the headline is the *training increment* (peak minus pre-train
    RSS), the part a trainer can change; the whole-process peak is shown too. On CUDA, `torch.cuda.max_memory_allocated`
    of separate runs, in process.

(b) **Loss-pass time when a fraction g of the groups goes to SFT.** A larger model, a fixed generation batch built by
    `HPTTrainer._generate_and_score_completions` with a reward that leaves exactly the chosen prompts unsolved (so the
    switch gate sends exactly those to SFT: their demonstration in the last slot with weight 1, the other G-1 rows
    weight 0), then `_compute_loss` + `backward()` of HPT against `GRPOTrainer._compute_loss` + `backward()` on the
    same model and batch (every row weight 1), alternating. HPT skips zero-weight rows, so the ideal ratio is
    `1 - g + g / G`.

Usage:

    python benchmarks/speed.py                       # full run: under 10 minutes on 2 shared CPU cores
    python benchmarks/speed.py --quick               # smoke test
    python benchmarks/speed.py --json out.json --markdown out.md
    python benchmarks/speed.py --device cuda         # on a GPU: CUDA timings and torch.cuda peak memory
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    generation_inputs,
    machine_info,
    setup_environment,
    summarize,
    write_json,
)
from benchmarks.report import machine_line, render  # noqa: E402


# The report stores these (`targets`), and its verdicts are rendered from there: a re-rendered report keeps the
# targets it was measured against.
TIME_TARGET = 1.03
MEMORY_TARGET = 1.05
LOSS_PASS_TOLERANCE = 0.15
SFT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class SpeedSettings:
    """Sizes of the two measurements; `quick()` shrinks them for a smoke test."""

    # (a) step time
    step_hidden: int = 128
    step_layers: int = 2
    step_prompts: int = 8
    step_completion: int = 16
    steps: int = 12
    repetitions: int = 8
    memory_repetitions: int = 3
    component_repetitions: int = 40
    # (b) loss pass
    loss_hidden: int = 256
    loss_layers: int = 4
    loss_prompts: int = 8
    loss_completion: int = 32
    loss_repetitions: int = 11
    num_generations: int = 8

    @classmethod
    def quick(cls) -> SpeedSettings:
        return cls(
            step_hidden=32,
            step_prompts=2,
            step_completion=4,
            steps=3,
            repetitions=1,
            memory_repetitions=1,
            component_repetitions=2,
            loss_hidden=32,
            loss_layers=2,
            loss_prompts=4,
            loss_completion=8,
            loss_repetitions=1,
            num_generations=4,
        )


# ------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------------------------


def digit_share_reward(completions, **kwargs) -> list[float]:
    """A dense reward (share of digits in the completion): advantages are rarely all zero, so every step trains."""
    return [sum(ch.isdigit() for ch in str(c)) / max(len(str(c)), 1) for c in completions]


def step_dataset():
    from datasets import Dataset

    from trl_hpt.testing import addition_rows

    rows = addition_rows([(a, b) for a in range(10, 40) for b in range(10)])
    return Dataset.from_list([{"prompt": r["prompt"], "solution": r["solution"]} for r in rows])


def quiet_values(output_dir: str, device: str) -> dict:
    """The settings of every trainer here: nothing saved or tracked, no progress bar, seed 0, float32 on `device`."""
    return dict(
        output_dir=output_dir,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )


def step_config(kind: str, settings: SpeedSettings, output_dir: str, device: str):
    """The one config both trainers get; `HPTConfig(feedback="rl")` differs from it by the HPT fields only."""
    from trl import GRPOConfig

    from trl_hpt import HPTConfig

    values = dict(
        quiet_values(output_dir, device),
        per_device_train_batch_size=settings.step_prompts * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.step_completion,
        max_steps=settings.steps,
        learning_rate=1e-4,
        temperature=1.0,
        logging_steps=1,
        dataloader_num_workers=0,
    )
    return GRPOConfig(**values) if kind == "grpo" else HPTConfig(feedback="rl", **values)


def build_step_trainer(kind: str, model, tokenizer, settings: SpeedSettings, output_dir: str, device: str, callbacks):
    from trl import GRPOTrainer

    from trl_hpt import HPTTrainer

    cls = GRPOTrainer if kind == "grpo" else HPTTrainer
    return cls(
        model=model,
        reward_funcs=digit_share_reward,
        args=step_config(kind, settings, output_dir, device),
        train_dataset=step_dataset(),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class StepTimer:
    """Trainer callback: wall and process CPU time of every optimizer step."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                _sync(timer.device)
                timer._start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                _sync(timer.device)
                timer.wall.append(time.perf_counter() - timer._start[0])
                timer.cpu.append(time.process_time() - timer._start[1])

        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.callback = _Callback()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------------------
# (a) Step time and memory
# ------------------------------------------------------------------------------------------------------------------


def one_step_run(kind, base_state, tokenizer, settings, device, output_dir):
    """Trains one fresh trainer; returns per-step times (first step dropped) and what it generated."""
    from trl_hpt.testing import build_tiny_model

    model = build_tiny_model(tokenizer, settings.step_hidden, settings.step_layers)
    model.load_state_dict(base_state)
    timer = StepTimer(device)
    trainer = build_step_trainer(kind, model, tokenizer, settings, output_dir, device, [timer.callback])
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak_cuda = None
    if device.startswith("cuda"):
        import torch

        peak_cuda = torch.cuda.max_memory_allocated() / 2**20
    logs = [h for h in trainer.state.log_history if "step_time" in h]
    rows = settings.step_prompts * settings.num_generations
    result = {
        "kind": kind,
        "wall": timer.wall[1:],
        "cpu": timer.cpu[1:],
        "trl_step_time": [h["step_time"] for h in logs][1:],
        # Identical rollouts in both trainers show that they did the same work.
        "completion_tokens": round(sum(h["completions/mean_length"] * rows for h in logs)),
        "final_loss": logs[-1]["loss"] if logs else None,
        "peak_cuda_mib": peak_cuda,
    }
    del trainer, model
    gc.collect()
    return result


def memory_worker(kind: str, settings: SpeedSettings) -> dict:
    """Body of a memory subprocess: one run, then its peak RSS and its RSS just before training."""
    from trl_hpt.testing import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer(chat_template=False)
    model = build_tiny_model(tokenizer, settings.step_hidden, settings.step_layers, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_step_trainer(kind, model, tokenizer, settings, tmp, "cpu", [])
        gc.collect()
        before = _rss_mib()
        peak_before = _peak_rss_mib()
        trainer.train()
        peak = _peak_rss_mib()
    return {"kind": kind, "rss_before_train_mib": before, "peak_rss_mib": peak, "peak_before_train_mib": peak_before}


def measure_memory_cpu(settings: SpeedSettings, threads: int, quick: bool) -> list[dict]:
    results = []
    for rep in range(settings.memory_repetitions):
        for kind in ("grpo", "hpt") if rep % 2 == 0 else ("hpt", "grpo"):
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-worker",
                kind,
                "--threads",
                str(threads),
            ]
            if quick:
                command.append("--quick")
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise RuntimeError(f"memory worker {kind} failed:\n{completed.stderr[-4000:]}")
            line = [x for x in completed.stdout.splitlines() if x.startswith("MEMORY ")][-1]
            result = json.loads(line[len("MEMORY ") :])
            result["repetition"] = rep
            results.append(result)
            print(
                f"[speed] memory rep {rep} {kind}: peak RSS {result['peak_rss_mib']:.0f} MiB, "
                f"training increment {result['peak_rss_mib'] - result['rss_before_train_mib']:.1f} MiB",
                flush=True,
            )
    return results


def _rng_state(device: str):
    import random

    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if device.startswith("cuda") else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def _set_rng_state(state, device: str) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def lockstep_pair(base_state, tokenizer, settings: SpeedSettings, device: str, output_dir: str, first: str) -> dict:
    """
    Trains a GRPOTrainer and an HPTTrainer *step by step in turn*: each runs `trainer.train()` in its own thread, and a
    callback hands the turn to the other trainer at the end of every optimizer step, so step k of one runs right
    after step k of the other (only one thread ever runs). Each trainer keeps its own random state across the
    hand-overs, so both generate exactly what they would alone. On a machine whose speed drifts over seconds, this
    pairs every step with a step of the other trainer a fraction of a second away.
    """
    import threading

    from transformers import TrainerCallback

    from trl_hpt.testing import build_tiny_model

    kinds = ("grpo", "hpt")
    other = {"grpo": "hpt", "hpt": "grpo"}
    condition = threading.Condition()
    turn = {"kind": first, "done": set()}
    rng, errors = {}, []
    times = {k: {"wall": [], "cpu": []} for k in kinds}

    def wait_turn(kind):
        with condition:
            condition.wait_for(lambda: turn["kind"] == kind or other[kind] in turn["done"])

    def pass_turn(kind, finished=False):
        with condition:
            if finished:
                turn["done"].add(kind)
            turn["kind"] = other[kind]
            condition.notify_all()

    class HandOver(TrainerCallback):
        def __init__(self, kind):
            self.kind = kind

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.start = (time.perf_counter(), time.thread_time())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            times[self.kind]["wall"].append(time.perf_counter() - self.start[0])
            # With one torch thread the step's compute runs on this thread: its CPU time is the step's work.
            times[self.kind]["cpu"].append(time.thread_time() - self.start[1])
            rng[self.kind] = _rng_state(device)
            pass_turn(self.kind)
            wait_turn(self.kind)
            _set_rng_state(rng[self.kind], device)

    trainers = {}
    for kind in kinds:
        model = build_tiny_model(tokenizer, settings.step_hidden, settings.step_layers)
        model.load_state_dict(base_state)
        trainers[kind] = build_step_trainer(kind, model, tokenizer, settings, output_dir, device, [HandOver(kind)])
        # The state GRPOTrainer seeds at construction: what train() would start from in a process of its own.
        rng[kind] = _rng_state(device)

    def worker(kind):
        try:
            wait_turn(kind)
            _set_rng_state(rng[kind], device)
            trainers[kind].train()
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
        finally:
            pass_turn(kind, finished=True)

    threads = [threading.Thread(target=worker, args=(kind,), name=f"speed-{kind}") for kind in kinds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    rows = settings.step_prompts * settings.num_generations
    result = {}
    for kind in kinds:
        logs = [h for h in trainers[kind].state.log_history if "step_time" in h]
        result[kind] = {
            "wall": times[kind]["wall"][1:],
            "cpu": times[kind]["cpu"][1:],
            "trl_step_time": [h["step_time"] for h in logs][1:],
            # Identical rollouts in both trainers show that they did the same work.
            "completion_tokens": round(sum(h["completions/mean_length"] * rows for h in logs)),
            "final_loss": logs[-1]["loss"] if logs else None,
        }
    trainers.clear()
    gc.collect()
    return result


def measure_step_time(settings: SpeedSettings, device: str) -> dict:
    from trl_hpt.testing import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer(chat_template=False)
    base = build_tiny_model(tokenizer, settings.step_hidden, settings.step_layers, seed=0)
    base_state = copy.deepcopy(base.state_dict())
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        # Repetition 0 is the warm-up (allocator, kernels, lazy imports); which trainer leads alternates.
        for rep in range(settings.repetitions + 1):
            pair = lockstep_pair(base_state, tokenizer, settings, device, tmp, "grpo" if rep % 2 == 0 else "hpt")
            if rep == 0:
                continue
            pairs.append(pair)
            ratios = [h / g for h, g in zip(pair["hpt"]["cpu"], pair["grpo"]["cpu"])]
            print(
                f"[speed] step rep {rep}: median step cpu GRPO {statistics.median(pair['grpo']['cpu']):.3f}s, "
                f"HPT {statistics.median(pair['hpt']['cpu']):.3f}s, median per-step ratio {statistics.median(ratios):.3f}",
                flush=True,
            )
        cuda_runs = {"grpo": [], "hpt": []}
        if device.startswith("cuda"):
            # Peak memory needs one trainer alive at a time: separate runs, alternating.
            for rep in range(2):
                for kind in ("grpo", "hpt") if rep % 2 == 0 else ("hpt", "grpo"):
                    cuda_runs[kind].append(one_step_run(kind, base_state, tokenizer, settings, device, tmp))

    summary = {}
    for key in ("cpu", "wall", "trl_step_time"):
        # Per repetition: the median over steps of HPT step k / GRPO step k; then median and range over repetitions.
        ratios = [statistics.median([h / g for h, g in zip(p["hpt"][key], p["grpo"][key])]) for p in pairs]
        summary[key] = {
            "grpo": summarize([statistics.median(p["grpo"][key]) for p in pairs]),
            "hpt": summarize([statistics.median(p["hpt"][key]) for p in pairs]),
            "ratio": summarize(ratios),
            "all_step_ratios": summarize([h / g for p in pairs for h, g in zip(p["hpt"][key], p["grpo"][key])]),
        }
    same_work = all(p["grpo"]["completion_tokens"] == p["hpt"]["completion_tokens"] for p in pairs)
    same_loss = all(
        abs(p["grpo"]["final_loss"] - p["hpt"]["final_loss"]) <= 1e-5 + 1e-3 * abs(p["grpo"]["final_loss"])
        for p in pairs
    )
    if device.startswith("cuda"):
        peaks = {k: [r["peak_cuda_mib"] for r in cuda_runs[k]] for k in cuda_runs}
        summary["cuda_peak_mib"] = {
            "grpo": summarize(peaks["grpo"]),
            "hpt": summarize(peaks["hpt"]),
            "ratio": summarize([h / g for h, g in zip(peaks["hpt"], peaks["grpo"])]),
        }
    summary["same_rollouts"] = same_work
    summary["same_final_loss"] = same_loss
    summary["pairs"] = pairs
    return summary


class HostSyncCounter:
    """
    Counts tensor-to-Python conversions (`item`, `bool`, `float`, `int`, `tolist`): each one is a device
    synchronisation on a GPU, so the count predicts GPU stalls that CPU timings cannot show.
    """

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __init__(self):
        self.count = 0

    def __enter__(self):
        import torch

        self._originals = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def __exit__(self, *exc):
        import torch

        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


def measure_components(settings: SpeedSettings, device: str) -> dict:
    """
    Where HPT's per-step overhead is, with less noise than whole steps: the generation-and-scoring call and the
    loss + backward of one micro-batch, HPT's override against GRPOTrainer's method on the same trainer, model and
    inputs (feedback="rl"), alternating; plus the host synchronisations each makes.
    """
    import torch
    from trl import GRPOTrainer

    from trl_hpt.testing import build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer(chat_template=False)
    model = build_tiny_model(tokenizer, settings.step_hidden, settings.step_layers, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_step_trainer("hpt", model, tokenizer, settings, tmp, device, [])
    inputs = generation_inputs(trainer, settings.step_prompts, settings.num_generations)

    def generate_hpt():
        return trainer._generate_and_score_completions([dict(x) for x in inputs])

    def generate_grpo():
        # The training rows are GRPOTrainer's own (HPTTrainer adds no columns).
        return GRPOTrainer._generate_and_score_completions(trainer, [dict(x) for x in inputs])

    torch.manual_seed(0)
    batch = generate_hpt()

    def loss_hpt():
        trainer.model.zero_grad(set_to_none=True)
        trainer._compute_loss(trainer.model, dict(batch)).backward()

    def loss_grpo():
        trainer.model.zero_grad(set_to_none=True)
        GRPOTrainer._compute_loss(trainer, trainer.model, dict(batch)).backward()

    def timed(fn):
        torch.manual_seed(0)  # the same rollouts every call
        _sync(device)
        start = time.process_time() if device == "cpu" else time.perf_counter()
        fn()
        _sync(device)
        return (time.process_time() if device == "cpu" else time.perf_counter()) - start

    out = {}
    for name, hpt_fn, grpo_fn in (
        ("generate_and_score", generate_hpt, generate_grpo),
        ("loss_backward", loss_hpt, loss_grpo),
    ):
        timed(hpt_fn), timed(grpo_fn)  # warm-up
        times = {"hpt": [], "grpo": []}
        for rep in range(settings.component_repetitions):
            for kind in ("hpt", "grpo") if rep % 2 == 0 else ("grpo", "hpt"):
                times[kind].append(timed(hpt_fn if kind == "hpt" else grpo_fn))
        syncs = {}
        for kind, fn in (("hpt", hpt_fn), ("grpo", grpo_fn)):
            with HostSyncCounter() as counter:
                fn()
            syncs[kind] = counter.count
        hpt_median, grpo_median = statistics.median(times["hpt"]), statistics.median(times["grpo"])
        out[name] = {
            "hpt": summarize(times["hpt"]),
            "grpo": summarize(times["grpo"]),
            "difference_ms": 1000 * (hpt_median - grpo_median),
            "host_syncs": syncs,
        }
        print(
            f"[speed] component {name}: HPT {1000 * hpt_median:.1f} ms, GRPO {1000 * grpo_median:.1f} ms, "
            f"host syncs {syncs['hpt']} vs {syncs['grpo']}",
            flush=True,
        )
    return out


def summarize_memory(results: list[dict]) -> dict:
    by_kind = {"grpo": [], "hpt": []}
    for r in results:
        by_kind[r["kind"]].append(r)
    out = {}
    for name, value in (
        ("peak_rss_mib", lambda r: r["peak_rss_mib"]),
        ("train_increment_mib", lambda r: r["peak_rss_mib"] - r["rss_before_train_mib"]),
    ):
        grpo_values = [value(r) for r in by_kind["grpo"]]
        hpt_values = [value(r) for r in by_kind["hpt"]]
        out[name] = {
            "grpo": summarize(grpo_values),
            "hpt": summarize(hpt_values),
            "ratio": summarize([h / g for h, g in zip(hpt_values, grpo_values)]),
        }
    out["runs"] = results
    return out


# ------------------------------------------------------------------------------------------------------------------
# (b) Loss pass with a fraction g of the groups sent to SFT
# ------------------------------------------------------------------------------------------------------------------


def measure_loss_pass(settings: SpeedSettings, device: str) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from trl_hpt import HPTConfig, HPTTrainer
    from trl_hpt.batch import hpt_rows
    from trl_hpt.testing import build_char_tokenizer, build_tiny_model

    G, P, C = settings.num_generations, settings.loss_prompts, settings.loss_completion
    tokenizer = build_char_tokenizer(chat_template=False)
    model = build_tiny_model(tokenizer, settings.loss_hidden, settings.loss_layers, seed=0)
    prompts = [f"{10 + i}+{i}=" for i in range(P)]
    # Demonstrations as long as a full rollout (C - 1 characters and EOS), so a demonstration row costs what a
    # rollout row costs and the ideal ratio only counts rows.
    rows = [{"prompt": p, "completion": str(10 + 2 * i).ljust(C - 1, "0")} for i, p in enumerate(prompts)]
    unsolved: set[str] = set()

    def reward(prompts, completions, **kwargs):
        return [0.0 if p in unsolved else 1.0 for p in prompts]

    with tempfile.TemporaryDirectory() as tmp:
        args = HPTConfig(
            **quiet_values(tmp, device),
            feedback="switch",
            switch_gate=0.0,
            per_device_train_batch_size=P * G,
            num_generations=G,
            max_completion_length=C,
            max_steps=1,
        )
        trainer = HPTTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    inputs = generation_inputs(trainer, P, G)

    def batch_for(g: float) -> dict:
        unsolved.clear()
        unsolved.update(prompts[: round(g * P)])
        # Same seed for every g: the same rollouts, so batches differ only by the demonstrations swapped in.
        torch.manual_seed(0)
        return trainer._generate_and_score_completions([dict(x) for x in inputs])

    def hpt_loss(model, batch):
        return trainer._compute_loss(model, batch)

    def grpo_loss(model, batch):
        # GRPOTrainer's own loss on the same trainer state: every row through the model with weight 1.
        return GRPOTrainer._compute_loss(trainer, model, batch)

    def timed(loss_fn, batch) -> tuple[float, float]:
        trainer.model.zero_grad(set_to_none=True)
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        loss = loss_fn(trainer.model, dict(batch))
        loss.backward()
        _sync(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    results = []
    for g in SFT_FRACTIONS:
        batch = batch_for(g)
        rows = hpt_rows(batch)
        sent = int(rows.demonstration.sum())
        kept_rows = int((rows.weights > 0).sum())
        timed(hpt_loss, batch), timed(grpo_loss, batch)  # warm-up
        times = {"hpt": [], "grpo": []}
        for rep in range(settings.loss_repetitions):
            order = (
                (("hpt", hpt_loss), ("grpo", grpo_loss)) if rep % 2 == 0 else (("grpo", grpo_loss), ("hpt", hpt_loss))
            )
            for name, fn in order:
                times[name].append(timed(fn, batch))
        ideal = 1 - g + g / G
        entry = {
            "g": g,
            "groups_sent_to_sft": sent,
            "rows_through_model_hpt": kept_rows,
            "rows_through_model_grpo": P * G,
            "ideal_ratio": ideal,
        }
        for index, clock in enumerate(("wall", "cpu")):
            hpt_values = [t[index] for t in times["hpt"]]
            grpo_values = [t[index] for t in times["grpo"]]
            ratios = [h / r for h, r in zip(hpt_values, grpo_values)]
            ratio = statistics.median(hpt_values) / statistics.median(grpo_values)
            entry[clock] = {
                "hpt": summarize(hpt_values),
                "grpo": summarize(grpo_values),
                "pair_ratio": summarize(ratios),
                "ratio_of_medians": ratio,
                "deviation_from_ideal": ratio / ideal - 1,
            }
        results.append(entry)
        print(
            f"[speed] loss pass g={g:.2f}: {sent}/{P} groups to SFT, {kept_rows}/{P * G} rows through the model; "
            f"cpu HPT/GRPO {entry['cpu']['ratio_of_medians']:.3f} (ideal {ideal:.3f}), "
            f"wall {entry['wall']['ratio_of_medians']:.3f}",
            flush=True,
        )
    return {"results": results}


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition: a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU); 1 is least noisy")
    parser.add_argument("--json", help="write the full results (every repetition) to this JSON file")
    parser.add_argument("--markdown", help="write the Markdown tables to this file")
    parser.add_argument("--skip", choices=["step", "components", "memory", "loss"], action="append", default=[])
    parser.add_argument("--memory-worker", choices=["grpo", "hpt"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    setup_environment(args.threads)
    settings = SpeedSettings.quick() if args.quick else SpeedSettings()
    if args.memory_worker:
        print("MEMORY " + json.dumps(memory_worker(args.memory_worker, settings)), flush=True)
        return None
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda was given but torch.cuda.is_available() is False")

    start = time.time()
    report = {
        "benchmark": "speed",
        "machine": machine_info(args.device),
        "settings": asdict(settings),
        "quick": args.quick,
    }
    report["load_average_start"] = os.getloadavg()
    report["targets"] = {"time_ratio": TIME_TARGET, "memory_ratio": MEMORY_TARGET, "loss_pass": LOSS_PASS_TOLERANCE}
    print(f"[speed] {machine_line(report['machine'])}", flush=True)
    sections = {}
    if "step" not in args.skip:
        section = time.time()
        report["step_time"] = measure_step_time(settings, args.device)
        sections["step_time"] = time.time() - section
    if "components" not in args.skip:
        section = time.time()
        report["components"] = measure_components(settings, args.device)
        sections["components"] = time.time() - section
    if "memory" not in args.skip and not args.device.startswith("cuda"):
        section = time.time()
        report["memory"] = summarize_memory(measure_memory_cpu(settings, args.threads, args.quick))
        sections["memory"] = time.time() - section
    if "loss" not in args.skip:
        section = time.time()
        report["loss_pass"] = measure_loss_pass(settings, args.device)
        sections["loss_pass"] = time.time() - section
    report["section_seconds"] = sections
    report["seconds"] = time.time() - start
    report["load_average_end"] = os.getloadavg()
    if args.json:
        write_json(args.json, report)
    print(render(report, markdown=args.markdown))
    print(
        f"[speed] done in {report['seconds']:.0f}s ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in sections.items())
        + f"; load average {os.getloadavg()[0]:.1f})"
    )
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
