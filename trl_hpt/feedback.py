"""Performance feedback: per-prompt accuracy and the mixing coefficients (alpha, beta) it selects."""

from __future__ import annotations

import math
from collections.abc import Callable

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


def prompt_accuracy(rewards: torch.Tensor, num_generations: int, success_threshold: float = 1.0) -> torch.Tensor:
    """
    `P_q`: the share of each group's scored rollouts whose verifier reward is at least `success_threshold`.

    An unscored rollout (NaN: the verifier returned `None`) counts as neither success nor failure, as `None` means
    "skip" to `GRPOTrainer`: it is left out of the share. A group with no scored rollout has `P = NaN` (unknown).
    `rewards` holds consecutive groups of `num_generations`.
    """
    grouped = rewards.float().view(-1, num_generations)
    scored = ~torch.isnan(grouped)
    correct = (torch.nan_to_num(grouped, nan=-math.inf) >= success_threshold) & scored
    return correct.sum(dim=1) / scored.sum(dim=1)  # 0 / 0 = NaN for a group nothing scored


def feedback_weights(
    strategy: str | FeedbackFn, accuracy: torch.Tensor, switch_gate: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The mixing coefficients `(alpha, beta)` of each prompt, the weights of its RL and SFT terms.

    Args:
        strategy: `"switch"` (`alpha = 1[P > gate]`, `beta = 1[P <= gate]`), `"soft"` (both 1), `"linear"`
            (`alpha = P`, `beta = 1 - P`), `"rl"` (`1, 0`), `"sft"` (`0, 1`), or a callable mapping one accuracy
            (a float) to `(alpha, beta)`.
        accuracy (`torch.Tensor` of shape `(num_prompts,)`): `P` per prompt; NaN where no rollout was scored.
        switch_gate (`float`): the gate of `"switch"`.

    A prompt of unknown accuracy is never sent to SFT by a strategy that reads `P` (`switch`, `linear`, a callable):
    it gets `(1, 0)`, which is what `GRPOTrainer` does with it (its unscored rollouts have advantage 0). The
    strategies that ignore `P` (`soft`, `rl`, `sft`) give it their constant weights.
    """
    unknown = torch.isnan(accuracy)
    if unknown.any() and (callable(strategy) or strategy in ("switch", "linear")):
        known = torch.where(unknown, torch.zeros_like(accuracy), accuracy)
        alpha, beta = feedback_weights(strategy, known, switch_gate)
        return torch.where(unknown, torch.ones_like(alpha), alpha), torch.where(unknown, torch.zeros_like(beta), beta)
    ones, zeros = torch.ones_like(accuracy), torch.zeros_like(accuracy)
    if callable(strategy):
        pairs = [strategy(float(p)) for p in accuracy.tolist()]
        for p, pair in zip(accuracy.tolist(), pairs):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise ValueError(f"feedback_fn({p}) must return a pair (alpha, beta), got {pair!r}.")
            if min(float(pair[0]), float(pair[1])) < 0 or not all(math.isfinite(float(x)) for x in pair):
                raise ValueError(f"feedback_fn({p}) returned {pair!r}; alpha and beta must be finite and >= 0.")
        alpha = torch.tensor([float(a) for a, _ in pairs], dtype=accuracy.dtype, device=accuracy.device)
        beta = torch.tensor([float(b) for _, b in pairs], dtype=accuracy.dtype, device=accuracy.device)
        return alpha.reshape(accuracy.shape), beta.reshape(accuracy.shape)
    if strategy == "switch":
        sft = accuracy <= switch_gate
        return (~sft).to(accuracy.dtype), sft.to(accuracy.dtype)
    if strategy == "soft":
        return ones, ones.clone()
    if strategy == "linear":
        return accuracy.clone(), 1 - accuracy
    if strategy == "rl":
        return ones, zeros
    if strategy == "sft":
        return zeros, ones
    raise ValueError(f"Unknown feedback strategy {strategy!r}; use switch, soft, linear, rl, sft or a callable.")
