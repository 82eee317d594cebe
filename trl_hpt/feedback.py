"""Performance feedback: per-prompt accuracy and the mixing coefficients (alpha, beta) it selects (DESIGN 2.2)."""

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
    `P_q`: the share of each group's rollouts whose verifier reward is at least `success_threshold`.

    Unscored rollouts (NaN) count as incorrect. `rewards` holds consecutive groups of `num_generations`.
    """
    correct = torch.nan_to_num(rewards.float(), nan=-math.inf) >= success_threshold
    return correct.view(-1, num_generations).float().mean(dim=1)


def feedback_weights(
    strategy: str | FeedbackFn, accuracy: torch.Tensor, switch_gate: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The mixing coefficients `(alpha, beta)` of each prompt, the weights of its RL and SFT terms.

    Args:
        strategy: `"switch"` (`alpha = 1[P > gate]`, `beta = 1[P <= gate]`), `"soft"` (both 1), `"linear"`
            (`alpha = P`, `beta = 1 - P`), `"rl"` (`1, 0`), `"sft"` (`0, 1`), or a callable mapping one accuracy
            (a float) to `(alpha, beta)`.
        accuracy (`torch.Tensor` of shape `(num_prompts,)`): `P` per prompt.
        switch_gate (`float`): the gate of `"switch"`.
    """
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
