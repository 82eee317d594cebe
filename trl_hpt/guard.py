"""
Two controls of how much HPT imitates, each a factor on the demonstration coefficient (on `A_hat` of the
demonstration rows only, in the estimator's terms).

The imitation guard: the demonstration coefficient scaled by whether imitation makes the policy forget its own
correct answers.

HPT's gate decides *where* to imitate (prompts no rollout solves) but not *how much*, and how much imitation helps
depends on the demonstrations: in the model's own style they teach what RL cannot find, in a foreign style they also
overwrite what the model already does right. The guard reads that harm directly. It keeps a replay of the policy's
own verifier-accepted rollouts (the first ones it produced), with the mean token log-probability each had when it
entered, and before every generation batch's update measures how far the current policy has moved on them since (the
*drift*, in nats per token). When the replay holds its ground (drift >= -tolerance) the demonstration coefficient
grows by `exp(rate)`, when the policy is losing it the coefficient shrinks by the same factor, within
`[min_scale, max_scale]` times `demonstration_loss_coef`.

The style gate: the demonstration coefficient scaled by how foreign the demonstrations' style is to the policy. On a
prompt the policy already solves it knows the answer, so when it finds the demonstration much less likely per token
than its own correct rollout, the difference is style (notation, phrasing, layout), not content, and imitating it
overwrites how the model writes answers it already gets right. The *gap* is the demonstration's mean token
log-probability minus the correct rollout's, averaged over the solved prompts of a generation batch and smoothed over
batches; the factor is `exp(min(gap, 0) / temperature)`.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


__all__ = [
    "ImitationGuard",
    "StyleGate",
    "completion_batch",
    "guard_state_path",
    "mean_token_logps",
    "next_scale",
    "replay_drift",
    "style_scale",
]


def next_scale(scale: float, drift: float, rate: float, min_scale: float, max_scale: float, tolerance: float) -> float:
    """
    The guard's multiplicative step: `scale * exp(rate)` when `drift >= -tolerance` (the replay kept), `scale *
    exp(-rate)` when it fell further, clipped to `[min_scale, max_scale]`; unchanged when nothing was measured
    (`drift` is NaN).
    """
    if math.isnan(drift):
        return scale
    step = rate if drift >= -tolerance else -rate
    return min(max(scale * math.exp(step), min_scale), max_scale)


def completion_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    `(input_ids, attention_mask, completion_mask)` of `(prompt_ids, completion_ids)` pairs, prompts left-padded and
    completions right-padded as `GRPOTrainer` lays out a batch.
    """
    prompt_len = max(len(p) for p, _ in pairs)
    completion_len = max(len(c) for _, c in pairs)
    ids, attention, completion_mask = [], [], []
    for prompt, completion in pairs:
        left, right = prompt_len - len(prompt), completion_len - len(completion)
        ids.append([pad_token_id] * left + list(prompt) + list(completion) + [pad_token_id] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        completion_mask.append([1] * len(completion) + [0] * right)
    return tuple(torch.tensor(rows, dtype=torch.long, device=device) for rows in (ids, attention, completion_mask))


def mean_token_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean log-probability over its completion tokens, as float32 on the CPU."""
    mask = completion_mask.to(per_token_logps.dtype)
    mean = (per_token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return mean.detach().float().cpu()


def replay_drift(mean_logps: torch.Tensor, baselines: torch.Tensor) -> tuple[float, int]:
    """
    `(sum of drifts, count)` over the replay entries that have a baseline (finite `baselines`): each entry's mean
    token log-probability now minus when it entered. Summed, not averaged, so that processes can add theirs up.
    """
    known = torch.isfinite(baselines)
    return float((mean_logps[known] - baselines[known]).sum()), int(known.sum())


class _JsonState:
    """Saving and restoring a `state_dict` as JSON, for checkpoints."""

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.state_dict(), f)

    def load(self, path: str | os.PathLike) -> bool:
        """Restores a saved state; `False` (and nothing changed) when `path` does not exist."""
        if not os.path.exists(path):
            return False
        with open(path) as f:
            self.load_state_dict(json.load(f))
        return True


@dataclass
class ImitationGuard(_JsonState):
    """
    One process's replay of correct rollouts and the scale of the demonstration coefficient (see the module
    docstring). The first `capacity` correct rollouts are kept.
    """

    capacity: int
    rate: float
    min_scale: float
    max_scale: float
    tolerance: float = 0.0
    scale: float = 1.0
    entries: deque = field(default_factory=deque)

    def add(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> bool:
        """
        A correct rollout enters the replay while it has room (the first `capacity` stay: the replay measures drift
        from what the policy could do early on, where forgetting shows); its baseline is its mean token
        log-probability at the next measurement. Returns whether it entered.
        """
        if not completion_ids or self.full:
            return False
        self.entries.append([list(prompt_ids), list(completion_ids), float("nan")])
        return True

    @property
    def full(self) -> bool:
        """Whether the replay holds `capacity` rollouts: later ones no longer enter."""
        return len(self.entries) >= self.capacity

    def inputs(self, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """[`completion_batch`] of the replay; `None` when the replay is empty."""
        if not self.entries:
            return None
        return completion_batch([(prompt, completion) for prompt, completion, _ in self.entries], pad_token_id, device)

    def measure(self, per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> tuple[float, int]:
        """
        Records the replay's mean token log-probabilities under the current policy: entries without a baseline take
        it as theirs; returns [`replay_drift`] over the others.
        """
        mean = mean_token_logps(per_token_logps, completion_mask)
        baselines = torch.tensor([entry[2] for entry in self.entries], dtype=torch.float32)
        drift = replay_drift(mean, baselines)
        for entry, value, had in zip(self.entries, mean.tolist(), torch.isfinite(baselines).tolist()):
            if not had:
                entry[2] = value
        return drift

    def update(self, drift_sum: float, count: int) -> float:
        """The next scale from the summed drift of `count` entries (over every process); returns it."""
        drift = drift_sum / count if count else float("nan")
        self.scale = next_scale(self.scale, drift, self.rate, self.min_scale, self.max_scale, self.tolerance)
        return self.scale

    def state_dict(self) -> dict:
        """The scale and the replay (prompts, completions, baselines), for a checkpoint."""
        return {"scale": self.scale, "entries": [list(entry) for entry in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        # A smaller imitation_guard_size on resume keeps the first rollouts, as filling the replay does.
        self.entries = deque([list(entry) for entry in state["entries"]][: self.capacity])


def style_scale(gap: float, temperature: float) -> float:
    """The style gate's factor, `exp(min(gap, 0) / temperature)`; `1` when nothing was measured (`gap` is NaN)."""
    return 1.0 if math.isnan(gap) else math.exp(min(gap, 0.0) / temperature)


@dataclass
class StyleGate(_JsonState):
    """
    The style gate's smoothed gap (see the module docstring): NaN until `min_prompts` solved prompts with a
    demonstration have been scored (their gaps pooled over as many generation batches as that takes), then their mean,
    then an exponential moving average with weight `momentum` on the past.
    """

    temperature: float
    momentum: float
    gap: float = float("nan")
    floor: float = 0.0
    start: float = 1.0
    min_prompts: int = 1
    # Gaps scored before the first measurement, waiting for `min_prompts` of them.
    pooled_sum: float = 0.0
    pooled_count: int = 0

    @property
    def measured(self) -> bool:
        """Whether the first measurement is taken (until then the factor is `start`)."""
        return not math.isnan(self.gap)

    @property
    def scale(self) -> float:
        """The factor on the demonstration coefficient (`start` until a gap is measured); `0` (closed) below `floor`."""
        scale = style_scale(self.gap, self.temperature) if self.measured else self.start
        return scale if scale >= self.floor else 0.0

    def update(self, gap_sum: float, count: int) -> float:
        """The next smoothed gap from the gaps of `count` solved prompts summed over every process; returns the scale."""
        if not count:
            return self.scale
        if not self.measured:
            # One solved prompt's gap is too noisy to decide a run on: pool until enough prompts have been scored.
            self.pooled_sum += gap_sum
            self.pooled_count += count
            if self.pooled_count >= self.min_prompts:
                self.gap = self.pooled_sum / self.pooled_count
                self.pooled_sum, self.pooled_count = 0.0, 0
        else:
            self.gap = self.momentum * self.gap + (1.0 - self.momentum) * gap_sum / count
        return self.scale

    def state_dict(self) -> dict:
        return {
            "gap": None if math.isnan(self.gap) else self.gap,
            "pooled_sum": self.pooled_sum,
            "pooled_count": self.pooled_count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.gap = float("nan") if state["gap"] is None else float(state["gap"])
        # Checkpoints written before pooling existed hold only the gap.
        self.pooled_sum = float(state.get("pooled_sum", 0.0))
        self.pooled_count = int(state.get("pooled_count", 0))


def guard_state_path(checkpoint: str | os.PathLike, process_index: int, name: str = "imitation_guard") -> str:
    """Where a checkpoint keeps one process's state of a control (`"imitation_guard"` or `"style_gate"`)."""
    return os.path.join(checkpoint, f"hpt_{name}-{process_index}.json")
