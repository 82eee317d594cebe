"""[`HPTTrainer`]: Hybrid Post-Training inside TRL's `GRPOTrainer`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from typing import Any, NamedTuple

import torch
import trl
from accelerate.utils import gather
from packaging.version import Version
from torch import nn
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import get_config_model_id, nanmax, nanmin

from trl_hpt.callbacks import HPTReportCallback
from trl_hpt.config import HPTConfig
from trl_hpt.data import (
    DEMO_IDS,
    DEMO_TRUNCATED,
    HAS_DEMO,
    HPT_COLUMNS,
    ROW_INDEX,
    add_row_index,
    check_demonstration_column,
    prepare_demonstrations,
)
from trl_hpt.estimator import (
    get_preset,
    hybrid_loss,
    importance_ratio,
    loss_type_denominator,
    mixed_group_advantages,
    online_spec_from_grpo_config,
)
from trl_hpt.feedback import FeedbackFn, feedback_weights, prompt_accuracy, verifier_rewards


logger = logging.getLogger(__name__)

# HPTTrainer overrides GRPOTrainer internals (listed in its docstring); it is tested against this TRL range.
SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))

# Keys of the generation batch that hold one row per rollout and must follow a demonstration swap.
_PER_TOKEN_FILL = {
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
    "tool_mask": 1,
}
# Multimodal inputs are not row-sliceable in one simple way; with them, the loss pass keeps every row.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "image_sizes")
_OFFLINE, _WEIGHT, _TOKEN_MEAN_TOKENS = "hpt_offline", "hpt_weight", "hpt_token_mean_tokens"
_POLICY_ROWS = "hpt_policy_rows"


def check_trl_version(version: str | None = None) -> None:
    """Raises when the installed TRL is outside the range HPTTrainer is tested with."""
    installed = Version(version or trl.__version__)
    low, high = SUPPORTED_TRL
    if not (low <= Version(installed.base_version) < high):
        raise ImportError(
            f"trl-hpt's HPTTrainer supports trl>={low},<{high} (it overrides GRPOTrainer internals), but trl "
            f"{installed} is installed. Install a supported version: pip install 'trl>={low},<{high}'."
        )


class HPTTrainer(GRPOTrainer):
    r"""
    Trainer for Hybrid Post-Training (HPT).

    HPT ([Lv et al., 2025](https://huggingface.co/papers/2509.04419), "Towards a Unified View of Large Language Model
    Post-Training") writes SFT and RL as instances of one Unified Policy Gradient Estimator and mixes them prompt by
    prompt: after `GRPOTrainer` generates and scores `num_generations` rollouts of a prompt, the share `P` that the
    verifier accepts selects, through a feedback strategy, an RL weight `alpha` for the rollouts and an SFT weight
    `beta` for the prompt's demonstration. With the default `switch` strategy a prompt that no rollout solves is
    learnt by imitation and a prompt that some rollout solves is learnt by exploration.

    The demonstration takes the last rollout slot of its group, and a single loss pass evaluates rollout rows with
    the online estimator of the config's `loss_type` and demonstration rows with `offline_loss`
    ([`~trl_hpt.estimator.hybrid_loss`]). Rows of weight zero are not run through the model.

    Everything else is `GRPOTrainer`'s: generation (transformers or vLLM), reward functions, PEFT, callbacks,
    Accelerate. The overridden internals are:

    - `_generate_and_score_completions`: computes `P` from gathered rewards, the weights, and swaps demonstrations in;
    - `_calculate_rewards`: keeps the gathered rewards (read-only) for the gate;
    - `_compute_loss`: the hybrid loss over the weighted rows;
    - `_set_signature_columns_if_needed`: keeps the prepared demonstration columns.

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
        if feedback_fn is not None and not callable(feedback_fn):
            raise TypeError(f"feedback_fn must be a callable P -> (alpha, beta), got {type(feedback_fn).__name__}.")
        self.feedback_fn = feedback_fn
        self.online_spec = online_spec_from_grpo_config(args)
        offline = get_preset(args.offline_loss)
        if offline.shaping_gamma is not None:
            offline = offline.replace(shaping_gamma=args.offline_shaping_gamma)
        if args.offline_aggregation is not None:
            offline = offline.replace(aggregation=args.offline_aggregation)
        self.offline_spec = offline
        self._uses_demonstrations = feedback_fn is not None or args.feedback != "rl"
        self._hpt_gathered_rewards: torch.Tensor | None = None
        # Zero-weight rows contribute nothing; off only to check that skipping them changes nothing.
        self._skip_zero_weight_rows = True

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
        # Per-step gate decisions (step, prompt, P, alpha, beta), kept on the main process for reports.
        self.gate_history: list[dict] = []
        if args.hpt_report and not any(isinstance(c, HPTReportCallback) for c in self.callback_handler.callbacks):
            self.add_callback(HPTReportCallback(self))
        if self.train_dataset is not None:
            self.train_dataset = add_row_index(self.train_dataset)
        if self._uses_demonstrations and self.train_dataset is not None:
            # Tokenised once, with the processing class and chat template generation uses.
            self.train_dataset = prepare_demonstrations(
                self.train_dataset,
                self.processing_class,
                column=args.demonstration_column,
                max_length=args.max_demonstration_length or args.max_completion_length,
                chat_template=self.chat_template,
                chat_template_kwargs=self.chat_template_kwargs,
                tools=self.tools,
                num_proc=getattr(args, "dataset_num_proc", None),
            )

    # ------------------------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *HPT_COLUMNS]))

    # ------------------------------------------------------------------------------------------------------------
    # Generation: the gate
    # ------------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._hpt_gathered_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        hpt_fields = [{k: x.get(k) for k in HPT_COLUMNS} for x in inputs]
        inputs = [{k: v for k, v in x.items() if k not in HPT_COLUMNS} for x in inputs]
        self._hpt_gathered_rewards = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._hpt_gathered_rewards
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        verifier = verifier_rewards(rewards_per_func, self.reward_weights, self.args.verifier_reward_index)
        accuracy = prompt_accuracy(verifier, num_generations, self.args.success_threshold)
        self._metrics[mode]["hpt/prompt_accuracy"].append(accuracy.mean().item())
        if mode == "eval":
            return output
        return self._mix_demonstrations(output, inputs, hpt_fields, rewards_per_func, accuracy, num_generations)

    def _mix_demonstrations(self, output, inputs, hpt_fields, rewards_per_func, accuracy, num_generations):
        device = self.accelerator.device
        num_local = len(inputs)
        local_start = self.accelerator.process_index * num_local
        global_index = torch.arange(local_start, local_start + num_local, device=device)
        is_last_slot = global_index % num_generations == num_generations - 1
        group_of_row = global_index // num_generations

        if self._uses_demonstrations:
            local_has_demo = torch.tensor([bool(f[HAS_DEMO]) for f in hpt_fields], device=device)
            local_truncated = torch.tensor([bool(f[DEMO_TRUNCATED]) for f in hpt_fields], device=device)
            has_demo = gather(local_has_demo).view(-1, num_generations)[:, -1]
            truncated = gather(local_truncated).view(-1, num_generations)[:, -1]
        else:
            has_demo = torch.zeros_like(accuracy, dtype=torch.bool)
            truncated = has_demo

        strategy = self.feedback_fn if self.feedback_fn is not None else self.args.feedback
        alpha, beta = feedback_weights(strategy, accuracy, self.args.switch_gate)
        # A prompt without a demonstration can only be learnt by RL: it trains exactly as under GRPO.
        alpha = torch.where(has_demo, alpha, torch.ones_like(alpha))
        beta = torch.where(has_demo, beta, torch.zeros_like(beta))
        placed = beta > 0

        offline = is_last_slot & placed[group_of_row]
        weights = torch.where(offline, beta[group_of_row], alpha[group_of_row]).float()

        if bool(offline.any()):
            self._swap_in_demonstrations(output, offline, hpt_fields)
        if self.offline_spec.advantage == "group_mixed":
            self._mixed_group_advantages(
                output, inputs, hpt_fields, offline, rewards_per_func, placed, num_generations
            )

        # Global token counts after the swap: dapo/cispo normalise by them, and so does the separate SFT term.
        mask = (
            output["completion_mask"] if "tool_mask" not in output else output["completion_mask"] * output["tool_mask"]
        )
        tokens = mask.sum(-1).float()
        token_mean_rows = offline if self.offline_spec.aggregation == "token_mean" else torch.zeros_like(offline)
        local_counts = torch.stack(
            [tokens[~token_mean_rows].sum(), tokens[token_mean_rows].sum(), (~token_mean_rows).sum().float()]
        )
        global_counts = self.accelerator.reduce(local_counts, reduction="sum")
        output["num_items_in_batch"] = global_counts[0]
        output[_TOKEN_MEAN_TOKENS] = global_counts[1]
        output[_POLICY_ROWS] = global_counts[2]
        output[_OFFLINE] = offline
        output[_WEIGHT] = weights

        global_weights = gather(weights)
        num_groups = accuracy.numel()
        self._record_gate(hpt_fields, accuracy, alpha, beta, placed, num_generations)
        metrics = self._metrics["train"]
        metrics["hpt/sft_fraction"].append(placed.float().mean().item())
        metrics["hpt/rl_fraction"].append((alpha > 0).float().mean().item())
        metrics["hpt/no_demo_fraction"].append((~has_demo).float().mean().item() if self._uses_demonstrations else 1.0)
        metrics["hpt/demo_truncated_fraction"].append(
            (truncated & placed).float().sum().item() / max(int(placed.sum()), 1)
        )
        metrics["hpt/skipped_rows"].append((global_weights == 0).float().mean().item())
        metrics["hpt/num_prompts"].append(float(num_groups))
        return output

    def _record_gate(self, hpt_fields, accuracy, alpha, beta, placed, num_generations):
        local_index = torch.tensor(
            [-1 if f.get(ROW_INDEX) is None else int(f[ROW_INDEX]) for f in hpt_fields], device=accuracy.device
        )
        prompt_index = gather(local_index).view(-1, num_generations)[:, 0]
        if not self.accelerator.is_main_process:
            return
        step = self.state.global_step
        for index, p, a, b, sft in zip(
            prompt_index.tolist(), accuracy.tolist(), alpha.tolist(), beta.tolist(), placed.tolist()
        ):
            self.gate_history.append(
                {"step": step, "prompt_index": index, "accuracy": p, "alpha": a, "beta": b, "sft": bool(sft)}
            )

    def _swap_in_demonstrations(self, output, offline, hpt_fields):
        """Writes each placed demonstration into its row: completion tokens, mask, and neutral per-token extras."""
        rows = offline.nonzero(as_tuple=True)[0].tolist()
        demos = {i: list(hpt_fields[i][DEMO_IDS]) for i in rows}
        completion_ids = output["completion_ids"]
        width = max([completion_ids.size(1), *(len(d) for d in demos.values())])
        self._pad_completion_width(output, width)
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        pad_id = self._tokenizer.pad_token_id
        for i, ids in demos.items():
            completion_ids[i] = pad_id
            completion_ids[i, : len(ids)] = torch.tensor(ids, device=completion_ids.device)
            completion_mask[i] = 0
            completion_mask[i, : len(ids)] = 1
            for key, fill in _PER_TOKEN_FILL.items():
                if key in output and isinstance(output[key], torch.Tensor) and output[key].dim() == 2:
                    output[key][i] = fill
        if "advantages" in output and self.offline_spec.advantage == "one":
            output["advantages"] = torch.where(offline, torch.ones_like(output["advantages"]), output["advantages"])

    def _pad_completion_width(self, output, width):
        def pad_right(tensor, value):
            extra = width - tensor.size(1)
            if extra <= 0:
                return tensor
            return torch.cat([tensor, tensor.new_full((tensor.size(0), extra), value)], dim=1)

        current = output["completion_ids"].size(1)
        output["completion_ids"] = pad_right(output["completion_ids"], 0)
        output["completion_mask"] = pad_right(output["completion_mask"], 0)
        # A sequence-level vLLM ratio is (B, 1) at any width; with 1-token completions it would pass for per-token.
        per_sequence = getattr(self, "vllm_importance_sampling_mode", "token").startswith("sequence")
        for key, fill in _PER_TOKEN_FILL.items():
            if per_sequence and key == "importance_sampling_ratio":
                continue
            tensor = output.get(key)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.size(1) == current:
                output[key] = pad_right(tensor, fill)

    def _mixed_group_advantages(self, output, inputs, hpt_fields, offline, rewards_per_func, placed, num_generations):
        """LUFFY/SRFT: each placed demonstration is scored and joins its group's advantage statistics."""
        device = self.accelerator.device
        rows = offline.nonzero(as_tuple=True)[0].tolist()
        local_demo_rewards = torch.full((len(inputs),), float("nan"), device=device)
        if rows:
            demo_rewards = self._score_demonstrations([inputs[i] for i in rows])
            local_demo_rewards[rows] = demo_rewards.to(device)
        demo_rewards_global = gather(local_demo_rewards)
        offline_global = gather(offline)
        totals = verifier_rewards(rewards_per_func, self.reward_weights, None)
        # The mixed group is normalised as the config normalises every group (scale_rewards).
        advantages = mixed_group_advantages(
            totals,
            torch.nan_to_num(demo_rewards_global, nan=0.0),
            offline_global,
            num_generations,
            self.scale_rewards,
        )
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        in_mixed_group = placed.repeat_interleave(num_generations)[local]
        output["advantages"] = torch.where(in_mixed_group, advantages[local], output["advantages"])

    def _score_demonstrations(self, rows: list[dict]) -> torch.Tensor:
        """Weighted total reward of demonstrations, with the same reward functions and kwargs as rollouts."""
        column = self.args.demonstration_column
        prompts = [row["prompt"] for row in rows]
        completions = []
        for row in rows:
            demo = row[column]
            if is_conversational(row) and isinstance(demo, str):
                demo = [{"role": "assistant", "content": demo}]
            completions.append(demo)
        keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids", column)]
        reward_kwargs = {k: [row[k] for row in rows] for k in keys}
        reward_kwargs.update(trainer_state=self.state, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        device = self.accelerator.device
        per_func = torch.full((len(rows), len(self.reward_funcs)), float("nan"), device=device)
        for i, (func, proc) in enumerate(zip(self.reward_funcs, self.reward_processing_classes)):
            if isinstance(func, nn.Module):
                if is_conversational({"prompt": prompts[0]}):
                    texts = [
                        apply_chat_template({"messages": p + c}, proc, **self.chat_template_kwargs)["text"]
                        for p, c in zip(prompts, completions)
                    ]
                else:
                    texts = [p + c for p, c in zip(prompts, completions)]
                enc = proc(
                    text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
                )
                with torch.inference_mode():
                    per_func[:, i] = func(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0]
                continue
            result = func(prompts=prompts, completions=completions, completion_ids=None, **reward_kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run_coroutine_threadsafe(result, self.async_loop).result()
            per_func[:, i] = torch.tensor([math.nan if r is None else float(r) for r in result], device=device)
        return verifier_rewards(per_func, self.reward_weights, None)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        training = mode == "train"
        full_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            full_mask = full_mask * inputs["tool_mask"]
        num_rows = full_mask.size(0)
        device = full_mask.device
        offline = inputs.get(_OFFLINE, torch.zeros(num_rows, dtype=torch.bool, device=device))
        weights = inputs.get(_WEIGHT, torch.ones(num_rows, device=device))
        token_mean_rows = offline if self.offline_spec.aggregation == "token_mean" else torch.zeros_like(offline)
        policy_rows = ~token_mean_rows

        # Denominators come from the whole micro-batch, before zero-weight rows are dropped, so dropping them
        # changes neither the loss nor its gradient.
        accumulation = self.current_gradient_accumulation_steps if training else 1
        num_policy_rows = float(policy_rows.sum())
        if _POLICY_ROWS in inputs:
            # Demonstrations leave the policy term unevenly across ranks and micro-batches, so a local row count
            # (grpo, dr_grpo) would weight rows by where they landed; DDP averages ranks, so divide by the generation
            # batch's count spread over processes and micro-batches (equal to the local count when no row is offline).
            num_policy_rows = float(inputs[_POLICY_ROWS]) / self.accelerator.num_processes
            if training:
                num_policy_rows /= self.args.steps_per_generation
        policy_denominator = loss_type_denominator(
            self.loss_type,
            num_rows=num_policy_rows,
            num_tokens=float(full_mask[policy_rows].sum()),
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=accumulation,
            steps_per_generation=self.args.steps_per_generation,
            training=training,
        )
        token_mean_denominator = (
            float(inputs.get(_TOKEN_MEAN_TOKENS, torch.zeros(()))) / self.accelerator.num_processes
        )
        if training:
            token_mean_denominator *= accumulation / self.args.steps_per_generation

        keep = weights > 0
        multimodal = any(k in inputs for k in _MULTIMODAL_KEYS)
        if multimodal or bool(keep.all()) or not self._skip_zero_weight_rows:
            keep_index = None
        else:
            if not bool(keep.any()):
                # Every rank must run forward and backward (DDP, ZeRO-3 collectives): keep one row at weight zero.
                keep[0] = True
            keep_index = keep.nonzero(as_tuple=True)[0]
        inputs = _select_rows(inputs, keep_index)
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        offline = inputs.get(_OFFLINE, torch.zeros(mask.size(0), dtype=torch.bool, device=device))
        weights = inputs.get(_WEIGHT, torch.ones(mask.size(0), device=device))
        online = ~offline

        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logits_to_keep = inputs["completion_ids"].size(1)
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        online_mask = mask * online.unsqueeze(1)

        # TRL's token-level modifiers act on rollout rows only: demonstrations have no sampling log-probs, no
        # vLLM importance ratio, and no reference log-probs (the KL term is applied to rollouts only).
        scale = None
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, online_mask, 1 - self.top_entropy_quantile)
            scale = entropy_mask
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old_per_token_logps)
            off_policy_mask = self.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=per_token_logps,
                sampling_per_token_logps=sampling,
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            scale = off_policy_mask if scale is None else off_policy_mask * scale
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
            scale = ratio if scale is None else scale * ratio
        bias = None
        ratio_for_log = importance_ratio(self.online_spec, per_token_logps, old_per_token_logps, mask)
        if self.beta != 0.0:
            # Demonstration rows hold a fill value, not reference log-probs, and the term is not applied to them: a
            # zero log-ratio there, since exp() of the fill can overflow and the zero gradient torch.where sends back
            # through an inf is NaN.
            ref = torch.where(online.unsqueeze(1), inputs["ref_per_token_logps"], per_token_logps.detach())
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * ratio_for_log
            bias = self.beta * per_token_kl

        result = hybrid_loss(
            per_token_logps,
            mask,
            online_spec=self.online_spec,
            offline_spec=self.offline_spec,
            offline=offline,
            weights=weights,
            advantages=advantages,
            old_per_token_logps=old_per_token_logps,
            loss_type=self.loss_type,
            policy_denominator=policy_denominator,
            token_mean_denominator=max(token_mean_denominator, 1e-8),
            offline_coef=self.args.sft_loss_coef,
            online_token_scale=scale,
            online_token_bias=bias,
        )
        loss = result.loss

        active = mask * (weights > 0).unsqueeze(1)
        if self._entropy_bonus_enabled:
            loss = loss - self._entropy_bonus(
                entropies, active if entropy_mask is None else active * entropy_mask, mode
            )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        step = _LossStep(
            per_token_logps=per_token_logps.detach(),
            mask=mask,
            active=active,
            online_mask=online_mask,
            offline=offline,
            weights=weights,
            entropies=entropies,
            ratio=ratio_for_log.detach(),
            advantages=advantages,
            per_token_kl=None if bias is None else (bias / self.beta).detach(),
        )
        self._log_loss_metrics(mode, result, step, accumulation, training)
        return loss

    def _entropy_bonus(self, entropies, effective_mask, mode):
        # GRPOTrainer's entropy bonus: a token mean over the tokens that train, scaled for accumulation only.
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

    def _log_loss_metrics(self, mode, result, step: _LossStep, accumulation, training):
        per_token_logps, mask, active, online_mask = step.per_token_logps, step.mask, step.active, step.online_mask
        offline, weights, entropies, ratio, advantages = (
            step.offline,
            step.weights,
            step.entropies,
            step.ratio,
            step.advantages,
        )
        reduce = self.accelerator.reduce

        def global_mean(values, value_mask):
            if values.size(1) == 1:
                value_mask = (value_mask.sum(-1, keepdim=True) > 0).to(values.dtype)
            value_mask = value_mask.to(values.dtype)
            totals = reduce(torch.stack([(values * value_mask).sum(), value_mask.sum()]).detach(), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        metrics["entropy"].append(global_mean(entropies, active))
        if step.per_token_kl is not None:
            metrics["kl"].append(global_mean(step.per_token_kl, online_mask * (weights > 0).unsqueeze(1)))
        rl_mask = online_mask * (weights > 0).unsqueeze(1)
        fractions = {}
        if self.online_spec.stabilization == "clip":
            low = (ratio < 1 - self.online_spec.epsilon_low) & (advantages < 0)
            high = (ratio > 1 + self.online_spec.epsilon_high) & (advantages > 0)
            fractions = {"low": low.float(), "high": high.float(), "region": (low | high).float()}
            for name, values in fractions.items():
                metrics[f"clip_ratio/{name}_mean"].append(global_mean(values, rl_mask))
            # Per-sequence extremes, as GRPOTrainer logs them; ranks whose rollouts were all skipped send NaN.
            per_seq_mask = rl_mask.to(ratio.dtype)
            rows = per_seq_mask.sum(-1) > 0
            for name, reducer, extreme in (("low", nanmin, "min"), ("high", nanmax, "max")):
                values = fractions[name].expand_as(per_seq_mask)
                per_seq = (values * per_seq_mask).sum(-1) / per_seq_mask.sum(-1).clamp(min=1.0)
                local = getattr(per_seq[rows], extreme)() if bool(rows.any()) else per_seq.new_tensor(float("nan"))
                metrics[f"clip_ratio/{name}_{extreme}"].append(reducer(gather(local.reshape(1))).item())
        elif self.online_spec.stabilization == "cispo":
            clipped = ((ratio > self.online_spec.epsilon_high) & (advantages > 0)).float()
            metrics["cispo_clip_ratio"].append(global_mean(clipped, rl_mask))

        if not training:
            return  # evaluation has no demonstrations: GRPOTrainer's metrics plus hpt/prompt_accuracy only
        # Loss terms as they read per optimizer step (without gradient-accumulation scaling), averaged over ranks.
        # Each micro-batch's term is scaled by 1/accumulation (all loss types, since dapo's spread of the token count
        # over steps_per_generation micro-batches cancels over a step); their mean over the window reads per step.
        undo = accumulation
        terms = torch.stack([result.policy_loss * undo, result.token_mean_loss * undo]).float()
        # Each rank's terms are its share of the global loss (global denominators spread over processes) and DDP
        # averages the ranks, those without such rows included: the trained loss is the sum over ranks / processes.
        totals = reduce(terms, "sum") / self.accelerator.num_processes
        metrics["hpt/rl_loss"].append(totals[0].item())
        if self.offline_spec.aggregation == "token_mean":
            metrics["hpt/sft_loss"].append(totals[1].item())
        else:
            sft_values = -per_token_logps.detach()
            metrics["hpt/sft_loss"].append(global_mean(sft_values, mask * offline.unsqueeze(1)))


class _LossStep(NamedTuple):
    """The tensors of one loss pass that the metrics read."""

    per_token_logps: torch.Tensor
    mask: torch.Tensor
    active: torch.Tensor
    online_mask: torch.Tensor
    offline: torch.Tensor
    weights: torch.Tensor
    entropies: torch.Tensor
    ratio: torch.Tensor
    advantages: torch.Tensor
    per_token_kl: torch.Tensor | None


_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _select_rows(inputs: dict, index: torch.Tensor | None) -> dict:
    """The micro-batch restricted to `index` rows, trimmed to the longest kept completion."""
    if index is None:
        return inputs
    num_rows = inputs["completion_ids"].size(0)
    selected = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.size(0) == num_rows:
            selected[key] = value.index_select(0, index)
        else:
            selected[key] = value
    width = int(selected["completion_mask"].sum(-1).max().clamp(min=1))
    full_width = inputs["completion_ids"].size(1)
    for key, value in selected.items():
        if key == "prompt_ids" or key == "prompt_mask":
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(1) == full_width:
            selected[key] = value[:, :width]
    return selected
