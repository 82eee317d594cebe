"""[`HPTTrainer`]: Hybrid Post-Training inside TRL's `GRPOTrainer`."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, NamedTuple

import torch
import trl
from accelerate.utils import gather
from packaging.version import Version
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import get_config_model_id

from trl_hpt.batch import (
    FORWARD_KEYS,
    attach_rows,
    hpt_rows,
    loss_mask,
    place_demonstrations,
    rows_to_keep,
    select_rows,
)
from trl_hpt.callbacks import HPTReportCallback
from trl_hpt.config import HPTConfig
from trl_hpt.demonstrations import (
    DemonstrationStore,
    check_demonstration_column,
    demonstration_messages,
    demonstration_text,
)
from trl_hpt.estimator import (
    HybridBatch,
    batch_counts,
    demonstration_spec_from_hpt_config,
    hybrid_loss,
    micro_batch_denominators,
    rollout_spec_from_grpo_config,
)
from trl_hpt.feedback import (
    FeedbackFn,
    correct_rollouts,
    decide_gate,
    gate_metrics,
    gate_records,
    prompt_accuracy,
    verifier_rewards,
)
from trl_hpt.grpo_mirror import GRPOLossMirror, grpo_advantages
from trl_hpt.model_card import complete_model_card, model_card_names
from trl_hpt.models import resolve_model_init


logger = logging.getLogger(__name__)

# HPTTrainer overrides GRPOTrainer internals (listed in its docstring); it is tested against this TRL range.
SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))


def check_trl_version(version: str | None = None) -> None:
    """Raises when the installed TRL is outside the range HPTTrainer is tested with."""
    installed = Version(version or trl.__version__)
    low, high = SUPPORTED_TRL
    if not (low <= Version(installed.base_version) < high):
        raise ImportError(
            f"trl-hpt's HPTTrainer supports trl>={low},<{high} (it overrides GRPOTrainer internals), but trl "
            f"{installed} is installed. Install a supported version: pip install 'trl>={low},<{high}'."
        )


class HPTTrainer(GRPOLossMirror, GRPOTrainer):
    r"""
    Trainer for Hybrid Post-Training (HPT).

    HPT ([Lv et al., 2025](https://huggingface.co/papers/2509.04419), "Towards a Unified View of Large Language Model
    Post-Training") writes SFT and RL as instances of one Unified Policy Gradient Estimator and mixes them prompt by
    prompt: after `GRPOTrainer` generates and scores `num_generations` rollouts of a prompt, the share `P` that the
    verifier accepts selects, through a feedback strategy, an RL weight `alpha` for the rollouts and an SFT weight
    `beta` for the prompt's demonstration. With the default `switch` strategy a prompt that no rollout solves is
    learnt by imitation and a prompt that some rollout solves is learnt by exploration.

    The demonstration takes the last rollout slot of its group, and a single loss pass evaluates rollout rows with
    the online estimator of the config's `loss_type` and demonstration rows with `demonstration_loss`
    ([`~trl_hpt.estimator.hybrid_loss`]). Rows of weight zero are not run through the model. With `feedback="rl"`
    the batch is GRPOTrainer's own and its loss is `GRPOTrainer._compute_loss`.

    Everything else is `GRPOTrainer`'s: generation (transformers or vLLM), reward functions (demonstrations of
    `luffy`/`srft` are scored through the same `_calculate_rewards`), PEFT, callbacks, Accelerate. The training rows
    are left as given; tokenised demonstrations live beside them in `self.demonstrations`. The overridden internals:

    - `_generate_and_score_completions`: computes `P` from gathered rewards, the weights, and swaps demonstrations in;
    - `_calculate_rewards`: keeps the gathered rewards (read-only) for the gate;
    - `_compute_loss`: the hybrid loss over the weighted rows (GRPOTrainer's own when no HPT row is in the batch).

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes, callbacks, optimizers, peft_config, **kwargs:
            As in [`~trl.GRPOTrainer`]. `args` may be an [`HPTConfig`] or a plain `GRPOConfig` (then HPT's
            defaults apply to the HPT fields).
        feedback_fn (`Callable[[float], tuple[float, float]]`, *optional*):
            Custom feedback strategy: maps a prompt's accuracy `P` to `(alpha, beta)`. Overrides `args.feedback`.
    """

    _tag_names = ["trl", "hpt"]
    _name = "HPT"
    _paper = {
        "title": "Towards a Unified View of Large Language Model Post-Training",
        "id": "2509.04419",
        # docstyle-ignore
        "citation": """\
@article{lv2025unified,
    title        = {{Towards a Unified View of Large Language Model Post-Training}},
    author       = {Xingtai Lv and Yuxin Zuo and Youbang Sun and Hongyi Liu and Yuntian Wei and Zhekai Chen and Lixuan He and Xuekai Zhu and Kaiyan Zhang and Bingning Wang and Ning Ding and Bowen Zhou},
    year         = 2025,
    journal      = {arXiv preprint arXiv:2509.04419}
}""",
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: HPTConfig | GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        feedback_fn: FeedbackFn | None = None,
        **kwargs: Any,
    ):
        check_trl_version()
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = HPTConfig(f"{model_name.split('/')[-1]}-HPT")
        elif not isinstance(args, HPTConfig):
            args = HPTConfig.from_grpo_config(args)
        # A GGUF checkpoint (a .gguf path, or model_init_kwargs["gguf_file"]) becomes an ordinary, cached directory:
        # TRL would load its config and tokenizer without the file, and a GGUF-loaded model neither trains nor saves.
        model, args.model_init_kwargs = resolve_model_init(model, args.model_init_kwargs)
        if feedback_fn is not None and not callable(feedback_fn):
            raise TypeError(f"feedback_fn must be a callable P -> (alpha, beta), got {type(feedback_fn).__name__}.")
        self.feedback_fn = feedback_fn
        self.rollout_spec = rollout_spec_from_grpo_config(args)
        self.demonstration_spec = demonstration_spec_from_hpt_config(
            args, has_rl_term=feedback_fn is not None or args.feedback != "sft"
        )
        self._uses_demonstrations = feedback_fn is not None or args.feedback != "rl"
        # The policy term's reduction: TRL's loss_type, unless HPTConfig.rl_aggregation replaces it.
        self.policy_aggregation = args.rl_aggregation or args.loss_type
        self._hpt_gathered_rewards: torch.Tensor | None = None
        self._scoring_demonstrations = False
        # Both off only to check that they change nothing: skipping zero-weight rows in the loss pass, and handing
        # batches without HPT rows to GRPOTrainer's own loss.
        self._skip_zero_weight_rows = True
        self._delegate_plain_batches = True

        if self._uses_demonstrations and train_dataset is not None:
            # Checked before the model loads, so a wrong column fails fast.
            check_demonstration_column(train_dataset, args.demonstration_column)
        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        if args.verifier_reward_index is not None and args.verifier_reward_index >= len(self.reward_funcs):
            raise ValueError(
                f"HPTConfig.verifier_reward_index={args.verifier_reward_index} but {len(self.reward_funcs)} reward "
                "function(s) were given; use an index into reward_funcs or None for the weighted total."
            )
        if self._uses_demonstrations and args.verifier_reward_index is None and len(self.reward_funcs) > 1:
            logger.warning(
                f"{len(self.reward_funcs)} reward functions and HPTConfig.verifier_reward_index=None: a rollout counts "
                f"as correct when the weighted total reward is >= success_threshold={args.success_threshold}, so "
                "auxiliary rewards (format, length) can make a wrong answer count as correct. Set "
                "verifier_reward_index to the index of the correctness reward."
            )
        if args.skip_grad_norm_above is not None and self.is_deepspeed_enabled:
            raise ValueError(
                "HPTConfig.skip_grad_norm_above is not supported with DeepSpeed, whose engine owns the gradients and "
                "the optimizer step; use FSDP or DDP, or leave it None."
            )
        if self.demonstration_spec.mixes_group and self.environment_factories is not None:
            raise ValueError(
                f"HPTConfig.demonstration_loss={args.demonstration_loss!r} scores each demonstration with the reward "
                "functions, but with environments a reward reads the state of the environment a rollout ran in, "
                "which a demonstration never had. Use demonstration_loss='sft' or 'chord_phi' with environments."
            )
        # Per-step gate decisions (step, prompt, P, alpha, beta), kept on the main process for reports.
        self.gate_history: list[dict] = []
        if args.hpt_report and not any(isinstance(c, HPTReportCallback) for c in self.callback_handler.callbacks):
            self.add_callback(HPTReportCallback(self))
        self.demonstrations: DemonstrationStore | None = None
        if self._uses_demonstrations:
            # Tokenised once, with the processing class and chat template generation uses; the rows stay as given.
            self.demonstrations = DemonstrationStore(
                self.processing_class,
                column=args.demonstration_column,
                max_length=args.max_demonstration_length or args.max_completion_length,
                chat_template=self.chat_template,
                chat_template_kwargs=self.chat_template_kwargs,
                tools=self.tools,
                eos_token_ids=list(self.eos_token_ids),
            )
            if self.train_dataset is not None:
                self.demonstrations.add_dataset(self.train_dataset, num_proc=getattr(args, "dataset_num_proc", None))
                if self.demonstrations.num_present == 0:
                    raise ValueError(
                        f"Every demonstration in column {args.demonstration_column!r} is missing or empty, so "
                        f"feedback={args.feedback!r} could never send a prompt to SFT and this run would be plain "
                        "GRPO. Fill the column, point HPTConfig.demonstration_column at the right one, or use "
                        "HPTConfig(feedback='rl') for GRPO."
                    )

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        # TRL names the card after the Hub id only: a model trained from a local directory would read "None".
        names = model_card_names(self, model_name)
        super().create_model_card(model_name=names["model_name"], dataset_name=dataset_name, tags=tags)
        complete_model_card(self, names)

    # ------------------------------------------------------------------------------------------------------------
    # Generation: the gate
    # ------------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self._scoring_demonstrations:
            self._hpt_gathered_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        demos = None
        if mode == "train" and self.demonstrations is not None:
            # Looked up before generation: TRL may merge rollout fields into the rows it is handed.
            demos = [self.demonstrations.lookup(x) for x in inputs]
        self._hpt_gathered_rewards = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._hpt_gathered_rewards
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        verifier = verifier_rewards(rewards_per_func, self.reward_weights, self.args.verifier_reward_index)
        accuracy = prompt_accuracy(verifier, num_generations, self.args.success_threshold)
        self._metrics[mode]["hpt/prompt_accuracy"].append(accuracy.nanmean().nan_to_num(0.0).item())
        if mode == "eval":
            return output
        return self._mix_demonstrations(output, inputs, demos, rewards_per_func, verifier, accuracy, num_generations)

    def _mix_demonstrations(self, output, inputs, demos, rewards_per_func, verifier, accuracy, num_generations):
        """The gate of one generation batch: decide each prompt's weights, place demonstrations, log the decision."""
        num_local, num_processes = len(inputs), self.accelerator.num_processes
        local = slice(self.accelerator.process_index * num_local, (self.accelerator.process_index + 1) * num_local)
        row = torch.arange(num_local * num_processes, device=self.accelerator.device)
        group_of_row, is_last_slot = row // num_generations, row % num_generations == num_generations - 1

        # Decide
        has_demo, truncated = self._demonstration_flags(demos, accuracy, num_generations)
        strategy = self.feedback_fn if self.feedback_fn is not None else self.args.feedback
        decision = decide_gate(strategy, accuracy, has_demo, self.args.switch_gate)
        demonstration_global = is_last_slot & decision.placed[group_of_row]
        demonstration = demonstration_global[local]
        weights = torch.where(
            demonstration, decision.beta[group_of_row[local]], decision.alpha[group_of_row[local]]
        ).float()

        # Place
        self._place_demonstrations(output, demonstration, demos)
        if self.demonstration_spec.mixes_group and bool(decision.placed.any()):
            self._mixed_group_advantages(
                output, inputs, demos, demonstration_global, rewards_per_func, num_generations
            )
        solved = accuracy == 1  # NaN (unknown) is not solved
        if self.args.solved_advantage > 0 and bool(solved.any()):
            # After any mixed-group recomputation, which would overwrite it. A rollout (never a demonstration) counts.
            correct = correct_rollouts(verifier, self.args.success_threshold)
            bonus = (solved[group_of_row] & correct & ~demonstration_global)[local]
            output["advantages"] = output["advantages"] + self.args.solved_advantage * bonus.to(output["advantages"])

        # Log
        self._record_gate(demos, accuracy, decision, num_generations)
        for name, value in gate_metrics(accuracy, decision, has_demo, truncated, solved, gather(weights)).items():
            self._metrics["train"][name].append(value)

        if self._delegate_plain_batches and not self._uses_demonstrations and self.args.rl_aggregation is None:
            return output  # feedback="rl": GRPOTrainer's batch, trained by GRPOTrainer's loss
        # Global counts after the swap: dapo/cispo/vespo normalise by them, and so does the separate SFT term.
        counts = batch_counts(
            loss_mask(output),
            demonstration,
            self.demonstration_spec,
            lambda t: self.accelerator.reduce(t, reduction="sum"),
        )
        output["num_items_in_batch"] = counts.policy_tokens
        return attach_rows(output, demonstration, weights, counts.policy_rows, counts.separate_tokens)

    def _demonstration_flags(self, demos, accuracy, num_generations) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt of the whole batch: whether it has a usable demonstration, and whether that was truncated."""
        if demos is None:
            none = torch.zeros_like(accuracy, dtype=torch.bool)
            return none, none
        # A truncated demonstration is dropped like a truncated rollout when the config masks those.
        drop_truncated = self.mask_truncated_completions
        usable = [d.present and not (drop_truncated and d.truncated) for d in demos]
        flags = torch.tensor([[u, d.truncated] for u, d in zip(usable, demos)], device=accuracy.device)
        flags = gather(flags).view(-1, num_generations, 2)[:, -1]
        return flags[:, 0], flags[:, 1]

    def _record_gate(self, demos, accuracy, decision, num_generations):
        if demos is None:
            index = [-1] * len(accuracy)
        else:
            local_index = torch.tensor([d.index for d in demos], device=accuracy.device)
            index = gather(local_index).view(-1, num_generations)[:, 0].tolist()
        if self.accelerator.is_main_process:
            self.gate_history.extend(gate_records(self.state.global_step, index, accuracy, decision))

    def _place_demonstrations(self, output, demonstration, demos):
        place_demonstrations(
            output,
            demonstration,
            demos,
            self._tokenizer.pad_token_id,
            # A sequence-level vLLM ratio is (B, 1) at any width; with 1-token completions it would pass for per-token.
            per_sequence_ratio=getattr(self, "vllm_importance_sampling_mode", "token").startswith("sequence"),
            unit_advantage=not self.demonstration_spec.reads_advantages,
        )

    def _mixed_group_advantages(self, output, inputs, demos, demonstration_global, rewards_per_func, num_generations):
        """LUFFY/SRFT: each placed demonstration is scored and joins the advantage statistics in its rollout's place."""
        demo_rewards = self._score_demonstrations(inputs, demos, demonstration_global)
        mixed = torch.where(demonstration_global.unsqueeze(1), demo_rewards, rewards_per_func)
        # As GRPOTrainer computes advantages (scale_rewards, multi_objective_aggregation), with the demonstrations
        # in the statistics; groups without one are unchanged where the statistics are per group.
        advantages = grpo_advantages(
            mixed, self.reward_weights, num_generations, self.scale_rewards, self.multi_objective_aggregation
        )
        num_local = len(inputs)
        start = self.accelerator.process_index * num_local
        output["advantages"] = advantages[start : start + num_local].to(output["advantages"].dtype)

    def _score_demonstrations(self, inputs, demos, demonstration_global) -> torch.Tensor:
        """
        Rewards per function of every placed demonstration, `(global rows, functions)`, NaN elsewhere.

        Scored through GRPOTrainer's own `_calculate_rewards` (the rollouts' path: same kwargs, reward models,
        async functions, profiling), on this rank's rows with the demonstration as completion. Every rank scores the
        same number of rows, padding with a repeat, so reward models run the same forwards on every rank.
        """
        num_local, num_processes = len(inputs), self.accelerator.num_processes
        per_rank = demonstration_global.view(num_processes, num_local)
        width = int(per_rank.sum(1).max())
        rows = per_rank[self.accelerator.process_index].nonzero(as_tuple=True)[0].tolist()
        filler = rows[0] if rows else next((i for i, d in enumerate(demos) if d.present), 0)
        scored = rows + [filler] * (width - len(rows))
        column = self.args.demonstration_column
        prompts, completions = [], []
        for i in scored:
            prompt = inputs[i]["prompt"]
            prompts.append(prompt)
            # Decided on the prompt alone, as for rollouts: completions of conversational prompts are messages.
            if is_conversational({"prompt": prompt}):
                completions.append(demonstration_messages(inputs[i].get(column)) or [])
            else:
                completions.append(demonstration_text(inputs[i].get(column)) or "")
        completion_ids = [list(demos[i].ids) for i in scored]
        # Reward functions may log table columns and metrics; those belong to the rollouts' table, not to this call.
        pending = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        self._scoring_demonstrations = True
        try:
            gathered = self._calculate_rewards([inputs[i] for i in scored], prompts, completions, completion_ids)
        finally:
            self._scoring_demonstrations = False
            self._pending_extra_logs, self._pending_metrics = pending
        result = torch.full((demonstration_global.numel(), gathered.size(1)), float("nan"), device=gathered.device)
        for rank in range(num_processes):
            owned = per_rank[rank].nonzero(as_tuple=True)[0]
            if owned.numel():
                result[rank * num_local + owned] = gathered[rank * width : rank * width + owned.numel()]
        return result

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        rows = hpt_rows(inputs)
        if rows is None:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        training = mode == "train"
        accumulation = self.current_gradient_accumulation_steps if training else 1
        # Taken over the whole micro-batch, before zero-weight rows are dropped, so dropping them changes nothing.
        policy_denominator, token_mean_denominator = self._denominators(inputs, accumulation, training)
        if self._skip_zero_weight_rows:
            inputs = select_rows(inputs, rows_to_keep(inputs, rows.weights, aux_loss=self.aux_loss_enabled))
            rows = hpt_rows(inputs)

        mask = loss_mask(inputs)
        trained = rows.weights > 0
        rl_rows = ~rows.demonstration & trained
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            inputs["completion_ids"].size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in FORWARD_KEYS},
        )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        # TRL's token-level modifiers act on the rollouts that train: demonstrations have no sampling log-probs, no
        # vLLM importance ratio and no reference log-probs, and zero-weight rollouts must not move a global quantile.
        terms = self._grpo_token_terms(
            inputs, per_token_logps, old_per_token_logps, advantages, entropies, mask, rl_rows
        )
        batch = HybridBatch(
            per_token_logps,
            mask,
            rows.demonstration,
            rows.weights,
            advantages,
            old_per_token_logps,
            ratio=terms.ratio,
            rollout_token_scale=terms.scale,
            rollout_token_bias=None if terms.per_token_kl is None else self.beta * terms.per_token_kl,
            policy_denominator=policy_denominator,
            token_mean_denominator=token_mean_denominator,
        )
        loss, loss_metrics = hybrid_loss(
            batch,
            rollout_spec=self.rollout_spec,
            demonstration_spec=self.demonstration_spec,
            loss_type=self.policy_aggregation,
            demonstration_coef=self.args.demonstration_loss_coef,
        )
        active = mask * trained.unsqueeze(1)
        effective = active if terms.entropy_mask is None else active * terms.entropy_mask
        loss = self._grpo_regularize(loss, entropies, effective, aux_loss, accumulation, mode)
        step = _LossStep(
            per_token_logps=per_token_logps.detach(),
            mask=mask,
            active=active,
            rl_rows=rl_rows,
            demonstration=rows.demonstration,
            entropies=entropies,
            clip={k: v for k, v in loss_metrics.items() if k.startswith("clip/")},
            per_token_kl=None if terms.per_token_kl is None else terms.per_token_kl.detach(),
            phi=terms.phi,
        )
        self._log_loss_metrics(mode, loss_metrics, step, accumulation, training)
        return loss

    def _denominators(self, inputs, accumulation, training) -> tuple[float, float]:
        """What the policy term and the separate demonstration term of this micro-batch divide by."""
        rows = hpt_rows(inputs)
        # bnpo divides by this micro-batch's own tokens.
        local = batch_counts(loss_mask(inputs), rows.demonstration, self.demonstration_spec)
        return micro_batch_denominators(
            self.policy_aggregation,
            policy_rows=float(rows.policy_rows),
            separate_tokens=float(rows.separate_tokens),
            local_policy_tokens=float(local.policy_tokens),
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=accumulation,
            steps_per_generation=self.args.steps_per_generation,
            training=training,
        )

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        threshold = self.args.skip_grad_norm_above
        if threshold is not None and self.model.training:
            norm = float(grad_norm)
            skip = not math.isfinite(norm) or norm > threshold
            if skip:
                # The optimizer passes over parameters without a gradient: no update, no optimizer-state change.
                for param in model.parameters():
                    param.grad = None
            self._metrics["train"]["hpt/skipped_step"].append(float(skip))
        return grad_norm

    def _log_loss_metrics(self, mode, loss_metrics, step: _LossStep, accumulation, training):
        """GRPOTrainer's loss metrics over the rollouts that train (all of them without demonstrations), and HPT's."""
        self._log_grpo_loss_metrics(mode, step)
        reduce = self.accelerator.reduce
        metrics = self._metrics[mode]
        if not training:
            return
        # Loss terms as they read per optimizer step (without gradient-accumulation scaling), averaged over ranks.
        # Each micro-batch's term is scaled by 1/accumulation (all loss types, since dapo's spread of the token count
        # over steps_per_generation micro-batches cancels over a step); their mean over the window reads per step.
        terms = [loss_metrics["policy_loss"] * accumulation, loss_metrics["token_mean_loss"] * accumulation]
        terms = torch.stack(terms).float()
        # Each rank's terms are its share of the global loss (global denominators spread over processes) and DDP
        # averages the ranks, those without such rows included: the trained loss is the sum over ranks / processes.
        totals = reduce(terms, "sum") / self.accelerator.num_processes
        metrics["hpt/rl_loss"].append(totals[0].item())
        if self.demonstration_spec.separate_term:
            metrics["hpt/demonstration_loss"].append(totals[1].item())
        else:
            demonstration_mask = step.mask * step.demonstration.unsqueeze(1)
            metrics["hpt/demonstration_loss"].append(
                self._global_mean(-step.per_token_logps, demonstration_mask, step.demonstration)
            )


class _LossStep(NamedTuple):
    """The tensors of one loss pass that the metrics read."""

    per_token_logps: torch.Tensor
    mask: torch.Tensor
    active: torch.Tensor
    rl_rows: torch.Tensor
    demonstration: torch.Tensor
    entropies: torch.Tensor
    clip: dict[str, torch.Tensor]  # the estimator's clip/<name> masks
    per_token_kl: torch.Tensor | None
    phi: torch.Tensor | None
