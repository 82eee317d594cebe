"""What HPTTrainer computes exactly as TRL 1.16's `GRPOTrainer` does, but cannot call because TRL computes it inline.

`GRPOTrainer._compute_loss` and `_generate_and_score_completions` are single methods: their advantage recipe, entropy
bonus (with the adaptive controller) and loss metrics have no entry point of their own. HPT's loss pass needs them on
a batch whose rows carry weights and demonstrations, so they are mirrored here, in this one place, and nowhere else.

On every TRL upgrade, re-read `trl/trainer/grpo_trainer.py` against this module. `tests/test_parity.py` checks each
piece numerically: with HPT's loss pass forced on, a `feedback="rl"` run must equal `GRPOTrainer` in parameters and in
every logged value, for every loss type and option; `tests/test_trainer_review.py` checks `grpo_advantages` against
the advantages `GRPOTrainer` computes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import gather
from trl.trainer.utils import nanmax, nanmin, nanstd

from trl_hpt.estimator import group_advantages, importance_ratio


# Mirrored from this TRL minor series (the trainer refuses any other).
MIRRORED_TRL = "1.16"
# Loss types whose GRPOTrainer loss is already divided by the accumulation steps inside its token normaliser.
GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo", "vespo")


class GRPOTokenTerms(NamedTuple):
    """GRPOTrainer's per-token modifiers of the policy loss, for the rows that train by RL."""

    ratio: torch.Tensor  # pi_theta / pi_old at importance_sampling_level: (B, T) or (B, 1)
    scale: torch.Tensor | None  # entropy mask x off-policy mask x (vLLM IS ratio or VESPO's phi)
    per_token_kl: torch.Tensor | None  # k3 estimate, bias-corrected if configured; 0 on demonstration rows
    entropy_mask: torch.Tensor | None
    phi: torch.Tensor | None  # VESPO's gamma weight

    def rollout_modifiers(self, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`HybridBatch`'s `ratio`, `rollout_token_scale` and `rollout_token_bias` (the KL times `kl_coef`)."""
        return self.ratio, self.scale, None if self.per_token_kl is None else kl_coef * self.per_token_kl


def grpo_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    eps: float = 1e-4,
) -> torch.Tensor:
    """
    Advantages from per-function rewards exactly as `GRPOTrainer._generate_and_score_completions` (TRL 1.16) forms
    them, so that a batch whose rewards were edited (a demonstration's in its rollout's slot) is normalised the same way.

    `"sum_then_normalize"`: the weighted total, centred per group and scaled as `scale_rewards` says (see
    [`group_advantages`]). `"normalize_then_sum"`: each function's rewards standardised per group, the weighted sum of
    those standardised over the whole batch. Rows every function left unscored (all NaN) get advantage 0.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(N, F)`): rewards of consecutive groups, NaN for `None`.
        reward_weights (`torch.Tensor` of shape `(F,)`): the config's reward weights.
        num_generations (`int`): group size `G`.
        scale_rewards (`str`): `"group"`, `"batch"` or `"none"`.
        multi_objective_aggregation (`str`): `"sum_then_normalize"` or `"normalize_then_sum"`.
    """
    weights = reward_weights.to(rewards_per_func.device, rewards_per_func.dtype).unsqueeze(0)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        return group_advantages(rewards, num_generations, scale_rewards, eps)
    elif multi_objective_aggregation == "normalize_then_sum":
        num_funcs = rewards_per_func.size(1)
        grouped = rewards_per_func.view(-1, num_generations, num_funcs)
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        std = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
        standardised = ((grouped - mean) / (std + eps)).view(-1, num_funcs)
        rewards = (standardised * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        batch_std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (batch_std + eps)
    else:
        raise ValueError(
            f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got "
            f"{multi_objective_aggregation!r}."
        )
    return torch.nan_to_num(advantages, nan=0.0)


class GRPOLossMirror:
    """The token modifiers, regularisers and metrics of `GRPOTrainer._compute_loss`, for a mixin before it."""

    def _grpo_token_terms(
        self, inputs, per_token_logps, old_per_token_logps, advantages, entropies, mask, rl_rows
    ) -> GRPOTokenTerms:
        """
        GRPOTrainer's ratio, masks, importance weights and KL for a micro-batch, restricted to `rl_rows`.

        The masks and weights come from TRL's own static methods (`get_high_entropy_mask`, `get_off_policy_mask`,
        `get_gamma_weights`); the entropy quantile is taken over the tokens of `rl_rows` only, so rows that do not
        train by RL (demonstrations, zero-weight rollouts) never move it.
        """
        rl_mask = mask * rl_rows.unsqueeze(1)
        ratio = importance_ratio(per_token_logps, old_per_token_logps, mask, self.importance_sampling_level)
        scale, entropy_mask, phi = None, None, None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, rl_mask, 1 - self.top_entropy_quantile)
            scale = entropy_mask
        if self.off_policy_mask_threshold is not None:
            off_policy_mask = self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            scale = off_policy_mask if scale is None else off_policy_mask * scale
        if self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=advantages,
                log_ratio_per_token=per_token_logps - old_per_token_logps,
                mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos,
                k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg,
            )
            scale = phi if scale is None else phi * scale
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
            scale = is_ratio if scale is None else scale * is_ratio
        per_token_kl = None
        if self.beta != 0.0:
            # Demonstration rows hold a fill value, not reference log-probs, and zero-weight rows do not train: a zero
            # log-ratio there, since exp() of the fill can overflow and the zero gradient torch.where sends back
            # through an inf is NaN.
            ref = torch.where(rl_rows.unsqueeze(1), inputs["ref_per_token_logps"], per_token_logps.detach())
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * ratio
        return GRPOTokenTerms(ratio, scale, per_token_kl, entropy_mask, phi)

    def _grpo_regularize(self, loss, entropies, effective_mask, aux_loss, accumulation, mode):
        """The entropy bonus and router aux loss added to the policy loss, with GRPOTrainer's metrics."""
        if self._entropy_bonus_enabled:
            # GRPOTrainer logs the loss before the bonus, unscaled by accumulation where its loss type scales it.
            unscaled = loss.detach() if self.loss_type in GLOBAL_TOKEN_LOSS_TYPES else loss.detach() * accumulation
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(unscaled).nanmean().item())
            loss = loss - self._entropy_bonus(entropies, effective_mask, mode)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    def _entropy_bonus(self, entropies, effective_mask, mode):
        """GRPOTrainer's entropy bonus: a token mean over the tokens that train, scaled for accumulation only."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            if mode == "train":
                stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
                window = self._entropy_window_stats
                self._entropy_window_stats = stats if window is None else window + stats
                if self.accelerator.sync_gradients:
                    totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                    step = self.args.entropy_coef_delta
                    if world_entropy <= self.args.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
                    self._last_world_entropy = world_entropy
                    self._entropy_window_stats = None
        else:
            coef = self.entropy_coef
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef * entropy_loss

    def _global_mean(self, values, token_mask, row_mask) -> float:
        """Mean over every process; `(B, 1)` values are per sequence, averaged over rows as GRPOTrainer does."""
        weight = row_mask.unsqueeze(1) if values.size(1) == 1 else token_mask
        weight = weight.to(values.dtype)
        stats = torch.stack([(values * weight).sum(), weight.sum()]).detach()
        totals = self.accelerator.reduce(stats, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_grpo_loss_metrics(self, mode, mask, active, rl_rows, entropies, loss_metrics, terms) -> None:
        """
        GRPOTrainer's `kl`, `entropy`, clip-ratio, `cispo_clip_ratio` and `vespo/phi_seq_mean` metrics.

        Over the rows that train by RL (`rl_rows`; all rows without demonstrations, which is GRPOTrainer's case),
        `entropy` over every trained token (`active`). `loss_metrics` holds the estimator's `clip/<name>` masks,
        `terms` the [`GRPOTokenTerms`] (KL, VESPO's phi).
        """
        metrics = self._metrics[mode]
        rl_mask = mask * rl_rows.unsqueeze(1)
        if terms.per_token_kl is not None:
            metrics["kl"].append(self._global_mean(terms.per_token_kl.detach(), rl_mask, rl_rows))
        metrics["entropy"].append(self._global_mean(entropies, active, active.sum(-1) > 0))
        if self.rollout_spec.clips:
            fractions = {name: loss_metrics[f"clip/{name}"].float() for name in ("low", "high", "region")}
            for name, values in fractions.items():
                metrics[f"clip_ratio/{name}_mean"].append(self._global_mean(values, rl_mask, rl_rows))
            # Per-sequence extremes; a rank whose rollouts were all skipped sends NaN, which nanmin/nanmax ignore.
            per_seq_mask = rl_mask.to(fractions["low"].dtype)
            rows = per_seq_mask.sum(-1) > 0 if fractions["low"].size(1) > 1 else rl_rows
            for name, reducer, extreme in (("low", nanmin, "min"), ("high", nanmax, "max")):
                values = fractions[name]
                if values.size(1) == 1:
                    per_seq = values.squeeze(1)
                else:
                    per_seq = (values * per_seq_mask).sum(-1) / per_seq_mask.sum(-1).clamp(min=1.0)
                local = getattr(per_seq[rows], extreme)() if bool(rows.any()) else per_seq.new_tensor(float("nan"))
                metrics[f"clip_ratio/{name}_{extreme}"].append(reducer(gather(local.reshape(1))).item())
        elif self.rollout_spec.stabilization == "cispo":
            cispo = loss_metrics["clip/cispo"].float()
            metrics["cispo_clip_ratio"].append(self._global_mean(cispo, rl_mask, rl_rows))
        elif self.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(self._global_mean(terms.phi, rl_mask, rl_rows))
