"""Performance feedback: per-prompt accuracy and the mixing coefficients (alpha, beta) it selects."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch


FeedbackFn = Callable[[float], tuple[float, float]]


def verifier_rewards(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, verifier_reward_index: int | None = None
) -> torch.Tensor:
    """
    The reward that decides correctness, one per rollout.

    `verifier_reward_index=None` takes the weighted total, as `GRPOTrainer` sums it (NaN only when every reward
    function returned `None` for the rollout); an index takes that reward function's output alone (NaN when it
    returned `None`).
    """
    if verifier_reward_index is not None:
        if verifier_reward_index >= rewards_per_func.size(1):
            raise ValueError(
                f"verifier_reward_index={verifier_reward_index} but only {rewards_per_func.size(1)} reward "
                "functions were given."
            )
        return rewards_per_func[:, verifier_reward_index]
    total = (rewards_per_func * reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def correct_rollouts(rewards: torch.Tensor, success_threshold: float = 1.0) -> torch.Tensor:
    """Whether each verifier reward counts as correct (`>= success_threshold`); an unscored one (NaN) never does."""
    return rewards >= success_threshold  # NaN compares false


def prompt_accuracy(rewards: torch.Tensor, num_generations: int, success_threshold: float = 1.0) -> torch.Tensor:
    """
    `P_q`: the share of each group's scored rollouts whose verifier reward is at least `success_threshold`.

    An unscored rollout (NaN: the verifier returned `None`) counts as neither success nor failure, as `None` means
    "skip" to `GRPOTrainer`: it is left out of the share. A group with no scored rollout has `P = NaN` (unknown).
    `rewards` holds consecutive groups of `num_generations`.
    """
    grouped = rewards.float().view(-1, num_generations)
    scored = ~torch.isnan(grouped)
    correct = correct_rollouts(grouped, success_threshold)
    return correct.sum(dim=1) / scored.sum(dim=1)  # 0 / 0 = NaN for a group nothing scored


class Strategy(NamedTuple):
    """A built-in feedback strategy: `weights(P, switch_gate) -> (alpha, beta)`, and whether it reads `P`."""

    weights: Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    reads_accuracy: bool
    description: str


def _switch(p, gate):
    sft = p <= gate
    return (~sft).to(p.dtype), sft.to(p.dtype)


# HPTConfig.feedback's choices are this registry's keys.
STRATEGIES: dict[str, Strategy] = {
    "switch": Strategy(_switch, True, "alpha = 1[P > gate], beta = 1[P <= gate] (the paper's HPT)"),
    "soft": Strategy(lambda p, g: (torch.ones_like(p), torch.ones_like(p)), False, "alpha = beta = 1 (LUFFY/SRFT)"),
    "linear": Strategy(lambda p, g: (p.clone(), 1 - p), True, "alpha = P, beta = 1 - P"),
    "rl": Strategy(lambda p, g: (torch.ones_like(p), torch.zeros_like(p)), False, "alpha = 1, beta = 0 (GRPO)"),
    "sft": Strategy(lambda p, g: (torch.zeros_like(p), torch.ones_like(p)), False, "alpha = 0, beta = 1 (SFT)"),
}


def _callable_weights(fn: FeedbackFn, accuracy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [fn(float(p)) for p in accuracy.tolist()]
    for p, pair in zip(accuracy.tolist(), pairs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"feedback_fn({p}) must return a pair (alpha, beta), got {pair!r}.")
        if min(float(pair[0]), float(pair[1])) < 0 or not all(math.isfinite(float(x)) for x in pair):
            raise ValueError(f"feedback_fn({p}) returned {pair!r}; alpha and beta must be finite and >= 0.")
    alpha = torch.tensor([float(a) for a, _ in pairs], dtype=accuracy.dtype, device=accuracy.device)
    beta = torch.tensor([float(b) for _, b in pairs], dtype=accuracy.dtype, device=accuracy.device)
    return alpha.reshape(accuracy.shape), beta.reshape(accuracy.shape)


def feedback_weights(
    strategy: str | FeedbackFn, accuracy: torch.Tensor, switch_gate: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The mixing coefficients `(alpha, beta)` of each prompt, the weights of its RL and SFT terms.

    Args:
        strategy: a name in [`STRATEGIES`] (`"switch"`, `"soft"`, `"linear"`, `"rl"`, `"sft"`) or a callable mapping
            one accuracy (a float) to `(alpha, beta)`.
        accuracy (`torch.Tensor` of shape `(num_prompts,)`): `P` per prompt; NaN where no rollout was scored.
        switch_gate (`float`): the gate of `"switch"`.

    A prompt of unknown accuracy is never sent to SFT by a strategy that reads `P` (`switch`, `linear`, a callable):
    it gets `(1, 0)`, which is what `GRPOTrainer` does with it (its unscored rollouts have advantage 0). The
    strategies that ignore `P` (`soft`, `rl`, `sft`) give it their constant weights.
    """
    if callable(strategy):
        weights, reads_accuracy = (lambda p, g: _callable_weights(strategy, p)), True
    elif strategy in STRATEGIES:
        weights, reads_accuracy = STRATEGIES[strategy].weights, STRATEGIES[strategy].reads_accuracy
    else:
        raise ValueError(f"Unknown feedback strategy {strategy!r}; use one of {list(STRATEGIES)} or a callable.")
    unknown = torch.isnan(accuracy)
    if not (reads_accuracy and bool(unknown.any())):
        return weights(accuracy, switch_gate)
    alpha, beta = weights(torch.where(unknown, torch.zeros_like(accuracy), accuracy), switch_gate)
    return torch.where(unknown, torch.ones_like(alpha), alpha), torch.where(unknown, torch.zeros_like(beta), beta)


class GateDecision(NamedTuple):
    """What the gate decided for each prompt of a generation batch (all processes)."""

    alpha: torch.Tensor  # RL weight of the prompt's rollouts
    beta: torch.Tensor  # SFT weight of its demonstration
    placed: torch.Tensor  # bool: its demonstration takes the group's last slot


def decide_gate(
    strategy: str | FeedbackFn, accuracy: torch.Tensor, has_demonstration: torch.Tensor, switch_gate: float = 0.0
) -> GateDecision:
    """
    The feedback weights of each prompt, where a prompt without a (usable) demonstration can only be learnt by RL.

    Args:
        strategy: as in [`feedback_weights`].
        accuracy (`torch.Tensor` of shape `(num_prompts,)`): `P`, NaN when unknown.
        has_demonstration (`torch.Tensor` of shape `(num_prompts,)`, bool): whether the prompt has a demonstration.
        switch_gate (`float`): the gate of `"switch"`.
    """
    alpha, beta = feedback_weights(strategy, accuracy, switch_gate)
    alpha = torch.where(has_demonstration, alpha, torch.ones_like(alpha))
    beta = torch.where(has_demonstration, beta, torch.zeros_like(beta))
    return GateDecision(alpha, beta, beta > 0)


def gate_metrics(
    accuracy: torch.Tensor,
    decision: GateDecision,
    has_demonstration: torch.Tensor,
    truncated: torch.Tensor,
    solved: torch.Tensor,
    row_weights: torch.Tensor,
) -> dict[str, float]:
    """
    The `hpt/` metrics of one generation batch's gate, per prompt of the whole batch (`row_weights`: every row's
    weight, so that `hpt/skipped_rows` is the share the loss pass does not run).
    """
    placed = decision.placed
    return {
        "hpt/solved_fraction": solved.float().mean().item(),
        "hpt/sft_fraction": placed.float().mean().item(),
        "hpt/rl_fraction": (decision.alpha > 0).float().mean().item(),
        "hpt/no_demo_fraction": (~has_demonstration).float().mean().item(),
        "hpt/unscored_fraction": torch.isnan(accuracy).float().mean().item(),
        "hpt/demo_truncated_fraction": (truncated & placed).float().sum().item() / max(int(placed.sum()), 1),
        "hpt/skipped_rows": (row_weights == 0).float().mean().item(),
        "hpt/num_prompts": float(accuracy.numel()),
    }


def gate_records(step: int, prompt_index: list[int], accuracy: torch.Tensor, decision: GateDecision) -> list[dict]:
    """One record per prompt (`step`, `prompt_index`, `accuracy`, `alpha`, `beta`, `sft`), as reports read them."""
    records = zip(
        prompt_index, accuracy.tolist(), decision.alpha.tolist(), decision.beta.tolist(), decision.placed.tolist()
    )
    return [
        # NaN (no rollout scored) is written as null
        {"step": step, "prompt_index": i, "accuracy": None if p != p else p, "alpha": a, "beta": b, "sft": bool(sft)}
        for i, p, a, b, sft in records
    ]


def solved_rollouts(
    verifier: torch.Tensor, accuracy: torch.Tensor, placed: torch.Tensor, success_threshold: float = 1.0
) -> torch.Tensor:
    """
    Over every row: the correct rollouts of solved prompts (`P = 1`; an unknown `P` is not solved), which
    `HPTConfig.solved_advantage` rewards. A row that holds a demonstration (`placed`) never counts.
    """
    solved = (accuracy == 1).repeat_interleave(verifier.numel() // accuracy.numel())
    return solved & correct_rollouts(verifier, success_threshold) & ~placed
