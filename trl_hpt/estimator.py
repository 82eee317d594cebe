"""The Unified Policy Gradient Estimator (UPGE) of arXiv:2509.04419.

Every post-training gradient in the paper has the form

    grad = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta

per token of a trajectory. SFT, REINFORCE, GRPO/PPO, CISPO, GSPO, SRFT, LUFFY and CHORD-phi differ only in the
choice of those four parts, so each of them is an [`EstimatorSpec`] (a few lines of data in [`PRESETS`]) evaluated by
one function, [`per_token_policy_loss`], whose autograd gradient is exactly the estimator.

The module also holds the advantage estimators and TRL's loss aggregations as small pure functions, and
[`hybrid_loss`], which evaluates a batch whose rows use different specs (online rollouts one, demonstrations another)
with per-row weights in a single pass. That is what `HPTTrainer` calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from trl_hpt.feedback import correct_rollouts


REFERENCES = ("current", "rollout", "sequence", "one")
STABILIZATIONS = ("none", "clip", "cispo", "sapo")
ADVANTAGES = ("one", "reward", "group", "group_mean", "batch", "sign", "group_mixed")
TOKEN_WEIGHTS = ("none", "p_one_minus_p", "p", "sequence_p")
AGGREGATIONS = ("loss_type", "token_mean")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Policy-term aggregations beyond TRL's loss types: "max_length_sum" is the paper's reference code
# (`loss_remove_token_mean`): the micro-batch's per-token losses summed and divided by the maximum length only.
RL_AGGREGATIONS = ("max_length_sum",)


@dataclass(frozen=True)
class EstimatorSpec:
    r"""
    The four components of the unified estimator, as data.

    Args:
        name (`str`, *optional*, defaults to `"custom"`):
            Name shown in logs and errors.
        reference (`str`, *optional*, defaults to `"rollout"`):
            The denominator `pi_ref`: `"current"` (stop-grad of `pi_theta`: SFT, REINFORCE), `"rollout"` (`pi_old`,
            the sampling policy: PPO, GRPO, CISPO), `"sequence"` (GSPO's length-normalised sequence ratio) or `"one"`
            (the constant 1, for demonstration data without a behaviour policy: SRFT, LUFFY).
        stabilization (`str`, *optional*, defaults to `"clip"`):
            The mask `1_stable`: `"none"`, `"clip"` (PPO's two-sided clip of the ratio to `[1 - epsilon_low, 1 +
            epsilon_high]`, optionally capped at `delta`) or `"cispo"` (the ratio clipped at `epsilon_high` and
            detached, used as a token weight) or `"sapo"` (SAPO's soft gate: the ratio through
            `4 sigmoid(tau (r - 1)) / tau`, whose gradient weighs each token by `4 sigma (1 - sigma)` instead of a 0/1
            clip indicator; `tau` from `sapo_temperatures` by the sign of the advantage). All need a ratio, so a
            `"rollout"` or `"sequence"` reference.
        advantage (`str`, *optional*, defaults to `"group"`):
            The advantage estimate `A_hat`: `"one"` (SFT: advantages are ignored), `"reward"` (the raw reward),
            `"group"` (`(R - mean_G) / std_G`), `"group_mean"` (`R - mean_G`, Dr. GRPO), `"batch"` (group mean,
            batch std), `"sign"` (`+1` for a correct rollout, `-1` otherwise) or `"group_mixed"` (group statistics
            over the on-policy rollouts and the off-policy demonstration together: LUFFY, SRFT). Advantages are an input
            of [`per_token_policy_loss`], which only reads `"one"`; `HPTTrainer` takes `GRPOTrainer`'s (re-formed with
            the demonstration for `"group_mixed"`), and [`group_advantages`] and [`sign_advantages`] compute the
            others for direct use.
        epsilon_low (`float`, *optional*, defaults to `0.2`):
            Lower clip range for `"clip"`.
        epsilon_high (`float`, *optional*, defaults to `0.2`):
            Upper clip range for `"clip"`; the cap on the ratio for `"cispo"` (ScaleRL recommends 5.0 there).
        delta (`float`, *optional*):
            Upper cap on the unclipped ratio in `"clip"` (two-sided GRPO, INTELLECT-2). `None` disables it.
        shaping_gamma (`float`, *optional*):
            Likelihood shaping `f(p) = p / (p + gamma)` on `grad pi_theta` (LUFFY uses 0.1). `None` means no shaping.
            Only meaningful with a `"current"` or `"one"` reference.
        sapo_temperatures (`tuple[float, float]`, *optional*, defaults to `(1.0, 1.05)`):
            SAPO's `tau` for positive and for non-positive advantages.
        token_weight (`str`, *optional*, defaults to `"none"`):
            A detached per-token weight: `"none"`, `"p_one_minus_p"` (CHORD-phi, `phi = p (1 - p)`), `"p"` (DFT's
            `p`, Wu et al. 2025) or `"sequence_p"` (the row's geometric-mean token probability `exp(mean lp)`, the
            same for every token of the row: how likely the whole completion is under the current policy).
        aggregation (`str`, *optional*, defaults to `"loss_type"`):
            How rows of this spec are reduced: `"loss_type"` (together with the online rows, by TRL's `loss_type`) or
            `"token_mean"` (a separate token mean over the rows of this spec, HPT's SFT term).
    """

    name: str = "custom"
    reference: str = "rollout"
    stabilization: str = "clip"
    advantage: str = "group"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    shaping_gamma: float | None = None
    sapo_temperatures: tuple[float, float] = (1.0, 1.05)
    token_weight: str = "none"
    aggregation: str = "loss_type"

    def __post_init__(self):
        for field_name, allowed in (
            ("reference", REFERENCES),
            ("stabilization", STABILIZATIONS),
            ("advantage", ADVANTAGES),
            ("token_weight", TOKEN_WEIGHTS),
            ("aggregation", AGGREGATIONS),
        ):
            value = getattr(self, field_name)
            if value not in allowed:
                raise ValueError(f"EstimatorSpec {self.name!r}: {field_name}={value!r} is not one of {allowed}.")
        needs_ratio = self.stabilization in ("clip", "cispo", "sapo")
        if needs_ratio and self.reference not in ("rollout", "sequence"):
            raise ValueError(
                f"EstimatorSpec {self.name!r}: stabilization={self.stabilization!r} clips the importance ratio "
                f"pi_theta / pi_old, which needs reference='rollout' or 'sequence', not {self.reference!r}. Use "
                "stabilization='none' with this reference."
            )
        if self.reference == "current" and self.stabilization != "none":
            raise ValueError(f"EstimatorSpec {self.name!r}: reference='current' has ratio 1; nothing to stabilize.")
        if self.shaping_gamma is not None:
            if not self.shaping_gamma > 0:
                raise ValueError(f"EstimatorSpec {self.name!r}: shaping_gamma must be > 0, got {self.shaping_gamma}.")
            if self.reference not in ("current", "one"):
                raise ValueError(
                    f"EstimatorSpec {self.name!r}: likelihood shaping applies to demonstration rows "
                    f"(reference='current' or 'one'), not reference={self.reference!r}."
                )
        # epsilon_low >= 1 is allowed: the lower bound 1 - epsilon_low <= 0 never binds a positive ratio (no clip).
        if self.stabilization == "clip" and not (self.epsilon_low >= 0 and self.epsilon_high >= 0):
            raise ValueError(
                f"EstimatorSpec {self.name!r}: need epsilon_low >= 0 and epsilon_high >= 0, got "
                f"{self.epsilon_low}, {self.epsilon_high}."
            )
        if self.stabilization == "cispo" and not self.epsilon_high > 0:
            raise ValueError(f"EstimatorSpec {self.name!r}: cispo needs epsilon_high > 0 (the ratio cap).")
        if self.delta is not None and self.delta <= 0:
            raise ValueError(f"EstimatorSpec {self.name!r}: delta must be > 0 or None, got {self.delta}.")
        if self.advantage == "group_mixed" and self.aggregation == "token_mean":
            raise ValueError(
                f"EstimatorSpec {self.name!r}: a mixed-group advantage shares statistics with the online rows, so it "
                "must aggregate with them (aggregation='loss_type')."
            )

    @property
    def needs_old_logps(self) -> bool:
        """Whether the spec reads `pi_old` (ratio-based references)."""
        return self.reference in ("rollout", "sequence")

    @property
    def ratio_level(self) -> str:
        """The level of the importance ratio: `"sequence"` (GSPO's geometric mean) or `"token"`."""
        return "sequence" if self.reference == "sequence" else "token"

    @property
    def reads_advantages(self) -> bool:
        """Whether rows of this spec are weighted by an advantage (all but SFT-like specs, which use `A = 1`)."""
        return self.advantage != "one"

    @property
    def mixes_group(self) -> bool:
        """Whether a demonstration of this spec is scored and joins its rollouts' advantage statistics (LUFFY, SRFT)."""
        return self.advantage == "group_mixed"

    @property
    def separate_term(self) -> bool:
        """Whether rows of this spec form their own token-mean term instead of being reduced with the rollouts."""
        return self.aggregation == "token_mean"

    @property
    def clips(self) -> bool:
        """Whether the stabilization is PPO's clip (GRPOTrainer then logs clip ratios)."""
        return self.stabilization == "clip"

    def replace(self, **changes: Any) -> EstimatorSpec:
        """Returns a copy with some components changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_grpo_config(self, args: Any) -> EstimatorSpec:
        """
        Takes the online hyper-parameters from a TRL `GRPOConfig`, as `GRPOTrainer` reads them.

        `epsilon` and `epsilon_high` (defaulting to `epsilon`), `delta`, and `importance_sampling_level`
        (`"sequence"` turns a `"rollout"` reference into GSPO's `"sequence"` one). Offline specs are returned as is.
        """
        if self.reference not in ("rollout", "sequence"):
            return self
        epsilon_high = args.epsilon_high if getattr(args, "epsilon_high", None) is not None else args.epsilon
        level = getattr(args, "importance_sampling_level", "token")
        if level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}.")
        return self.replace(
            reference="sequence" if level == "sequence" else "rollout",
            epsilon_low=args.epsilon,
            epsilon_high=epsilon_high,
            delta=getattr(args, "delta", None) if self.stabilization == "clip" else None,
            sapo_temperatures=(
                getattr(args, "sapo_temperature_pos", self.sapo_temperatures[0]),
                getattr(args, "sapo_temperature_neg", self.sapo_temperatures[1]),
            ),
        )


# The paper's table as data. HPTTrainer reads the demonstration presets (DEMONSTRATION_PRESETS) and, through
# loss_type, grpo / cispo / sapo / vespo; reinforce, ppo (equal to grpo without a critic), dr_grpo and gspo are for
# direct use.
PRESETS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec("sft", reference="current", stabilization="none", advantage="one", aggregation="token_mean"),
        EstimatorSpec("reinforce", reference="current", stabilization="none", advantage="sign"),
        EstimatorSpec("grpo", reference="rollout", stabilization="clip", advantage="group"),
        EstimatorSpec("ppo", reference="rollout", stabilization="clip", advantage="group"),
        EstimatorSpec("dr_grpo", reference="rollout", stabilization="clip", advantage="group_mean"),
        EstimatorSpec("cispo", reference="rollout", stabilization="cispo", advantage="group", epsilon_high=5.0),
        # GSPO's paper uses a much narrower range, since the sequence ratio is a geometric mean.
        EstimatorSpec("gspo", reference="sequence", stabilization="clip", epsilon_low=3e-4, epsilon_high=4e-4),
        EstimatorSpec("sapo", reference="rollout", stabilization="sapo", advantage="group"),
        # VESPO's gamma weight phi(w) is a detached sequence-level factor that TRL computes
        # (`GRPOTrainer.get_gamma_weights`); the trainer passes it as a token scale on top of this REINFORCE form.
        EstimatorSpec("vespo", reference="current", stabilization="none", advantage="group"),
        EstimatorSpec("srft", reference="one", stabilization="none", advantage="group_mixed"),
        EstimatorSpec("luffy", reference="one", stabilization="none", advantage="group_mixed", shaping_gamma=0.1),
        EstimatorSpec(
            "chord_phi",
            reference="current",
            stabilization="none",
            advantage="one",
            token_weight="p_one_minus_p",
            aggregation="token_mean",
        ),
        # Dynamic Fine-Tuning (Wu et al., 2025): cross-entropy with each token weighted by its detached probability.
        EstimatorSpec(
            "dft",
            reference="current",
            stabilization="none",
            advantage="one",
            token_weight="p",
            aggregation="token_mean",
        ),
        # Cross-entropy weighted by how likely the whole demonstration is to the policy: a demonstration in a style
        # the model does not write counts little, one it could have written counts fully, token by token alike.
        EstimatorSpec(
            "sft_sequence_p",
            reference="current",
            stabilization="none",
            advantage="one",
            token_weight="sequence_p",
            aggregation="token_mean",
        ),
    )
}
DEMONSTRATION_PRESETS = ("sft", "luffy", "srft", "chord_phi", "dft", "sft_sequence_p")


def get_preset(name: str) -> EstimatorSpec:
    """Returns `PRESETS[name]` with an error that lists the presets when the name is unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown estimator preset {name!r}. Available presets: {sorted(PRESETS)}.") from None


def rollout_spec_from_grpo_config(args: Any) -> EstimatorSpec:
    """
    The estimator `GRPOTrainer` applies to rollouts for a given `GRPOConfig`.

    `loss_type` picks the stabilization (`cispo`, SAPO's soft gate, VESPO's REINFORCE form, or PPO clip for the
    others, `luspo` included: it differs in aggregation only); everything else comes from
    [`EstimatorSpec.with_grpo_config`].
    """
    loss_type = args.loss_type
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; HPTTrainer supports {LOSS_TYPES}.")
    base = PRESETS[loss_type if loss_type in ("cispo", "sapo", "vespo") else "grpo"]
    advantage = {"group": "group", "batch": "batch", "none": "group_mean"}.get(getattr(args, "scale_rewards", "group"))
    return base.with_grpo_config(args).replace(advantage=advantage or "group")


def demonstration_spec_from_hpt_config(args: Any, has_rl_term: bool = True) -> EstimatorSpec:
    """
    The estimator of demonstration rows for an `HPTConfig`: the `demonstration_loss` preset, with
    `demonstration_shaping_gamma` where the preset shapes, reduced as `demonstration_aggregation` says.

    `demonstration_aggregation=None` keeps the preset's own reduction when no RL term sits beside it (`feedback="sft"`:
    exactly cross-entropy training) and otherwise reduces demonstration tokens with the rollouts (`"loss_type"`):
    beside an RL term a separate token mean makes a demonstration token weigh 25-190 times a rollout token's
    (`benchmarks/balance.py`), while reduced with the rollouts it weighs what a rollout token with `A = 1` does.
    """
    spec = get_preset(args.demonstration_loss)
    if spec.shaping_gamma is not None:
        spec = spec.replace(shaping_gamma=args.demonstration_shaping_gamma)
    aggregation = args.demonstration_aggregation
    if aggregation is None and has_rl_term:
        aggregation = "loss_type"
    return spec if aggregation is None else spec.replace(aggregation=aggregation)


def _as_column(advantages: torch.Tensor | None, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    if advantages is None:
        raise ValueError("advantages are required for presets whose advantage estimate is not 'one'.")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.dim() != 2 or advantages.size(0) != batch_size or advantages.size(1) not in (1, like.size(1)):
        raise ValueError(
            f"advantages must have shape (batch,), (batch, 1) or (batch, tokens); got {tuple(advantages.shape)} for "
            f"per-token log-probs of shape {tuple(like.shape)}."
        )
    return advantages.to(like.dtype)


def importance_ratio(
    per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """`pi_theta / pi_old` per token `(B, T)` (`level="token"`) or per sequence `(B, 1)` (`"sequence"`, GSPO)."""
    log_ratio = per_token_logps - old_per_token_logps
    if level == "sequence":
        mask = mask.to(log_ratio.dtype)
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


def per_token_policy_loss(
    spec: EstimatorSpec,
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor | None,
    mask: torch.Tensor,
    ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    The per-token surrogate loss of the unified estimator, before aggregation.

    Its autograd gradient is `-1_stable * A * grad pi_theta / pi_ref`, shaped and weighted as the spec says. With
    `p = exp(lp)`, `r` the importance ratio and `sg` stop-gradient:

    | spec | loss |
    |---|---|
    | `current` reference | `-A * lp` (value is the cross-entropy), or `-A * f(p) / sg(p)` with shaping |
    | `one` reference | `-A * p`, or `-A * p / (p + gamma)` with shaping |
    | `rollout`/`sequence`, `clip` | `-min(min(r, delta) * A, clip(r, 1 - eps_low, 1 + eps_high) * A)` |
    | `rollout`/`sequence`, `cispo` | `-sg(min(r, eps_high)) * A * lp` |
    | `rollout`/`sequence`, `none` | `-r * A` |

    and a `p_one_minus_p` token weight multiplies the result by `sg(p (1 - p))`.

    Args:
        spec ([`EstimatorSpec`]): The estimator.
        per_token_logps (`torch.Tensor` of shape `(B, T)`): `log pi_theta` of the sampled tokens, with gradient.
        old_per_token_logps (`torch.Tensor` of shape `(B, T)`, *optional*):
            `log pi_old` of the same tokens. Only read by `"rollout"`/`"sequence"` references; `None` there means
            on-policy (`pi_old = sg(pi_theta)`), as in `GRPOTrainer` when generation and optimisation are aligned.
        advantages (`torch.Tensor` of shape `(B,)`, `(B, 1)` or `(B, T)`, *optional*):
            `A_hat`. Ignored (may be `None`) when `spec.advantage == "one"`.
        mask (`torch.Tensor` of shape `(B, T)`): 1 for completion tokens, 0 for padding.
        ratio (`torch.Tensor`, *optional*):
            The [`importance_ratio`] of these rows, when the caller already formed it; otherwise computed here.

    Returns:
        `torch.Tensor` of shape `(B, T)`: the per-token loss, zero where `mask` is zero.
    """
    lp = per_token_logps
    batch_size = lp.size(0)
    if spec.advantage == "one":
        adv = torch.ones(batch_size, 1, dtype=lp.dtype, device=lp.device)
    else:
        adv = _as_column(advantages, batch_size, lp)

    if spec.reference in ("current", "one"):
        if spec.shaping_gamma is not None:
            p = torch.exp(lp)
            shaped = p / (p + spec.shaping_gamma)
            loss = -adv * (shaped / p.detach() if spec.reference == "current" else shaped)
        elif spec.reference == "current":
            # -A * lp has the gradient of -A * p / sg(p) and reads as cross-entropy in the logs.
            loss = -adv * lp
        else:
            loss = -adv * torch.exp(lp)
    else:
        if ratio is None:
            old = lp.detach() if old_per_token_logps is None else old_per_token_logps
            ratio = importance_ratio(lp, old, mask, spec.ratio_level)
        if spec.stabilization == "clip":
            unclipped = ratio if spec.delta is None else torch.clamp(ratio, max=spec.delta)
            clipped = torch.clamp(ratio, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
            loss = -torch.min(unclipped * adv, clipped * adv)
        elif spec.stabilization == "cispo":
            loss = -torch.clamp(ratio, max=spec.epsilon_high).detach() * adv * lp
        elif spec.stabilization == "sapo":
            positive, negative = spec.sapo_temperatures
            tau = torch.where(adv > 0, positive, negative)
            loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        else:
            loss = -ratio * adv
        loss = loss.expand_as(lp)

    if spec.token_weight != "none":
        loss = loss * detached_token_weights(spec.token_weight, lp, mask)
    return torch.where(mask.bool(), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def detached_token_weights(token_weight: str, per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The detached weights of an [`EstimatorSpec`]'s `token_weight` (not `"none"`), `(B, T)` or `(B, 1)`."""
    lp = per_token_logps.detach()
    if token_weight == "sequence_p":
        m = mask.to(lp.dtype)
        return torch.exp((lp * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0))
    p = torch.exp(lp)
    return p * (1 - p) if token_weight == "p_one_minus_p" else p


def clip_fractions(
    spec: EstimatorSpec, ratio: torch.Tensor, advantages: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """
    Boolean masks of the tokens the stabilization cut off (for logging), shaped like `ratio`: `low`, `high` and
    `region` for `"clip"` (count a `delta`-capped ratio by passing it capped, as GRPOTrainer does), `cispo` for
    `"cispo"`, `None` for the others.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    if spec.stabilization == "clip":
        low = (ratio < 1 - spec.epsilon_low) & (adv < 0)
        high = (ratio > 1 + spec.epsilon_high) & (adv > 0)
        return {"low": low, "high": high, "region": low | high}
    if spec.stabilization == "cispo":
        return {"cispo": (ratio > spec.epsilon_high) & (adv > 0)}
    return None


# ----------------------------------------------------------------------------------------------------------------
# Advantage estimators
# ----------------------------------------------------------------------------------------------------------------


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # Bessel-corrected std that ignores NaN (unscorable rollouts), NaN when fewer than two values: TRL's convention.
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """
    Group-relative advantages, as `GRPOTrainer` computes them.

    `A = R - mean_G(R)`, divided by `std_G(R) + eps` (`"group"`), by the std over the whole batch (`"batch"`) or by
    nothing (`"none"`, Dr. GRPO). NaN rewards (every reward function returned `None`) are left out of the statistics
    and get advantage 0.

    Args:
        rewards (`torch.Tensor` of shape `(N,)`): rewards of `N / num_generations` consecutive groups.
        num_generations (`int`): group size `G`.
        scale_rewards (`str`): `"group"`, `"batch"` or `"none"`.
        eps (`float`): added to the std before dividing.
    """
    if rewards.numel() % num_generations != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}.")
    grouped = rewards.view(-1, num_generations)
    centered = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        if num_generations > 1:
            std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    advantages = centered if std is None else centered / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def sign_advantages(rewards: torch.Tensor, success_threshold: float = 1.0) -> torch.Tensor:
    """REINFORCE-sign advantages: `+1` for a correct rollout (reward >= threshold), `-1` otherwise (NaN included)."""
    correct = correct_rollouts(rewards, success_threshold)
    return correct.to(rewards.dtype if rewards.is_floating_point() else torch.float32) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------


def loss_type_denominator(
    loss_type: str,
    *,
    num_rows: float,
    num_tokens: float,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int = 1,
    training: bool = True,
) -> float:
    """
    The number TRL divides a micro-batch's summed loss by, for each `loss_type`.

    `grpo`/`sapo` divide the sum of per-sequence token means by `num_rows`; `luspo` the sum of per-sequence token
    sums by `num_rows`; `bnpo` the token sum by the micro-batch's `num_tokens`; `dr_grpo` by `num_rows *
    max_completion_length`; `dapo`/`cispo`/`vespo` by the generation batch's global token count
    `num_items_in_batch` (at least 1), spread over processes and accumulation steps; `max_length_sum` (the paper's
    reference code, not a TRL loss type) by `max_completion_length` alone, whatever the number of rows. All but
    `dapo`/`cispo`/`vespo` are also divided by the gradient-accumulation steps in training, as `GRPOTrainer` does
    (Trainer's own scaling is off).

    `num_rows` and `num_tokens` may be fractional (a global count spread over processes and micro-batches): only a
    zero count is replaced, by 1, so a count clamped before it was spread is not clamped again.
    """
    accumulation = gradient_accumulation_steps if training else 1
    num_rows = num_rows if num_rows > 0 else 1.0
    if loss_type in ("grpo", "sapo", "luspo"):
        return num_rows * accumulation
    if loss_type == "bnpo":
        return (num_tokens if num_tokens > 0 else 1.0) * accumulation
    if loss_type in ("dr_grpo", "max_length_sum"):
        if max_completion_length is None:
            raise ValueError(f"loss_type={loss_type!r} needs max_completion_length.")
        return (num_rows if loss_type == "dr_grpo" else 1.0) * max_completion_length * accumulation
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={loss_type!r} needs num_items_in_batch (the generation batch's tokens).")
        denominator = max(float(num_items_in_batch), 1.0) / num_processes
        if training:
            denominator = denominator * gradient_accumulation_steps / steps_per_generation
        return denominator
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES + RL_AGGREGATIONS}.")


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    row_weights: torch.Tensor | None = None,
    denominator: float | None = None,
    **denominator_kwargs: Any,
) -> torch.Tensor:
    """
    Reduces a `(B, T)` per-token loss to a scalar the way TRL's `loss_type` does.

    `row_weights` multiply each row's contribution (HPT's alpha and beta). `denominator` overrides the one computed
    from this batch, so that a pass over a subset of rows (zero-weight rows skipped) divides by what the full batch
    would; otherwise it comes from [`loss_type_denominator`] with `num_rows`/`num_tokens` of this batch.
    """
    mask = mask.to(per_token_loss.dtype)
    if loss_type in ("grpo", "sapo"):
        per_row = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    else:
        per_row = (per_token_loss * mask).sum(-1)
    if row_weights is not None:
        per_row = per_row * row_weights.to(per_row.dtype)
    if denominator is None:
        denominator_kwargs.setdefault("num_rows", float(mask.size(0)))
        denominator_kwargs.setdefault("num_tokens", float(mask.sum()))
        denominator = loss_type_denominator(loss_type, **denominator_kwargs)
    return per_row.sum() / denominator


def token_mean_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    row_weights: torch.Tensor | None = None,
    denominator: float | None = None,
) -> torch.Tensor:
    """Masked token mean of `(B, T)` losses, rows weighted; `denominator` defaults to the number of masked tokens."""
    mask = mask.to(per_token_loss.dtype)
    per_row = (per_token_loss * mask).sum(-1)
    if row_weights is not None:
        per_row = per_row * row_weights.to(per_row.dtype)
    if denominator is None:
        denominator = float(mask.sum())
    return per_row.sum() / (denominator if denominator > 0 else 1.0)


class BatchCounts(NamedTuple):
    """What a hybrid batch's terms normalise by, counted over the whole generation batch (every process)."""

    policy_tokens: torch.Tensor  # tokens reduced by the policy term (rollouts, and demonstrations reduced with them)
    separate_tokens: torch.Tensor  # demonstration tokens of the separate token-mean term
    policy_rows: torch.Tensor  # rows of the policy term


def batch_counts(
    mask: torch.Tensor, demonstration: torch.Tensor, demonstration_spec: EstimatorSpec, reduce=None
) -> BatchCounts:
    """
    The token and row counts of the two terms of [`hybrid_loss`] for one process's rows, summed over processes by
    `reduce` (a sum across processes; `None` on one process). Rows of weight zero count: skipping them in the loss
    pass must not change what the others are divided by.
    """
    tokens = mask.sum(-1).float()
    demonstration = demonstration.bool()
    separate = demonstration if demonstration_spec.separate_term else torch.zeros_like(demonstration)
    counts = torch.stack([tokens[~separate].sum(), tokens[separate].sum(), (~separate).sum().float()])
    if reduce is not None:
        counts = reduce(counts)
    return BatchCounts(*counts)


class HybridBatch(NamedTuple):
    """
    The input of [`hybrid_loss`]: one micro-batch whose rows mix rollouts and demonstrations.

    Args:
        per_token_logps (`torch.Tensor` of shape `(B, T)`): `log pi_theta` of the completion tokens, with gradient.
        mask (`torch.Tensor` of shape `(B, T)`): the tokens the loss counts.
        demonstration (`torch.Tensor` of shape `(B,)`, bool): which rows hold a demonstration.
        weights (`torch.Tensor` of shape `(B,)`): alpha for rollout rows, beta for demonstration rows.
        advantages (`torch.Tensor` of shape `(B,)` or `(B, 1)`): per-row advantages (ignored where a spec's advantage
            is `"one"`).
        old_per_token_logps (`torch.Tensor` of shape `(B, T)`, *optional*): `log pi_old`, read for rollout rows only.
        ratio (`torch.Tensor`, *optional*): the rollouts' [`importance_ratio`] when the caller formed it already
            (for a bias-corrected KL); rows that are not rollouts are never read.
        rollout_token_scale, rollout_token_bias (`torch.Tensor`, *optional*): `(B, T)` or `(B, 1)` factors applied to
            rollout rows only before aggregation: TRL's off-policy and entropy masks, vLLM importance ratio (scale)
            and KL (bias).
        policy_denominator, token_mean_denominator (`float`): what each term divides by (see
            [`Normalization.denominators`]), taken over the full micro-batch so that skipping zero-weight rows changes
            nothing.
    """

    per_token_logps: torch.Tensor
    mask: torch.Tensor
    demonstration: torch.Tensor
    weights: torch.Tensor
    advantages: torch.Tensor | None
    old_per_token_logps: torch.Tensor | None = None
    ratio: torch.Tensor | None = None
    rollout_token_scale: torch.Tensor | None = None
    rollout_token_bias: torch.Tensor | None = None
    policy_denominator: float = 1.0
    token_mean_denominator: float = 1.0


def mixed_per_token_loss(
    specs: Mapping[int, EstimatorSpec],
    row_spec: torch.Tensor,
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor | None,
    mask: torch.Tensor,
    ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    [`per_token_policy_loss`] for a batch whose rows use different specs: row `i` uses `specs[row_spec[i]]`.

    One forward pass produced `per_token_logps` for every row; each spec is evaluated on its own rows only (so a
    ratio is never formed for rows that have no `pi_old`), and the results are stitched back in row order.
    """
    out = torch.zeros_like(per_token_logps)
    for key, spec in specs.items():
        rows = (row_spec == key).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        spec_ratio = ratio if spec.needs_old_logps else None
        if rows.numel() == row_spec.numel():
            return per_token_policy_loss(spec, per_token_logps, old_per_token_logps, advantages, mask, spec_ratio)
        old = None
        if spec.needs_old_logps and old_per_token_logps is not None:
            old = old_per_token_logps[rows]
        adv = advantages[rows] if advantages is not None else None
        spec_ratio = spec_ratio[rows] if spec_ratio is not None else None
        loss = per_token_policy_loss(spec, per_token_logps[rows], old, adv, mask[rows], spec_ratio)
        out = out.index_put((rows,), loss)
    return out


def hybrid_loss(
    batch: HybridBatch,
    *,
    rollout_spec: EstimatorSpec,
    demonstration_spec: EstimatorSpec,
    loss_type: str,
    demonstration_coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    HPT's loss for one micro-batch, in a single pass over rows that mix two specs.

        L = [sum_online alpha_i l_i + sum_{demonstration, loss_type agg.} c beta_i l_i] / policy_denominator
            + c * sum_{demonstration, token_mean agg.} beta_i l_i / token_mean_denominator

    where `l_i` is row `i`'s per-token loss summed as `loss_type` sums it and `c` is `demonstration_coef`
    (`demonstration_loss_coef`).

    Args:
        batch ([`HybridBatch`]): the micro-batch.
        rollout_spec, demonstration_spec ([`EstimatorSpec`]): the estimators of rollout rows and demonstration rows.
        loss_type (`str`): TRL's aggregation for the policy term (or `"max_length_sum"`).
        demonstration_coef (`float`): the demonstration rows' coefficient `c`.

    Returns:
        `(loss, metrics)`: the loss, and detached tensors for logging: `policy_loss` and `token_mean_loss` (the two
        terms), and for clipping specs the boolean masks of [`clip_fractions`] as `clip/<name>` (shaped like the
        ratio; only rollout rows are meaningful), counted on the `delta`-capped ratio as `GRPOTrainer` counts them.
    """
    demonstration = batch.demonstration.bool()
    mask, old, advantages = batch.mask, batch.old_per_token_logps, batch.advantages
    per_token_logps = batch.per_token_logps
    ratio = batch.ratio
    if ratio is None and rollout_spec.needs_old_logps:
        reference = per_token_logps.detach() if old is None else old
        ratio = importance_ratio(per_token_logps, reference, mask, rollout_spec.ratio_level)
    per_token = mixed_per_token_loss(
        {0: rollout_spec, 1: demonstration_spec}, demonstration.long(), per_token_logps, old, advantages, mask, ratio
    )
    online = (~demonstration).unsqueeze(1)
    if batch.rollout_token_scale is not None:
        per_token = torch.where(online, per_token * batch.rollout_token_scale, per_token)
    if batch.rollout_token_bias is not None:
        per_token = torch.where(online, per_token + batch.rollout_token_bias, per_token)

    row_weights = torch.where(demonstration, batch.weights * demonstration_coef, batch.weights).to(per_token.dtype)
    separate = demonstration if demonstration_spec.separate_term else torch.zeros_like(demonstration)
    zero = per_token.new_zeros(())
    policy_rows = ~separate
    policy = zero
    if bool(policy_rows.any()):
        policy = aggregate_loss(
            per_token[policy_rows],
            mask[policy_rows],
            loss_type,
            row_weights=row_weights[policy_rows],
            denominator=batch.policy_denominator,
        )
    token_mean = zero
    if bool(separate.any()):
        token_mean = token_mean_loss(
            per_token[separate],
            mask[separate],
            row_weights=row_weights[separate],
            denominator=batch.token_mean_denominator,
        )
    metrics = {"policy_loss": policy.detach(), "token_mean_loss": token_mean.detach()}
    if ratio is not None and advantages is not None:
        counted = ratio.detach()
        if rollout_spec.delta is not None:
            counted = torch.clamp(counted, max=rollout_spec.delta)
        for name, clipped in (clip_fractions(rollout_spec, counted, advantages) or {}).items():
            metrics[f"clip/{name}"] = clipped
    return policy + token_mean, metrics


def loss_term_metrics(
    batch: HybridBatch,
    metrics: Mapping[str, torch.Tensor],
    *,
    accumulation: int,
    separate_term: bool,
    reduce=None,
    num_processes: int = 1,
) -> dict[str, float]:
    """
    `hpt/rl_loss` and `hpt/demonstration_loss` of one training micro-batch from its [`HybridBatch`] and
    [`hybrid_loss`]'s metrics, summed over processes by `reduce` (`None` on one process).

    The terms read per optimizer step: each micro-batch's term carries `1 / accumulation` (for dapo, cispo and vespo
    the spread of the token count over `steps_per_generation` micro-batches cancels over a step), so it is scaled
    back. Every process's term is its share of the global loss and DDP averages the processes, those without such
    rows included, so the trained value is the sum over processes divided by their number. A demonstration term
    reduced with the rollouts has no value of its own: its tokens' mean negative log-likelihood stands for it.
    """
    nll_mask = (batch.mask * batch.demonstration.unsqueeze(1)).to(batch.per_token_logps.dtype)
    nll, tokens = (-batch.per_token_logps.detach() * nll_mask).sum(), nll_mask.sum()
    terms = (metrics["policy_loss"] * accumulation, metrics["token_mean_loss"] * accumulation, nll, tokens)
    stats = torch.stack([t.float() for t in terms])
    stats = stats if reduce is None else reduce(stats)
    demonstration = stats[1] / num_processes if separate_term else stats[2] / stats[3].clamp(min=1.0)
    return {"hpt/rl_loss": (stats[0] / num_processes).item(), "hpt/demonstration_loss": demonstration.item()}


class Normalization(NamedTuple):
    """
    The run's constants that a micro-batch's denominators depend on ([`HybridBatch`]'s `policy_denominator` and
    `token_mean_denominator`): the policy term's aggregation, the maximum completion length, the number of processes
    and of micro-batches per generation batch.
    """

    loss_type: str
    max_completion_length: int | None = None
    num_processes: int = 1
    steps_per_generation: int = 1

    def denominators(
        self,
        policy_rows: float,
        separate_tokens: float,
        local_policy_tokens: float,
        num_items_in_batch: float | None,
        gradient_accumulation_steps: int = 1,
        training: bool = True,
    ) -> tuple[float, float]:
        """
        What one micro-batch's policy term and separate demonstration term divide by.

        Demonstrations leave the policy term unevenly across processes and micro-batches, so row counts (grpo,
        dr_grpo, sapo, luspo) are the generation batch's global `policy_rows` spread over processes and micro-batches
        (equal to the local count when no row is a demonstration), and token counts (dapo, cispo, vespo:
        `num_items_in_batch`; the separate term: `separate_tokens`) likewise; each is clamped at 1 before it is
        spread, as `GRPOTrainer` clamps its token count. `bnpo` divides by this micro-batch's own
        `local_policy_tokens`. The counts come from [`batch_counts`] over the whole micro-batch, zero-weight rows
        included.
        """
        steps = self.steps_per_generation if training else 1
        policy = loss_type_denominator(
            self.loss_type,
            num_rows=max(float(policy_rows), 1.0) / self.num_processes / steps,
            num_tokens=float(local_policy_tokens),
            max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items_in_batch,
            num_processes=self.num_processes,
            gradient_accumulation_steps=gradient_accumulation_steps,
            steps_per_generation=self.steps_per_generation,
            training=training,
        )
        token_mean = max(float(separate_tokens), 1.0) / self.num_processes
        if training:
            token_mean *= gradient_accumulation_steps / self.steps_per_generation
        return policy, token_mean


@dataclass(frozen=True)
class HybridLoss:
    """
    HPT's loss as one run configures it: [`hybrid_loss`] with the run's two specs, demonstration coefficient and
    [`Normalization`], and what a trainer reads around it (denominators, logged terms).

    Args:
        rollout_spec, demonstration_spec ([`EstimatorSpec`]): the estimators of rollout and demonstration rows.
        normalization ([`Normalization`]): the policy term's aggregation and the run's constants.
        demonstration_coef (`float`): the demonstration rows' coefficient (`demonstration_loss_coef`).
    """

    rollout_spec: EstimatorSpec
    demonstration_spec: EstimatorSpec
    normalization: Normalization
    demonstration_coef: float = 1.0

    def __call__(self, batch: HybridBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(loss, metrics)` of one micro-batch, as [`hybrid_loss`] returns them."""
        return hybrid_loss(
            batch,
            rollout_spec=self.rollout_spec,
            demonstration_spec=self.demonstration_spec,
            loss_type=self.normalization.loss_type,
            demonstration_coef=self.demonstration_coef,
        )

    @classmethod
    def from_config(cls, args: Any, *, has_rl_term: bool = True, num_processes: int = 1) -> HybridLoss:
        """
        The loss of an `HPTConfig`: rollouts as `GRPOTrainer` trains them ([`rollout_spec_from_grpo_config`]),
        demonstrations as [`demonstration_spec_from_hpt_config`] says, the policy term reduced as `loss_type` (or
        `rl_aggregation`, which replaces it) does.
        """
        normalization = Normalization(
            args.rl_aggregation or args.loss_type, args.max_completion_length, num_processes, args.steps_per_generation
        )
        return cls(
            rollout_spec_from_grpo_config(args),
            demonstration_spec_from_hpt_config(args, has_rl_term=has_rl_term),
            normalization,
            args.demonstration_loss_coef,
        )

    def denominators(self, mask, rows, num_items_in_batch, accumulation: int, training: bool) -> tuple[float, float]:
        """
        A micro-batch's denominators ([`Normalization.denominators`]) from its loss `mask`, its `rows` (which are
        demonstrations, for bnpo's local token count, and the generation batch's global `policy_rows` and
        `separate_tokens`) and `num_items_in_batch`.
        """
        local = batch_counts(mask, rows.demonstration, self.demonstration_spec)
        return self.normalization.denominators(
            rows.policy_rows, rows.separate_tokens, local.policy_tokens, num_items_in_batch, accumulation, training
        )

    def term_metrics(self, batch: HybridBatch, metrics, accumulation: int, reduce=None) -> dict[str, float]:
        """[`loss_term_metrics`] of a training micro-batch."""
        return loss_term_metrics(
            batch,
            metrics,
            accumulation=accumulation,
            separate_term=self.demonstration_spec.separate_term,
            reduce=reduce,
            num_processes=self.normalization.num_processes,
        )
