"""[`HPTTrainer`]: Hybrid Post-Training inside TRL's `GRPOTrainer`."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from functools import partial
from typing import Any

import torch
import trl
from accelerate.utils import gather
from packaging.version import Version
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer

from trl_hpt.batch import (
    RowLayout,
    attach_rows,
    forward_inputs,
    hpt_rows,
    loss_mask,
    place_demonstrations,
    rollout_inputs,
    rows_to_keep,
    scatter_scored,
    scoring_rows,
    select_rows,
)
from trl_hpt.callbacks import HPTReportCallback
from trl_hpt.config import HPTConfig
from trl_hpt.demonstrations import (
    DemonstrationStore,
    check_demonstration_column,
    demonstration_completion,
    demonstration_flags,
)
from trl_hpt.estimator import (
    HybridBatch,
    HybridLoss,
    batch_counts,
)
from trl_hpt.feedback import (
    FeedbackFn,
    decide_gate,
    gate_metrics,
    gate_records,
    prompt_accuracy,
    solved_rollouts,
    verifier_rewards,
)
from trl_hpt.grpo_mirror import GRPOLossMirror, grpo_advantages
from trl_hpt.guard import ImitationGuard, StyleGate, completion_batch, guard_state_path, mean_token_logps
from trl_hpt.model_card import complete_model_card, model_card_names
from trl_hpt.models import resolve_model_init


logger = logging.get_logger(__name__)

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
        model, reward_funcs, args, train_dataset, *trainer_args, **kwargs:
            As in [`~trl.GRPOTrainer`], in its order (`eval_dataset`, `processing_class`, `reward_processing_classes`,
            `callbacks`, `optimizers`, `quantization_config`, `peft_config`, `tools`, `rollout_func`,
            `environment_factory`). `args` may be an [`HPTConfig`] or a plain `GRPOConfig` (then HPT's defaults
            apply to the HPT fields).
        feedback_fn (`Callable[[float], tuple[float, float]]`, *optional*):
            Custom feedback strategy (keyword only): maps a prompt's accuracy `P` to `(alpha, beta)`. Overrides
            `args.feedback`.
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
        *trainer_args: Any,
        feedback_fn: FeedbackFn | None = None,
        **kwargs: Any,
    ):
        check_trl_version()
        args = HPTConfig.for_trainer(args, model)
        # A GGUF checkpoint (a .gguf path, or model_init_kwargs["gguf_file"]) becomes an ordinary, cached directory:
        # TRL would load its config and tokenizer without the file, and a GGUF-loaded model neither trains nor saves.
        model, args.model_init_kwargs = resolve_model_init(model, args.model_init_kwargs)
        if feedback_fn is not None and not callable(feedback_fn):
            raise TypeError(f"feedback_fn must be a callable P -> (alpha, beta), got {type(feedback_fn).__name__}.")
        self.feedback_fn = feedback_fn
        strategy = feedback_fn if feedback_fn is not None else args.feedback
        self._uses_demonstrations = strategy != "rl"
        self._hpt_gathered_rewards: torch.Tensor | None = None
        self._scoring_demonstrations = False
        # Both off only to check that they change nothing: skipping zero-weight rows in the loss pass, and handing
        # batches without HPT rows to GRPOTrainer's own loss (which has no rl_aggregation: that needs HPT's pass).
        self._skip_zero_weight_rows = True
        self._delegate_plain_batches = args.rl_aggregation is None
        if self._uses_demonstrations and train_dataset is not None:
            # Checked before the model loads, so a wrong column fails fast.
            check_demonstration_column(train_dataset, args.demonstration_column)
        super().__init__(model, reward_funcs, args, train_dataset, *trainer_args, **kwargs)
        self.hybrid_loss = HybridLoss.from_config(
            args, has_rl_term=strategy != "sft", num_processes=self.accelerator.num_processes
        )
        self.rollout_spec, self.demonstration_spec = self.hybrid_loss.rollout_spec, self.hybrid_loss.demonstration_spec
        self._reduce_sum = partial(self.accelerator.reduce, reduction="sum")
        args.check_trainer_setup(
            num_reward_funcs=len(self.reward_funcs),
            uses_demonstrations=self._uses_demonstrations,
            deepspeed=self.is_deepspeed_enabled,
            environments=self.environment_factories is not None,
        )
        # Per-step gate decisions (step, prompt, P, alpha, beta), kept on the main process for reports.
        self.gate_history: list[dict] = []
        if args.hpt_report and not any(isinstance(c, HPTReportCallback) for c in self.callback_handler.callbacks):
            self.add_callback(HPTReportCallback(self))
        # Tokenised once, with the processing class and chat template generation uses; the rows stay as given.
        self.demonstrations = DemonstrationStore.for_trainer(self) if self._uses_demonstrations else None
        self.imitation_guard = (
            ImitationGuard(
                args.imitation_guard_size,
                args.imitation_guard_rate,
                args.imitation_guard_min,
                args.imitation_guard_max,
                args.imitation_guard_tolerance,
                scale=args.imitation_guard_start,
            )
            if args.imitation_guard  # HPTConfig refuses it with feedback="rl", the one case without demonstrations
            else None
        )
        self.style_gate = (
            StyleGate(
                args.style_gate_temperature,
                args.style_gate_momentum,
                floor=args.style_gate_floor,
                start=args.style_gate_start,
                min_prompts=args.style_gate_min_prompts,
            )
            if args.style_gate
            else None
        )

    @property
    def _imitation_controls(self) -> dict:
        """The controls of the demonstration coefficient that are on, by the name their checkpoint state uses."""
        controls = {"imitation_guard": self.imitation_guard, "style_gate": self.style_gate}
        return {name: control for name, control in controls.items() if control is not None}

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # The imitation controls' state resumes with the checkpoint (Trainer restores no trainer state).
        if self._imitation_controls and resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            for name, control in self._imitation_controls.items():
                path = guard_state_path(checkpoint, self.accelerator.process_index, name) if checkpoint else None
                if path is None or not control.load(path):
                    logger.warning(f"No {name} state in {checkpoint}: the {name.replace('_', ' ')} starts afresh.")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if os.path.isdir(checkpoint):
            for name, control in self._imitation_controls.items():
                control.save(guard_state_path(checkpoint, self.accelerator.process_index, name))

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
        # Looked up before generation: TRL may merge rollout fields into the rows it is handed.
        demos = None
        if mode == "train" and self.demonstrations is not None:
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
        if self.imitation_guard is not None:
            self._guard_step(output, verifier, num_generations)
        if self.style_gate is not None:
            self._style_step(output, demos, verifier, num_generations)
        return self._mix_demonstrations(output, inputs, demos, rewards_per_func, verifier, accuracy, num_generations)

    def _mix_demonstrations(self, output, inputs, demos, rewards_per_func, verifier, accuracy, num_generations):
        """The gate of one generation batch: decide each prompt's weights, place demonstrations, log the decision."""
        layout = RowLayout.of(self.accelerator, len(inputs), num_generations)
        flags = demonstration_flags(demos, len(inputs), self.mask_truncated_completions, accuracy.device)
        has_demo, truncated = layout.per_prompt(gather(flags)).unbind(-1)
        scale = math.prod(control.scale for control in self._imitation_controls.values())
        # A demonstration the controls weigh 0 is not placed at all: its prompt keeps every rollout, as in GRPO.
        usable = has_demo & (scale > 0)
        decision = decide_gate(self.feedback_fn or self.args.feedback, accuracy, usable, self.args.switch_gate)
        placed = layout.last_slots(decision.placed)
        demonstration = layout.local(placed)
        beta = decision.beta * scale
        weights = layout.local(torch.where(placed, layout.per_row(beta), layout.per_row(decision.alpha))).float()

        self._place_demonstrations(output, demonstration, demos)
        if self.demonstration_spec.mixes_group and bool(decision.placed.any()):
            # LUFFY/SRFT: each placed demonstration is scored and joins the advantage statistics in its slot.
            mixed = torch.where(
                placed.unsqueeze(1), self._score_demonstrations(inputs, demos, placed), rewards_per_func
            )
            advantages = grpo_advantages(
                mixed, self.reward_weights, num_generations, self.scale_rewards, self.multi_objective_aggregation
            )
            output["advantages"] = layout.local(advantages).to(output["advantages"].dtype)
        if self.args.solved_advantage > 0:
            # After any mixed-group recomputation, which would overwrite it.
            bonus = layout.local(solved_rollouts(verifier, accuracy, placed, self.args.success_threshold))
            output["advantages"] = output["advantages"] + self.args.solved_advantage * bonus.to(output["advantages"])

        self._record_gate(demos, accuracy, decision, num_generations)
        metrics = gate_metrics(accuracy, decision, has_demo, truncated, accuracy == 1, gather(weights))
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)
        if self._delegate_plain_batches and not self._uses_demonstrations:
            return output  # feedback="rl": GRPOTrainer's batch, trained by GRPOTrainer's loss
        # Global counts after the swap: dapo/cispo/vespo normalise by them, and so does the separate SFT term.
        counts = batch_counts(loss_mask(output), demonstration, self.demonstration_spec, self._reduce_sum)
        output["num_items_in_batch"] = counts.policy_tokens
        return attach_rows(output, demonstration, weights, counts.policy_rows, counts.separate_tokens)

    def _completion_logps(self, pairs, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """
        Per-token log-probabilities under the current policy (no gradient) of `(prompt_ids, completion_ids)` pairs,
        with their completion mask; `None` when no process has a pair. Called on every process: each runs one forward
        over as many rows as the process with the most pairs (repeating rows), so that sharded models stay in step.
        """
        most = int(gather(torch.tensor([len(pairs)], device=device)).max())
        if not most:
            return None
        pad = self._tokenizer.pad_token_id
        # No pair here but some elsewhere: score a stand-in row to keep the forwards equal.
        ids, attention, completion_mask = completion_batch(pairs or [([pad], [pad])], pad, device)
        repeat = -(-most // ids.size(0))
        ids, attention = ids.repeat(repeat, 1)[:most], attention.repeat(repeat, 1)[:most]
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, attention, completion_mask.size(1), self.args.per_device_train_batch_size
            )
        return logps[: len(pairs)], completion_mask[: len(pairs)]

    def _guard_step(self, output, verifier, num_generations):
        """
        The imitation guard before this generation batch's update: re-score the replay, update the scale from the
        drift summed over processes, then add this batch's correct rollouts.
        """
        guard, device = self.imitation_guard, output["completion_ids"].device
        scored = self._completion_logps([(prompt, completion) for prompt, completion, _ in guard.entries], device)
        drift_sum, count = guard.measure(*scored) if scored is not None and guard.entries else (0.0, 0)
        totals = self._reduce_sum(torch.tensor([drift_sum, float(count)], device=device))
        scale = guard.update(float(totals[0]), int(totals[1]))
        for i in self._correct_rows(output, verifier, num_generations):
            if guard.full:  # spares the id lists of rollouts that would not enter
                break
            guard.add(*self._rollout_pair(output, i))
        metrics = self._metrics["train"]
        metrics["hpt/imitation_scale"].append(scale)
        if int(totals[1]):
            metrics["hpt/replay_drift"].append(float(totals[0]) / int(totals[1]))

    def _style_step(self, output, demos, verifier, num_generations):
        """
        The style gate before this generation batch's update: on every solved prompt with a demonstration, the
        demonstration's mean token log-probability minus that of the prompt's first correct rollout; the gate smooths
        their mean over processes.
        """
        device = output["completion_ids"].device
        layout = RowLayout.of(self.accelerator, len(demos), num_generations)
        # Each solved prompt's first correct rollout over every process, scored by the process that holds it.
        correct = (verifier >= self.args.success_threshold).view(-1, num_generations)
        rows = torch.arange(correct.size(0), device=correct.device) * num_generations + correct.int().argmax(1)
        local = rows[correct.any(1)] - layout.process_index * layout.num_local
        local = local[(local >= 0) & (local < layout.num_local)].tolist()
        first = [i for i in local if demos[i].present]
        pairs = [self._rollout_pair(output, i) for i in first]
        pairs = [(prompt, list(demos[i].ids)) for i, (prompt, _) in zip(first, pairs)] + pairs
        scored = self._completion_logps(pairs, device)
        gap_sum = 0.0
        if scored is not None and first:
            mean = mean_token_logps(*scored)
            gap_sum = float((mean[: len(first)] - mean[len(first) :]).sum())
        totals = self._reduce_sum(torch.tensor([gap_sum, float(len(first))], device=device))
        scale = self.style_gate.update(float(totals[0]), int(totals[1]))
        metrics = self._metrics["train"]
        metrics["hpt/style_scale"].append(scale)
        # While the first measurement is pooled the scale is `style_gate_start`, which can equal a measured one.
        metrics["hpt/style_measured"].append(float(self.style_gate.measured))
        if int(totals[1]):
            metrics["hpt/style_gap"].append(float(totals[0]) / int(totals[1]))

    def _correct_rows(self, output, verifier, num_generations) -> list[int]:
        """This process's verifier-accepted rollouts, by row."""
        layout = RowLayout.of(self.accelerator, output["completion_ids"].size(0), num_generations)
        return layout.local(verifier >= self.args.success_threshold).nonzero(as_tuple=True)[0].tolist()

    @staticmethod
    def _rollout_pair(output, i) -> tuple[list[int], list[int]]:
        """Row `i`'s `(prompt_ids, completion_ids)`, padding removed."""
        prompt = output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist()
        return prompt, output["completion_ids"][i][output["completion_mask"][i].bool()].tolist()

    def _record_gate(self, demos, accuracy, decision, num_generations):
        index = [-1] * len(accuracy)
        if demos is not None:
            local_index = torch.tensor([d.index for d in demos], device=accuracy.device)
            index = gather(local_index).view(-1, num_generations)[:, 0].tolist()
        if self.accelerator.is_main_process:
            self.gate_history.extend(gate_records(self.state.global_step, index, accuracy, decision))

    def _place_demonstrations(self, output, demonstration, demos):
        # A sequence-level vLLM ratio is (B, 1) at any width; with 1-token completions it would pass for per-token.
        sequence_ratio = getattr(self, "vllm_importance_sampling_mode", "token").startswith("sequence")
        unit_advantage = not self.demonstration_spec.reads_advantages
        pad = self._tokenizer.pad_token_id
        place_demonstrations(
            output, demonstration, demos, pad, per_sequence_ratio=sequence_ratio, unit_advantage=unit_advantage
        )

    def _score_demonstrations(self, inputs, demos, placed) -> torch.Tensor:
        """
        Rewards per function of every placed demonstration, `(global rows, functions)`, NaN elsewhere.

        Scored through GRPOTrainer's own `_calculate_rewards` (the rollouts' path: same kwargs, reward models,
        async functions, profiling), on this rank's rows with the demonstration as completion.
        """
        layout = RowLayout.of(self.accelerator, len(inputs))
        rows, width = scoring_rows(placed, layout)
        # Every rank scores `width` rows, padding with a repeat: reward models run the same forwards on every rank.
        filler = rows[0] if rows else next((i for i, d in enumerate(demos) if d.present), 0)
        scored = rows + [filler] * (width - len(rows))
        prompts = [inputs[i]["prompt"] for i in scored]
        column = self.args.demonstration_column
        completions = [demonstration_completion(p, inputs[i].get(column)) for p, i in zip(prompts, scored)]
        # Reward functions may log table columns and metrics; those belong to the rollouts' table, not to this call.
        pending = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        self._scoring_demonstrations = True
        try:
            scored_rows = [inputs[i] for i in scored]
            gathered = self._calculate_rewards(scored_rows, prompts, completions, [list(demos[i].ids) for i in scored])
        finally:
            self._scoring_demonstrations = False
            self._pending_extra_logs, self._pending_metrics = pending
        return scatter_scored(gathered, placed, layout, width)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        rows = hpt_rows(inputs)
        if rows is None:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        # Taken over the whole micro-batch, before zero-weight rows are dropped, so dropping them changes nothing.
        denominators = self._denominators(inputs, accumulation, mode == "train")
        if self._skip_zero_weight_rows:
            inputs = select_rows(inputs, rows_to_keep(inputs, rows.weights, aux_loss=self.aux_loss_enabled))
            rows = hpt_rows(inputs)
        mask, trained = loss_mask(inputs), rows.weights > 0
        rl_rows = ~rows.demonstration & trained
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, **forward_inputs(inputs), compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
        )
        advantages, old = rollout_inputs(inputs, per_token_logps)
        # TRL's token-level modifiers act on the rollouts that train: demonstrations have no sampling log-probs, no
        # vLLM importance ratio and no reference log-probs, and zero-weight rollouts must not move a global quantile.
        terms = self._grpo_token_terms(inputs, per_token_logps, old, advantages, entropies, mask, rl_rows)
        rollouts = (advantages, old, *terms.rollout_modifiers(self.beta), *denominators)
        batch = HybridBatch(per_token_logps, mask, rows.demonstration, rows.weights, *rollouts)
        loss, loss_metrics = self.hybrid_loss(batch)
        active = mask * trained.unsqueeze(1)
        effective = active if terms.entropy_mask is None else active * terms.entropy_mask
        loss = self._grpo_regularize(loss, entropies, effective, aux_loss, accumulation, mode)
        self._log_grpo_loss_metrics(mode, mask, active, rl_rows, entropies, loss_metrics, terms)
        if mode == "train":
            term_metrics = self.hybrid_loss.term_metrics(batch, loss_metrics, accumulation, self._reduce_sum)
            for name, value in term_metrics.items():
                self._metrics[mode][name].append(value)
        return loss

    def _denominators(self, inputs, accumulation, training) -> tuple[float, float]:
        """What the policy term and the separate demonstration term of this micro-batch divide by."""
        num_items = inputs.get("num_items_in_batch")
        return self.hybrid_loss.denominators(loss_mask(inputs), hpt_rows(inputs), num_items, accumulation, training)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        threshold = self.args.skip_grad_norm_above
        if threshold is not None and self.model.training:
            skip = not math.isfinite(float(grad_norm)) or float(grad_norm) > threshold
            if skip:
                # The optimizer passes over parameters without a gradient: no update, no optimizer-state change.
                for param in model.parameters():
                    param.grad = None
            self._metrics["train"]["hpt/skipped_step"].append(float(skip))
        return grad_norm
