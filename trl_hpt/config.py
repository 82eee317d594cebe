"""Configuration of [`HPTTrainer`]."""

import logging
import math
import warnings
from dataclasses import dataclass, field, fields

from trl import GRPOConfig
from trl.trainer.utils import get_config_model_id

from trl_hpt.estimator import AGGREGATIONS, DEMONSTRATION_PRESETS, RL_AGGREGATIONS, get_preset
from trl_hpt.feedback import STRATEGIES


logger = logging.getLogger(__name__)


FEEDBACK_STRATEGIES = tuple(STRATEGIES)
# Former names of the demonstration fields: still accepted, with a FutureWarning, until trl-hpt 0.2.
RENAMED_FIELDS = {
    "sft_loss_coef": "demonstration_loss_coef",
    "offline_loss": "demonstration_loss",
    "offline_shaping_gamma": "demonstration_shaping_gamma",
    "offline_aggregation": "demonstration_aggregation",
}


@dataclass
class HPTConfig(GRPOConfig):
    r"""
    Configuration class for [`HPTTrainer`].

    [`HPTConfig`] inherits every parameter of TRL's [`~trl.GRPOConfig`] (generation, rewards, `loss_type`, clipping,
    vLLM, logging...) and adds the parameters of Hybrid Post-Training ([Lv et al., 2025](https://huggingface.co/papers/2509.04419)):
    for each prompt, the share of its rollouts that the verifier accepts decides how much SFT (on the prompt's
    demonstration) and how much RL (on its rollouts) the prompt gets.

    The inherited defaults are GRPOConfig's, so that `feedback="rl"` is the same run as `GRPOTrainer`. The paper's own
    settings (Dr. GRPO normalisation, no std scaling, single update per batch) are in `examples/recipes/`.

    Parameters:
        demonstration_column (`str`, *optional*, defaults to `"completion"`):
            Dataset column holding each prompt's demonstration.
        feedback (`str`, *optional*, defaults to `"switch"`):
            Feedback strategy mapping a prompt's accuracy `P` to its RL weight `alpha` and SFT weight `beta`.
        switch_gate (`float`, *optional*, defaults to `0.0`):
            `switch`: SFT when `P <= switch_gate`, RL otherwise.
        success_threshold (`float`, *optional*, defaults to `1.0`):
            A rollout is correct when its verifier reward is at least this.
        verifier_reward_index (`int`, *optional*):
            Index of the reward function that acts as verifier. `None`: the weighted total reward.
        demonstration_loss_coef (`float`, *optional*, defaults to `1.0`):
            Coefficient of the demonstration term. Formerly `sft_loss_coef`.
        demonstration_loss (`str`, *optional*, defaults to `"sft"`):
            Estimator preset for demonstration rows: `sft`, `luffy`, `srft`, `chord_phi`, `dft` or
            `sft_sequence_p`. Formerly `offline_loss`.
        demonstration_shaping_gamma (`float`, *optional*, defaults to `0.1`):
            `gamma` of LUFFY's shaping `p / (p + gamma)`. Formerly `offline_shaping_gamma`.
        demonstration_aggregation (`str`, *optional*):
            How demonstration tokens are reduced: `"loss_type"` (together with the rollout tokens, by `loss_type`, so a
            demonstration token weighs what a rollout token with advantage 1 weighs) or `"token_mean"` (a separate mean
            over all demonstration tokens of the batch, added to the RL term). `None`: `"token_mean"` with
            `feedback="sft"` (no RL term: exactly cross-entropy training), `"loss_type"` otherwise, so that neither term
            drowns the other whatever the `loss_type`. Formerly `offline_aggregation`.
        rl_aggregation (`str`, *optional*):
            How the policy (RL) term is reduced. `None`: as `loss_type` says (GRPOTrainer's). `"max_length_sum"`: the
            per-token losses of the micro-batch summed and divided by `max_completion_length` only, with no division
            by the number of rows, as the paper's reference code does (`loss_remove_token_mean`).
        skip_grad_norm_above (`float`, *optional*):
            Skip the optimizer step (no parameter or optimizer-state update) when the gradient norm before clipping
            exceeds this or is not finite, as the paper's reference code does at 80. `None`: never skip.
        solved_advantage (`float`, *optional*, defaults to `0.0`):
            Advantage given to the correct rollouts of a solved prompt (every scored rollout correct, `P = 1`). Such a
            group has advantage 0 under GRPO and gives no gradient, so nothing keeps what the model already solves;
            with `c > 0` its rollouts train as SFT on the model's own correct answers with weight `c` (on-policy the
            gradient of `c` times their log-likelihood; clipped like any rollout when reused). `0`: off, as in the
            paper.
        imitation_guard (`bool`, *optional*, defaults to `False`):
            Scale the demonstration coefficient by whether imitation makes the policy forget its own correct
            answers: a replay of verifier-accepted rollouts is re-scored before every update, and the scale grows by
            `exp(imitation_guard_rate)` while their mean token log-probability holds (within
            `imitation_guard_tolerance`) and shrinks by the same factor when it falls, within
            `[imitation_guard_min, imitation_guard_max]`. `False`: a fixed coefficient, as in the paper.
        imitation_guard_size (`int`, *optional*, defaults to `64`):
            Correct rollouts kept in the guard's replay per process: the first ones, whose drift shows forgetting.
        imitation_guard_rate (`float`, *optional*, defaults to `0.1`):
            Log-step of the guard's scale per generation batch.
        imitation_guard_start, imitation_guard_min, imitation_guard_max (`float`, *optional*):
            The guard's first scale and its bounds, multiples of `demonstration_loss_coef` (defaults `1.0`, `0.05`
            and `4.0`).
        imitation_guard_tolerance (`float`, *optional*, defaults to `0.0`):
            Drop of the replay's mean token log-probability (nats) that still counts as holding.
        style_gate (`bool`, *optional*, defaults to `False`):
            Scale the demonstration coefficient by how foreign the demonstrations' style is to the policy: on solved
            prompts (some rollout correct) the demonstration's mean token log-probability minus that of a correct
            rollout is the *style gap* (the model knows the answer there, so the gap is how it is written), smoothed
            over generation batches with `style_gate_momentum`; the factor is `exp(min(gap, 0) /
            style_gate_temperature)`. `False`: a fixed coefficient, as in the paper.
        style_gate_temperature (`float`, *optional*, defaults to `0.1`):
            Style gap (nats per token) that divides the demonstration coefficient by `e`.
        style_gate_momentum (`float`, *optional*, defaults to `0.9`):
            Weight of the past in the style gate's moving average of the gap: `0` uses each batch's gap alone, `1`
            keeps the first measured gap for the whole run (imitation cannot make its own style look native).
        style_gate_floor (`float`, *optional*, defaults to `0.0`):
            A style gate factor below this closes the gate: no demonstration is placed, and every prompt trains by RL
            on all its rollouts, as `GRPOTrainer` does (a demonstration weighted near zero would still take a rollout's
            slot and, in `"soft"`/LUFFY groups, lift the group's mean reward). `0`: the factor only scales.
        style_gate_start (`float`, *optional*, defaults to `1.0`):
            The style gate's factor until a generation batch has a solved prompt with a demonstration to measure the
            gap on. `1`: imitate at full weight until then; `0`: closed until measured (nothing placed), so a model
            that solves nothing at first is not taught the demonstrations' style before the gate can judge it.
        style_gate_min_prompts (`int`, *optional*, defaults to `1`):
            How many solved prompts with a demonstration the style gate scores before its first measurement counts:
            their gaps are pooled over as many generation batches as that takes, the factor stays
            `style_gate_start` until then, and their mean is the first smoothed gap. `1`: the first batch with a
            solved prompt decides (one prompt's gap can be far from the task's when the model solves little).
        max_demonstration_length (`int`, *optional*):
            Demonstrations longer than this (in tokens) are truncated. `None`: `max_completion_length`.
        hpt_report (`bool`, *optional*, defaults to `True`):
            Write the per-prompt gate history and an SFT-fraction / accuracy report to `output_dir`.
    """

    demonstration_column: str = field(
        default="completion",
        metadata={"help": "Dataset column holding each prompt's demonstration (string or assistant messages)."},
    )
    feedback: str = field(
        default="switch",
        metadata={
            "help": "Feedback strategy mapping a prompt's accuracy P to (alpha, beta), the weights of its RL and SFT "
            "terms. 'switch' (paper default): SFT when P <= switch_gate, else RL. 'soft': alpha = beta = 1 (LUFFY/SRFT "
            "mixing). 'linear': alpha = P, beta = 1 - P. 'rl': pure GRPO. 'sft': pure SFT on demonstrations. A "
            "callable passed to HPTTrainer as feedback_fn overrides this.",
            "choices": list(FEEDBACK_STRATEGIES),
        },
    )
    switch_gate: float = field(
        default=0.0,
        metadata={"help": "For feedback='switch': prompts with accuracy P <= switch_gate get SFT, the others RL."},
    )
    success_threshold: float = field(
        default=1.0,
        metadata={"help": "A rollout counts as correct when its verifier reward is >= this value."},
    )
    verifier_reward_index: int | None = field(
        default=None,
        metadata={
            "help": "Index (in reward_funcs) of the reward function used as verifier for the accuracy P. None: the "
            "weighted total reward."
        },
    )
    demonstration_loss_coef: float = field(
        default=1.0,
        metadata={
            "help": "Coefficient of the demonstration loss term (formerly sft_loss_coef). The paper uses 1.0 (0.3 "
            "at 1.5B)."
        },
    )
    demonstration_loss: str = field(
        default="sft",
        metadata={
            "help": "Estimator preset for demonstration rows: 'sft' (cross-entropy), 'luffy' (p / (p + gamma) "
            "shaping, mixed-group advantage), 'srft' (-A * p, mixed-group advantage), 'chord_phi' (p (1 - p) "
            "weighted cross-entropy), 'dft' (p weighted cross-entropy) or 'sft_sequence_p' (cross-entropy weighted "
            "by the demonstration's geometric-mean token probability).",
            "choices": list(DEMONSTRATION_PRESETS),
        },
    )
    demonstration_shaping_gamma: float = field(
        default=0.1,
        metadata={"help": "gamma of LUFFY's likelihood shaping p / (p + gamma) for demonstration_loss='luffy'."},
    )
    demonstration_aggregation: str | None = field(
        default=None,
        metadata={
            "help": "How demonstration tokens are reduced. 'loss_type': together with the rollout tokens by "
            "loss_type, each demonstration token weighted like a rollout token with advantage 1. 'token_mean': a "
            "separate mean over all demonstration tokens of the batch, added to the RL term (next to TRL's loss types "
            "a demonstration token then weighs tens to hundreds of times a rollout token). None: 'token_mean' with "
            "feedback='sft' (exactly cross-entropy training), 'loss_type' otherwise.",
            "choices": list(AGGREGATIONS),
        },
    )
    rl_aggregation: str | None = field(
        default=None,
        metadata={
            "help": "How the policy (RL) term is reduced. None: as loss_type says (GRPOTrainer's). 'max_length_sum': "
            "the micro-batch's per-token losses summed and divided by max_completion_length only (no division by the "
            "number of rows), as the paper's reference code does (loss_remove_token_mean).",
            "choices": list(RL_AGGREGATIONS),
        },
    )
    skip_grad_norm_above: float | None = field(
        default=None,
        metadata={
            "help": "Skip the optimizer step (no parameter or optimizer-state update) when the gradient norm before "
            "clipping exceeds this or is not finite, as the paper's reference code does at 80. None: never skip."
        },
    )
    solved_advantage: float = field(
        default=0.0,
        metadata={
            "help": "Advantage given to the correct rollouts of a solved prompt (P = 1: every scored rollout correct), "
            "whose group otherwise has advantage 0 and no gradient: c > 0 trains them as SFT on the model's own "
            "correct answers with weight c, so that what the model already solves is kept. 0: off (the paper)."
        },
    )
    imitation_guard: bool = field(
        default=False,
        metadata={
            "help": "Scale the demonstration coefficient by whether imitation makes the policy forget its own correct "
            "answers: a replay of verifier-accepted rollouts is re-scored before every update; the scale grows by "
            "exp(imitation_guard_rate) while their mean token log-probability holds and shrinks when it falls, within "
            "[imitation_guard_min, imitation_guard_max]. False: a fixed coefficient (the paper)."
        },
    )
    imitation_guard_size: int = field(
        default=64,
        metadata={
            "help": "Correct rollouts kept in the imitation guard's replay, per process: the first ones the policy "
            "produces."
        },
    )
    imitation_guard_rate: float = field(
        default=0.1, metadata={"help": "Log-step of the imitation guard's scale per generation batch."}
    )
    imitation_guard_start: float = field(
        default=1.0, metadata={"help": "First scale of demonstration_loss_coef under the imitation guard."}
    )
    imitation_guard_min: float = field(
        default=0.05, metadata={"help": "Lower bound of the imitation guard's scale of demonstration_loss_coef."}
    )
    imitation_guard_max: float = field(
        default=4.0, metadata={"help": "Upper bound of the imitation guard's scale of demonstration_loss_coef."}
    )
    imitation_guard_tolerance: float = field(
        default=0.0,
        metadata={
            "help": "Drop of the replay's mean token log-probability (nats) that the imitation guard still counts as "
            "holding."
        },
    )
    style_gate: bool = field(
        default=False,
        metadata={
            "help": "Scale the demonstration coefficient by how foreign the demonstrations' style is to the policy: "
            "on solved prompts the demonstration's mean token log-probability minus a correct rollout's (the style "
            "gap), smoothed over generation batches, gives the factor exp(min(gap, 0) / style_gate_temperature). "
            "False: a fixed coefficient (the paper)."
        },
    )
    style_gate_temperature: float = field(
        default=0.1,
        metadata={"help": "Style gap (nats per token) that divides the demonstration coefficient by e."},
    )
    style_gate_momentum: float = field(
        default=0.9,
        metadata={
            "help": "Weight of the past in the style gate's moving average of the gap: 0 uses each batch's gap alone, "
            "1 keeps the first measured gap for the whole run."
        },
    )
    style_gate_floor: float = field(
        default=0.0,
        metadata={
            "help": "A style gate factor below this closes the gate: no demonstration is placed and every prompt "
            "trains by RL on all its rollouts, as GRPOTrainer does. 0: the factor only scales."
        },
    )
    style_gate_start: float = field(
        default=1.0,
        metadata={
            "help": "The style gate's factor until a solved prompt with a demonstration has measured the gap. 1: full "
            "weight until then; 0: closed until measured (nothing placed)."
        },
    )
    style_gate_min_prompts: int = field(
        default=1,
        metadata={
            "help": "Solved prompts with a demonstration the style gate scores (pooled over generation batches) before "
            "its first measurement counts; the factor is style_gate_start until then. 1: the first batch with a solved "
            "prompt decides."
        },
    )
    max_demonstration_length: int | None = field(
        default=None,
        metadata={"help": "Truncate demonstrations to this many tokens. None: use max_completion_length."},
    )

    hpt_report: bool = field(
        default=True,
        metadata={
            "help": "Write HPT's gate report to output_dir: hpt_gate_history.jsonl (one record per prompt, appended "
            "each step), and at the end of training hpt_report.json and hpt_report.png (SFT fraction and mean prompt "
            "accuracy per step)."
        },
    )

    sft_loss_coef: float | None = field(
        default=None, metadata={"help": "Deprecated, removed in 0.2: use demonstration_loss_coef."}
    )
    offline_loss: str | None = field(
        default=None, metadata={"help": "Deprecated, removed in 0.2: use demonstration_loss."}
    )
    offline_shaping_gamma: float | None = field(
        default=None, metadata={"help": "Deprecated, removed in 0.2: use demonstration_shaping_gamma."}
    )
    offline_aggregation: str | None = field(
        default=None, metadata={"help": "Deprecated, removed in 0.2: use demonstration_aggregation."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_hpt_fields()

    def _validate_hpt_fields(self):
        for old, new in RENAMED_FIELDS.items():
            value = getattr(self, old, None)
            if value is not None:
                warnings.warn(
                    f"HPTConfig.{old} is deprecated and will be removed in trl-hpt 0.2; use {new}={value!r}.",
                    FutureWarning,
                    stacklevel=3,
                )
                setattr(self, new, value)
                setattr(self, old, None)
        if self.feedback not in FEEDBACK_STRATEGIES:
            raise ValueError(
                f"HPTConfig.feedback={self.feedback!r} is not one of {FEEDBACK_STRATEGIES}; pass a callable as "
                "HPTTrainer(feedback_fn=...) for a custom strategy."
            )
        if self.demonstration_loss not in DEMONSTRATION_PRESETS:
            raise ValueError(
                f"HPTConfig.demonstration_loss={self.demonstration_loss!r} is not one of {DEMONSTRATION_PRESETS}."
            )
        if self.demonstration_aggregation is not None:
            if self.demonstration_aggregation not in AGGREGATIONS:
                raise ValueError(
                    f"HPTConfig.demonstration_aggregation={self.demonstration_aggregation!r} is not one of "
                    f"{AGGREGATIONS} or None."
                )
            try:
                # The estimator owns the rule (a mixed-group advantage must be reduced with the rollouts).
                get_preset(self.demonstration_loss).replace(aggregation=self.demonstration_aggregation)
            except ValueError as error:
                raise ValueError(
                    f"HPTConfig.demonstration_aggregation={self.demonstration_aggregation!r} does not apply to "
                    f"demonstration_loss={self.demonstration_loss!r}: {error} Leave demonstration_aggregation=None."
                ) from None
        if self.rl_aggregation is not None and self.rl_aggregation not in RL_AGGREGATIONS:
            raise ValueError(
                f"HPTConfig.rl_aggregation={self.rl_aggregation!r} is not one of {RL_AGGREGATIONS} or None (None "
                "reduces the RL term as loss_type says)."
            )
        if self.skip_grad_norm_above is not None and not self.skip_grad_norm_above > 0:
            raise ValueError(
                f"HPTConfig.skip_grad_norm_above must be a positive gradient norm or None, got "
                f"{self.skip_grad_norm_above}."
            )
        if not 0.0 <= self.switch_gate < 1.0:
            raise ValueError(
                f"HPTConfig.switch_gate must be in [0, 1) (a prompt accuracy), got {self.switch_gate}. "
                "0 sends a prompt to SFT only when none of its rollouts is correct."
            )
        if not (math.isfinite(self.solved_advantage) and self.solved_advantage >= 0):
            raise ValueError(
                f"HPTConfig.solved_advantage must be a finite number >= 0 (0 turns it off), got {self.solved_advantage}."
            )
        if self.demonstration_loss_coef < 0:
            raise ValueError(f"HPTConfig.demonstration_loss_coef must be >= 0, got {self.demonstration_loss_coef}.")
        if not self.demonstration_shaping_gamma > 0:
            raise ValueError(
                f"HPTConfig.demonstration_shaping_gamma must be > 0, got {self.demonstration_shaping_gamma}."
            )
        if self.verifier_reward_index is not None and self.verifier_reward_index < 0:
            raise ValueError(
                f"HPTConfig.verifier_reward_index must be >= 0 or None, got {self.verifier_reward_index}."
            )
        if self.max_demonstration_length is not None and self.max_demonstration_length < 1:
            raise ValueError(
                f"HPTConfig.max_demonstration_length must be a positive number of tokens or None, got "
                f"{self.max_demonstration_length}."
            )
        if self.imitation_guard_size < 1:
            raise ValueError(f"HPTConfig.imitation_guard_size must be >= 1, got {self.imitation_guard_size}.")
        if not (math.isfinite(self.imitation_guard_rate) and self.imitation_guard_rate > 0):
            raise ValueError(f"HPTConfig.imitation_guard_rate must be > 0, got {self.imitation_guard_rate}.")
        if not 0 < self.imitation_guard_min <= self.imitation_guard_start <= self.imitation_guard_max < math.inf:
            raise ValueError(
                "HPTConfig.imitation_guard_min, imitation_guard_start and imitation_guard_max must satisfy 0 < min <= "
                f"start <= max < inf, got {self.imitation_guard_min}, {self.imitation_guard_start} and "
                f"{self.imitation_guard_max}."
            )
        if self.imitation_guard_tolerance < 0:
            raise ValueError(
                f"HPTConfig.imitation_guard_tolerance must be >= 0, got {self.imitation_guard_tolerance}."
            )
        if self.imitation_guard and self.feedback == "rl":
            raise ValueError(
                "HPTConfig.imitation_guard scales the demonstration term, which feedback='rl' does not have; "
                "set imitation_guard=False or choose another feedback."
            )
        if not (math.isfinite(self.style_gate_temperature) and self.style_gate_temperature > 0):
            raise ValueError(
                f"HPTConfig.style_gate_temperature must be a finite number > 0, got {self.style_gate_temperature}."
            )
        if not 0 <= self.style_gate_momentum <= 1:
            raise ValueError(f"HPTConfig.style_gate_momentum must be in [0, 1], got {self.style_gate_momentum}.")
        if not 0 <= self.style_gate_floor < 1:
            raise ValueError(f"HPTConfig.style_gate_floor must be in [0, 1), got {self.style_gate_floor}.")
        if not 0 <= self.style_gate_start <= 1:
            raise ValueError(f"HPTConfig.style_gate_start must be in [0, 1], got {self.style_gate_start}.")
        if isinstance(self.style_gate_min_prompts, bool) or not (
            isinstance(self.style_gate_min_prompts, int) and self.style_gate_min_prompts >= 1
        ):
            raise ValueError(
                f"HPTConfig.style_gate_min_prompts must be an integer >= 1, got {self.style_gate_min_prompts!r}."
            )
        if self.style_gate and self.feedback == "rl":
            raise ValueError(
                "HPTConfig.style_gate scales the demonstration term, which feedback='rl' does not have; "
                "set style_gate=False or choose another feedback."
            )
        if self.demonstration_column in ("prompt", ""):
            raise ValueError(f"HPTConfig.demonstration_column cannot be {self.demonstration_column!r}.")

    @classmethod
    def for_trainer(cls, args: GRPOConfig | None, model) -> "HPTConfig":
        """
        The config an `HPTTrainer` runs with: an `HPTConfig` as given, a plain `GRPOConfig` with HPT's defaults for
        the added fields, or (`None`) the defaults with an output directory named after the model.
        """
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            return cls(f"{name.split('/')[-1]}-HPT")
        return cls.from_grpo_config(args)

    def check_trainer_setup(
        self, *, num_reward_funcs: int, uses_demonstrations: bool, deepspeed: bool, environments: bool
    ) -> None:
        """The checks of the HPT fields that depend on the trainer: its reward functions, DeepSpeed, environments."""
        if self.verifier_reward_index is not None and self.verifier_reward_index >= num_reward_funcs:
            raise ValueError(
                f"HPTConfig.verifier_reward_index={self.verifier_reward_index} but {num_reward_funcs} reward "
                "function(s) were given; use an index into reward_funcs or None for the weighted total."
            )
        if uses_demonstrations and self.verifier_reward_index is None and num_reward_funcs > 1:
            logger.warning(
                f"{num_reward_funcs} reward functions and HPTConfig.verifier_reward_index=None: a rollout counts as "
                f"correct when the weighted total reward is >= success_threshold={self.success_threshold}, so "
                "auxiliary rewards (format, length) can make a wrong answer count as correct. Set "
                "verifier_reward_index to the index of the correctness reward."
            )
        if self.skip_grad_norm_above is not None and deepspeed:
            raise ValueError(
                "HPTConfig.skip_grad_norm_above is not supported with DeepSpeed, whose engine owns the gradients and "
                "the optimizer step; use FSDP or DDP, or leave it None."
            )
        if environments and get_preset(self.demonstration_loss).mixes_group:
            raise ValueError(
                f"HPTConfig.demonstration_loss={self.demonstration_loss!r} scores each demonstration with the reward "
                "functions, but with environments a reward reads the state of the environment a rollout ran in, "
                "which a demonstration never had. Use demonstration_loss='sft', 'chord_phi', 'dft' or "
                "'sft_sequence_p' with environments."
            )

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig, **hpt_fields) -> "HPTConfig":
        """
        Turns a plain `GRPOConfig` into an `HPTConfig` with HPT's defaults (or `hpt_fields`) for the added fields.

        The GRPOConfig's resolved state is copied as is rather than re-parsed, so that derived values
        (`steps_per_generation`, `generation_batch_size`, the distributed state) are exactly those of the original.
        """
        if isinstance(args, cls) and not hpt_fields:
            return args
        config = cls.__new__(cls)
        config.__dict__.update(args.__dict__)
        for f in fields(cls):
            if f.name not in args.__dict__:
                setattr(config, f.name, f.default)
        for name, value in hpt_fields.items():
            setattr(config, name, value)
        config._validate_hpt_fields()
        return config
