"""The unified estimator against closed forms, in float64, with padding and ratios far from 1."""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_hpt.estimator import (
    PRESETS,
    EstimatorSpec,
    HybridBatch,
    aggregate_loss,
    clip_fractions,
    get_preset,
    group_advantages,
    hybrid_loss,
    importance_ratio,
    loss_type_denominator,
    mixed_per_token_loss,
    per_token_policy_loss,
    rollout_spec_from_grpo_config,
    sign_advantages,
    token_mean_loss,
)
from trl_hpt.grpo_mirror import grpo_advantages


B, T, V = 6, 7, 11


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    logits.requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # old log-probs far from the current ones: ratios spread over roughly [0.2, 5] so both clip sides trigger.
    old = lp.detach() + torch.empty(B, T, dtype=torch.float64).uniform_(-1.6, 1.6, generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 5, 3, 6, 1, 4])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    token_w = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return logits, tokens, lp, old, adv, mask, token_w


def closed_form(spec, lp, old, adv, mask):
    """(value, dL/dlp) per token, written from the paper's formulas rather than from the implementation."""
    lp = lp.detach()
    p = lp.exp()
    A = torch.ones(B, 1, dtype=lp.dtype) if spec.advantage == "one" else adv.unsqueeze(1)
    A = A.expand(B, T)
    m = mask.double()
    if spec.reference == "current" and spec.shaping_gamma is None:
        value, coef = -A * lp, -A
    elif spec.reference == "current":
        g = spec.shaping_gamma
        value, coef = -A * (p / (p + g)) / p, -A * g / (p + g) ** 2
    elif spec.reference == "one" and spec.shaping_gamma is None:
        value, coef = -A * p, -A * p
    elif spec.reference == "one":
        g = spec.shaping_gamma
        value, coef = -A * p / (p + g), -A * g * p / (p + g) ** 2
    else:
        if spec.reference == "sequence":
            n = m.sum(-1, keepdim=True)
            r = torch.exp(((lp - old) * m).sum(-1, keepdim=True) / n).expand(B, T)
        else:
            r = torch.exp(lp - old)
        if spec.stabilization == "clip":
            lo, hi = 1 - spec.epsilon_low, 1 + spec.epsilon_high
            u = r if spec.delta is None else torch.clamp(r, max=spec.delta)
            c = torch.clamp(r, lo, hi)
            takes_unclipped = u * A <= c * A
            value = -torch.minimum(u * A, c * A)
            live_u = torch.ones_like(r) if spec.delta is None else (r < spec.delta).double()
            live_c = ((r > lo) & (r < hi)).double()
            coef = -A * r * torch.where(takes_unclipped, live_u, live_c)
        elif spec.stabilization == "cispo":
            w = torch.clamp(r, max=spec.epsilon_high)
            value, coef = -w * A * lp, -w * A
        elif spec.stabilization == "sapo":
            # SAPO: f(r) = 4 sigmoid(tau (r - 1)) / tau, f'(r) = 4 s (1 - s); d r / d lp = r.
            tau = torch.where(A > 0, spec.sapo_temperatures[0], spec.sapo_temperatures[1])
            sig = torch.sigmoid(tau * (r - 1))
            value, coef = -4 * sig / tau * A, -4 * sig * (1 - sig) * r * A
        else:
            value, coef = -r * A, -r * A
    if spec.token_weight == "p_one_minus_p":
        value, coef = value * p * (1 - p), coef * p * (1 - p)
    elif spec.token_weight == "p":
        value, coef = value * p, coef * p
    elif spec.token_weight == "sequence_p":
        # the geometric mean of the row's token probabilities over its own tokens, a constant of the gradient
        w = torch.exp((lp * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True))
        value, coef = value * w, coef * w
    return value * m, coef * m


def expected_logit_grad(spec, coef, token_w, logits, tokens, mask):
    """d/dlogits of sum_t w_t L_t. Token-local specs: w_t c_t (onehot - softmax); GSPO spreads the row's weights."""
    probs = torch.softmax(logits.detach(), -1)
    dlp = F.one_hot(tokens, V).double() - probs
    m = mask.double()
    if spec.reference == "sequence":
        # each token's loss depends on the row's mean log-ratio: d/dlp_t sum_s w_s L_s = c * mean-weight over the row
        row_w = (token_w * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
        scale = coef * row_w
    else:
        scale = coef * token_w
    return scale.unsqueeze(-1) * dlp * m.unsqueeze(-1)


SPECS = [*PRESETS.values()]
SPECS += [
    PRESETS["grpo"].replace(name="grpo_delta", delta=1.5, epsilon_high=0.28),
    PRESETS["grpo"].replace(name="grpo_sequence", reference="sequence", epsilon_low=0.05, epsilon_high=0.1),
    PRESETS["cispo"].replace(name="cispo_tight", epsilon_high=1.3),
    PRESETS["sapo"].replace(name="sapo_sequence", reference="sequence", sapo_temperatures=(0.5, 2.0)),
    EstimatorSpec("is_reinforce", reference="rollout", stabilization="none"),
    EstimatorSpec("shaped_current", reference="current", stabilization="none", advantage="reward", shaping_gamma=0.2),
    EstimatorSpec("custom_offline", reference="one", stabilization="none", advantage="group_mixed", shaping_gamma=0.2),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_preset_matches_its_closed_form(spec):
    logits, tokens, lp, old, adv, mask, token_w = make_batch(seed=hash(spec.name) % 1000)
    loss = per_token_policy_loss(spec, lp, old, adv, mask)
    value, coef = closed_form(spec, lp, old, adv, mask)
    torch.testing.assert_close(loss.detach(), value, atol=1e-10, rtol=1e-10)
    (grad,) = torch.autograd.grad((loss * token_w).sum(), logits)
    torch.testing.assert_close(
        grad, expected_logit_grad(spec, coef, token_w, logits, tokens, mask), atol=1e-10, rtol=0
    )


def test_clipping_is_exercised():
    _, _, lp, old, adv, mask, _ = make_batch()
    r = torch.exp(lp.detach() - old)[mask.bool()]
    assert (r > 1.2).sum() > 5 and (r < 0.8).sum() > 5


def test_sft_value_is_cross_entropy_and_gradient_matches():
    logits, tokens, lp, _, _, mask, _ = make_batch(3)
    loss = per_token_policy_loss(PRESETS["sft"], lp, None, None, mask)
    sel = mask.bool()
    ce_per_token = F.cross_entropy(logits[sel], tokens[sel], reduction="none")
    torch.testing.assert_close(loss[sel], ce_per_token, atol=1e-12, rtol=0)
    (ours,) = torch.autograd.grad(token_mean_loss(loss, mask), logits)
    (ref,) = torch.autograd.grad(F.cross_entropy(logits[sel], tokens[sel]), logits)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


def test_none_old_logps_is_on_policy():
    _, _, lp, _, adv, mask, _ = make_batch(4)
    spec = PRESETS["grpo"]
    torch.testing.assert_close(
        per_token_policy_loss(spec, lp, None, adv, mask), per_token_policy_loss(spec, lp, lp.detach(), adv, mask)
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reference": "one", "stabilization": "clip"}, "needs reference='rollout'"),
        ({"reference": "current", "stabilization": "cispo"}, "needs reference='rollout'"),
        ({"reference": "rollout", "shaping_gamma": 0.1}, "shaping"),
        ({"reference": "one", "stabilization": "none", "shaping_gamma": 0.0}, "shaping_gamma must be > 0"),
        ({"reference": "bogus"}, "reference='bogus'"),
        ({"advantage": "median"}, "advantage='median'"),
        ({"stabilization": "clip", "epsilon_low": -0.1}, "epsilon_low"),
        (
            {"reference": "one", "stabilization": "none", "advantage": "group_mixed", "aggregation": "token_mean"},
            "mixed",
        ),
    ],
)
def test_invalid_combinations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EstimatorSpec(**kwargs)


def test_user_built_spec_without_writing_a_loss():
    spec = EstimatorSpec(reference="one", stabilization="none", advantage="group_mixed", shaping_gamma=0.2)
    _, _, lp, _, adv, mask, _ = make_batch(5)
    p = lp.detach().exp()
    expected = -adv.unsqueeze(1) * p / (p + 0.2) * mask
    torch.testing.assert_close(per_token_policy_loss(spec, lp, None, adv, mask).detach(), expected)


def test_get_preset_lists_names():
    with pytest.raises(ValueError, match="Available presets"):
        get_preset("trpo")
    assert {"sft", "reinforce", "grpo", "cispo", "gspo", "srft", "luffy", "chord_phi"} <= set(PRESETS)


def test_rollout_spec_from_grpo_config():
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir="unused",
        loss_type="dapo",
        epsilon=0.1,
        epsilon_high=0.3,
        delta=2.0,
        importance_sampling_level="sequence",
        scale_rewards="none",
        report_to="none",
        bf16=False,
    )
    spec = rollout_spec_from_grpo_config(args)
    assert (spec.reference, spec.stabilization, spec.advantage) == ("sequence", "clip", "group_mean")
    assert (spec.epsilon_low, spec.epsilon_high, spec.delta) == (0.1, 0.3, 2.0)
    args.loss_type, args.importance_sampling_level, args.epsilon_high = "cispo", "token", 5.0
    spec = rollout_spec_from_grpo_config(args)
    assert (spec.stabilization, spec.epsilon_high, spec.delta, spec.reference) == ("cispo", 5.0, None, "rollout")
    args.loss_type, args.sapo_temperature_pos, args.sapo_temperature_neg = "sapo", 0.7, 1.3
    spec = rollout_spec_from_grpo_config(args)
    assert (spec.stabilization, spec.sapo_temperatures, spec.reference) == ("sapo", (0.7, 1.3), "rollout")
    args.loss_type = "luspo"
    assert rollout_spec_from_grpo_config(args).stabilization == "clip"  # LUSPO differs in aggregation only
    args.loss_type = "vespo"  # TRL's gamma weight comes on top, as a token scale the trainer computes
    assert rollout_spec_from_grpo_config(args).reference == "current"
    args.loss_type = "ppo_kl"
    with pytest.raises(ValueError, match="Unknown loss_type 'ppo_kl'"):
        rollout_spec_from_grpo_config(args)


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, "group")
    std = math.sqrt(1 / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    torch.testing.assert_close(adv[4:], torch.zeros(4))
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    batch_std = rewards.std()
    torch.testing.assert_close(
        group_advantages(rewards, 4, "batch"),
        (rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)) / (batch_std + 1e-4),
    )


def test_nan_rewards_are_left_out_and_get_zero_advantage():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    adv = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(adv, torch.tensor([2 / 3, 0.0, -1 / 3, -1 / 3]))


def test_mixed_group_includes_offline_row():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0])  # nobody solved it: GRPO has no signal
    demonstration_mask = torch.tensor([False, False, False, True])
    # The demonstration's reward in its slot, as HPTTrainer forms LUFFY's and SRFT's mixed groups.
    mixed = torch.where(demonstration_mask, torch.ones(4), rewards).unsqueeze(1)
    adv = grpo_advantages(mixed, torch.ones(1), 4, "none")
    torch.testing.assert_close(adv, torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    torch.testing.assert_close(grpo_advantages(mixed, torch.ones(1), 4, "group"), group_advantages(mixed[:, 0], 4))


def test_sign_advantages():
    torch.testing.assert_close(
        sign_advantages(torch.tensor([1.0, 0.5, float("nan"), 2.0])), torch.tensor([1.0, -1.0, -1.0, 1.0])
    )


# ---------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_aggregate_loss_hand_computed(loss_type):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    kw = dict(
        max_completion_length=5,
        num_items_in_batch=8,
        num_processes=2,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
    )
    expected = {
        "grpo": (2.0 + 4.0) / 2 / 2,
        "bnpo": 10.0 / 4 / 2,
        "dr_grpo": 10.0 / (2 * 5) / 2,
        "dapo": 10.0 / (8 / 2 * 2 / 4),
        "cispo": 10.0 / (8 / 2 * 2 / 4),
    }[loss_type]
    assert aggregate_loss(per_token, mask, loss_type, **kw).item() == pytest.approx(expected)


def test_hybrid_loss_terms_and_skipping_rows():
    """Aggregating a subset of rows with the full batch's denominators gives the full batch's loss and gradients."""
    logits, tokens, lp, old, adv, mask, _ = make_batch(7)
    demonstration = torch.tensor([False, False, True, False, False, True])
    weights = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.25], dtype=torch.float64)
    online = ~demonstration
    policy_den = loss_type_denominator("dapo", num_rows=4, num_tokens=0, num_items_in_batch=float(mask[online].sum()))
    sft_den = float(mask[demonstration].sum())
    kw = dict(
        rollout_spec=PRESETS["grpo"],
        demonstration_spec=PRESETS["sft"],
        loss_type="dapo",
        demonstration_coef=0.3,
    )
    denominators = dict(policy_denominator=policy_den, token_mean_denominator=sft_den)
    full_loss, metrics = hybrid_loss(HybridBatch(lp, mask, demonstration, weights, adv, old, **denominators), **kw)
    # by hand: policy term over online rows, SFT term over demonstration tokens
    grpo = per_token_policy_loss(PRESETS["grpo"], lp, old, adv, mask)
    sft = per_token_policy_loss(PRESETS["sft"], lp, None, None, mask)
    by_hand = (grpo.sum(-1) * weights * online).sum() / policy_den + 0.3 * (
        sft.sum(-1) * weights * demonstration
    ).sum() / sft_den
    torch.testing.assert_close(full_loss, by_hand)
    torch.testing.assert_close(
        metrics["token_mean_loss"], 0.3 * (sft.sum(-1) * weights * demonstration).sum() / sft_den
    )
    (g_full,) = torch.autograd.grad(full_loss, logits)

    keep = weights > 0
    lp_kept = torch.log_softmax(logits[keep], -1).gather(-1, tokens[keep].unsqueeze(-1)).squeeze(-1)
    kept = HybridBatch(lp_kept, mask[keep], demonstration[keep], weights[keep], adv[keep], old[keep], **denominators)
    part_loss, _ = hybrid_loss(kept, **kw)
    (g_part,) = torch.autograd.grad(part_loss, logits)
    torch.testing.assert_close(part_loss, full_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_part, g_full, atol=1e-12, rtol=0)


def test_mixed_per_token_loss_uses_each_rows_spec():
    _, _, lp, old, adv, mask, _ = make_batch(8)
    row_spec = torch.tensor([0, 1, 0, 1, 1, 0])
    out = mixed_per_token_loss({0: PRESETS["cispo"], 1: PRESETS["luffy"]}, row_spec, lp, old, adv, mask)
    a = per_token_policy_loss(PRESETS["cispo"], lp, old, adv, mask)
    b = per_token_policy_loss(PRESETS["luffy"], lp, None, adv, mask)
    torch.testing.assert_close(out, torch.where(row_spec.bool().unsqueeze(1), b, a))


@pytest.mark.parametrize("online", ["grpo", "gspo", "cispo"])
def test_hybrid_loss_with_the_callers_ratio_equals_its_own_and_reports_clipping(online):
    """A ratio formed once by the caller (for a bias-corrected KL) gives the same loss, gradient and clip masks."""
    logits, _, lp, old, adv, mask, _ = make_batch(9)
    changes = {
        "grpo": {"delta": 2.0},
        "gspo": {"epsilon_low": 0.1, "epsilon_high": 0.1},
        "cispo": {"epsilon_high": 1.5},
    }
    spec = PRESETS[online].replace(**changes[online])
    demonstration = torch.tensor([False, True, False, False, True, False])
    weights = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 2.0], dtype=torch.float64)
    kw = dict(rollout_spec=spec, demonstration_spec=PRESETS["sft"], loss_type="dapo")
    dens = dict(policy_denominator=20.0, token_mean_denominator=7.0)
    own_loss, own = hybrid_loss(HybridBatch(lp, mask, demonstration, weights, adv, old, **dens), **kw)
    (own_grad,) = torch.autograd.grad(own_loss, logits, retain_graph=True)
    ratio = importance_ratio(lp, old, mask, spec.ratio_level)
    given_loss, given = hybrid_loss(HybridBatch(lp, mask, demonstration, weights, adv, old, ratio=ratio, **dens), **kw)
    (given_grad,) = torch.autograd.grad(given_loss, logits)
    torch.testing.assert_close(given_loss, own_loss, atol=0, rtol=0)
    torch.testing.assert_close(given_grad, own_grad, atol=0, rtol=0)
    counted = ratio.detach() if spec.delta is None else ratio.detach().clamp(max=spec.delta)
    expected = clip_fractions(spec, counted, adv)
    assert sorted(own) == sorted(["policy_loss", "token_mean_loss", *(f"clip/{k}" for k in expected)])
    for name, clipped in expected.items():
        assert torch.equal(own[f"clip/{name}"], clipped) and torch.equal(given[f"clip/{name}"], clipped)
    assert any(bool(c[~demonstration].any()) for c in expected.values())  # the batch does clip some rollout tokens


def test_normalization_spreads_global_counts_over_processes_and_micro_batches():
    from trl_hpt.estimator import Normalization

    norm = Normalization("grpo", max_completion_length=16, num_processes=2, steps_per_generation=4)
    # 24 policy rows over 2 processes x 4 micro-batches = 3 per micro-batch, then / accumulation (2).
    policy, token_mean = norm.denominators(24.0, 40.0, 9.0, None, gradient_accumulation_steps=2)
    assert policy == pytest.approx(3 * 2) and token_mean == pytest.approx(40 / 2 * 2 / 4)
    assert norm._replace(loss_type="bnpo").denominators(24.0, 40.0, 9.0, None, 2)[0] == pytest.approx(9 * 2)
    assert norm._replace(loss_type="dr_grpo").denominators(24.0, 0.0, 9.0, None, 2)[0] == pytest.approx(3 * 16 * 2)
    dapo, _ = norm._replace(loss_type="dapo").denominators(24.0, 0.0, 9.0, 80.0, 2)
    assert dapo == pytest.approx(80 / 2 * 2 / 4)
    # Empty counts are clamped at 1 before they are spread; evaluation has no micro-batches or accumulation.
    assert norm.denominators(0.0, 0.0, 0.0, None, 2) == pytest.approx((1 / 2 / 4 * 2, 1 / 2 * 2 / 4))
    assert norm.denominators(24.0, 40.0, 9.0, None, 2, training=False) == pytest.approx((12.0, 20.0))


def test_hybrid_loss_from_config_reads_the_specs_aggregation_and_coefficient(tmp_path):
    from trl_hpt import HPTConfig
    from trl_hpt.estimator import HybridLoss

    args = HPTConfig(
        str(tmp_path),
        loss_type="dapo",
        demonstration_loss="luffy",
        demonstration_loss_coef=0.5,
        report_to="none",
        bf16=False,
    )
    loss = HybridLoss.from_config(args, num_processes=4)
    assert loss.rollout_spec == rollout_spec_from_grpo_config(args)
    assert (loss.demonstration_spec.name, loss.demonstration_spec.aggregation) == ("luffy", "loss_type")
    assert loss.normalization == ("dapo", args.max_completion_length, 4, args.steps_per_generation)
    assert loss.demonstration_coef == 0.5
    reference = HPTConfig(str(tmp_path), rl_aggregation="max_length_sum", feedback="sft", report_to="none", bf16=False)
    sft_only = HybridLoss.from_config(reference, has_rl_term=False)
    assert sft_only.normalization.loss_type == "max_length_sum" and sft_only.demonstration_spec.separate_term


@pytest.mark.parametrize("separate", [True, False])
def test_loss_term_metrics_read_per_optimizer_step_over_processes(separate):
    from trl_hpt.estimator import loss_term_metrics

    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    batch = HybridBatch(lp, mask, torch.tensor([False, True]), torch.ones(2), None)
    metrics = {"policy_loss": torch.tensor(0.25), "token_mean_loss": torch.tensor(0.125)}

    def two_equal_processes(t):
        return t * 2

    values = loss_term_metrics(
        batch, metrics, accumulation=4, separate_term=separate, reduce=two_equal_processes, num_processes=2
    )
    assert values["hpt/rl_loss"] == pytest.approx(0.25 * 4)
    # Separate: the token-mean term itself; reduced with the rollouts: the demonstration tokens' mean NLL.
    assert values["hpt/demonstration_loss"] == pytest.approx(0.125 * 4 if separate else 5.0 / 3)
