"""The generation batch as HPT edits it: demonstrations in rollout slots, per-row weights, and the loss pass's rows.

`GRPOTrainer` hands its loss a dict of tensors, one row per rollout, and splits and shuffles it into micro-batches by
the first dimension. HPT adds one key to it, [`HPT_KEY`], a `(rows, 4)` tensor that travels with the rows through
those splits: which rows hold a demonstration, each row's weight, and the generation batch's global counts the loss
divides by (the same in every row, so that any micro-batch carries them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from trl_hpt.demonstrations import Demonstration


HPT_KEY = "hpt"

# Keys that hold one row per rollout and per completion token, with the value a demonstration row gets: it has no
# sampling, reference or behaviour log-probs, and no vLLM importance ratio.
PER_TOKEN_FILL = {
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
    "tool_mask": 1,
}
# (B, prompt + completion) keys of vision-language batches: they widen and narrow with the completion.
PROMPT_COMPLETION_KEYS = ("token_type_ids", "mm_token_type_ids")
# Multimodal inputs are not row-sliceable in one simple way; with them, the loss pass keeps every row.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "image_sizes")
# What GRPOTrainer's forward pass reads besides the token ids.
FORWARD_KEYS = (
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


class HPTRows(NamedTuple):
    """HPT's view of a batch: per row, whether it is a demonstration and its weight; the generation batch's counts."""

    demonstration: torch.Tensor  # bool (B,): the row holds a demonstration
    weights: torch.Tensor  # (B,): alpha for a rollout, beta for a demonstration
    # 0-d tensors, read on the device without a host sync; the loss turns them into its denominators once.
    policy_rows: torch.Tensor  # rows of the policy term over the whole generation batch (every process)
    separate_tokens: torch.Tensor  # demonstration tokens of the separate token-mean term, likewise


def attach_rows(batch: dict, demonstration: torch.Tensor, weights: torch.Tensor, policy_rows, separate_tokens) -> dict:
    """Writes [`HPTRows`] into `batch[HPT_KEY]` (in place) and returns the batch."""
    counts = torch.stack(
        [torch.as_tensor(c, dtype=torch.float32, device=weights.device) for c in (policy_rows, separate_tokens)]
    )
    columns = [
        demonstration.float().unsqueeze(1),
        weights.float().unsqueeze(1),
        counts.expand(demonstration.numel(), 2),
    ]
    batch[HPT_KEY] = torch.cat(columns, dim=1)
    return batch


def hpt_rows(batch: dict) -> HPTRows | None:
    """The [`HPTRows`] of a batch, or `None` for a batch HPT did not touch (GRPOTrainer's own)."""
    packed = batch.get(HPT_KEY)
    if packed is None:
        return None
    return HPTRows(packed[:, 0] > 0, packed[:, 1], packed[0, 2], packed[0, 3])


def replace_rows(batch: dict, **changes) -> dict:
    """A shallow copy of `batch` with some [`HPTRows`] fields replaced (`demonstration`, `weights`, counts)."""
    rows = hpt_rows(batch)._replace(**changes)
    return attach_rows(dict(batch), *rows)


def loss_mask(batch: dict) -> torch.Tensor:
    """The tokens a loss counts: the completion mask, without tool output where the batch has a tool mask."""
    return batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]


def pad_completions(output: dict, width: int, pad_token_id: int, per_sequence_ratio: bool = False) -> None:
    """
    Widens the completion tensors of `output` (in place) to `width` tokens: ids with the pad token, masks with 0,
    per-token extras with their neutral fill. A per-sequence vLLM importance ratio (`per_sequence_ratio`) is `(B, 1)`
    at any width and is left alone, even when the completions are one token wide.
    """
    current = output["completion_ids"].size(1)
    extra = width - current
    if extra <= 0:
        return

    def pad_right(tensor, value):
        return torch.cat([tensor, tensor.new_full((tensor.size(0), extra), value)], dim=1)

    output["completion_ids"] = pad_right(output["completion_ids"], pad_token_id)
    output["completion_mask"] = pad_right(output["completion_mask"], 0)
    for key, fill in PER_TOKEN_FILL.items():
        if per_sequence_ratio and key == "importance_sampling_ratio":
            continue
        tensor = output.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.size(1) == current:
            output[key] = pad_right(tensor, fill)
    for key in PROMPT_COMPLETION_KEYS:
        tensor = output.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
            output[key] = pad_right(tensor, 0)


def place_demonstrations(
    output: dict,
    demonstration: torch.Tensor,
    demos: Sequence[Demonstration],
    pad_token_id: int,
    *,
    per_sequence_ratio: bool = False,
    unit_advantage: bool = True,
) -> None:
    """
    Writes each demonstration of an `demonstration` row into that row of `output` (in place): its completion tokens and
    mask, neutral per-token extras, its tool mask, and text-only token types. With `unit_advantage` its advantage
    becomes 1 (specs that do not read advantages: SFT's `A = 1`).
    """
    rows = demonstration.nonzero(as_tuple=True)[0].tolist()
    if not rows:
        return
    width = max([output["completion_ids"].size(1), *(len(demos[i].ids) for i in rows)])
    if "tool_mask" not in output and any(demos[i].tool_mask is not None for i in rows):
        output["tool_mask"] = torch.ones_like(output["completion_mask"])
    pad_completions(output, width, pad_token_id, per_sequence_ratio)
    completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
    prompt_width = output["prompt_ids"].size(1) if "prompt_ids" in output else None
    for i in rows:
        ids = torch.tensor(demos[i].ids, device=completion_ids.device)
        completion_ids[i] = pad_token_id
        completion_ids[i, : len(ids)] = ids
        completion_mask[i] = 0
        completion_mask[i, : len(ids)] = 1
        for key, fill in PER_TOKEN_FILL.items():
            if isinstance(output.get(key), torch.Tensor) and output[key].dim() == 2:
                output[key][i] = fill
        if demos[i].tool_mask is not None:
            output["tool_mask"][i, : len(ids)] = torch.tensor(demos[i].tool_mask, device=completion_ids.device)
        for key in PROMPT_COMPLETION_KEYS:
            if prompt_width is not None and isinstance(output.get(key), torch.Tensor):
                output[key][i, prompt_width:] = 0  # a demonstration is text
    if unit_advantage and "advantages" in output:
        output["advantages"] = torch.where(demonstration, torch.ones_like(output["advantages"]), output["advantages"])


def rows_to_keep(batch: dict, weights: torch.Tensor, *, aux_loss: bool = False) -> torch.Tensor | None:
    """
    The rows the loss pass runs through the model: those of nonzero weight, or all (`None`).

    All are kept with multimodal inputs (they do not slice by row simply) and with a router's aux loss (it is over
    every row it routes). When no row has weight, one is kept at weight zero: every process must run forward and
    backward (DDP, ZeRO-3 collectives).
    """
    keep = weights > 0
    if aux_loss or any(k in batch for k in MULTIMODAL_KEYS) or bool(keep.all()):
        return None
    if not bool(keep.any()):
        keep[0] = True
    return keep.nonzero(as_tuple=True)[0]


def select_rows(batch: dict, index: torch.Tensor | None) -> dict:
    """The micro-batch restricted to `index` rows, trimmed to the longest kept completion (`None`: unchanged)."""
    if index is None:
        return batch
    num_rows = batch["completion_ids"].size(0)
    selected = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.size(0) == num_rows:
            selected[key] = value.index_select(0, index)
        else:
            selected[key] = value
    width = int(selected["completion_mask"].sum(-1).max().clamp(min=1))
    full_width = batch["completion_ids"].size(1)
    prompt_width = batch["prompt_ids"].size(1)
    for key, value in selected.items():
        if key in ("prompt_ids", "prompt_mask", HPT_KEY) or not (isinstance(value, torch.Tensor) and value.dim() == 2):
            continue
        if key in PROMPT_COMPLETION_KEYS and value.size(1) == prompt_width + full_width:
            selected[key] = value[:, : prompt_width + width]
        elif value.size(1) == full_width:
            selected[key] = value[:, :width]
    return selected


class RowLayout(NamedTuple):
    """
    Where one process's rows sit in the generation batch: consecutive groups of `num_generations` rows per prompt,
    each process holding `num_local` consecutive rows. Global tensors are over every process's rows (or prompts).
    """

    num_local: int
    num_generations: int
    num_processes: int = 1
    process_index: int = 0

    @classmethod
    def of(cls, accelerator, num_local: int, num_generations: int = 1) -> RowLayout:
        """The layout of this process's `num_local` rows under an `accelerate.Accelerator`."""
        return cls(num_local, num_generations, accelerator.num_processes, accelerator.process_index)

    @property
    def num_rows(self) -> int:
        return self.num_local * self.num_processes

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's part of a tensor over every row."""
        start = self.process_index * self.num_local
        return rows[start : start + self.num_local]

    def per_row(self, prompts: torch.Tensor) -> torch.Tensor:
        """A tensor over every prompt, repeated for each of its rows."""
        return prompts.repeat_interleave(self.num_generations, dim=0)

    def last_slots(self, prompts: torch.Tensor) -> torch.Tensor:
        """Over every row: a prompt's flag in its group's last slot (where a demonstration goes), False elsewhere."""
        slot = torch.arange(self.num_rows, device=prompts.device) % self.num_generations
        return self.per_row(prompts.bool()) & (slot == self.num_generations - 1)

    def per_prompt(self, rows: torch.Tensor) -> torch.Tensor:
        """A gathered tensor over every row, read in each group's last slot: one value per prompt."""
        return rows.view(-1, self.num_generations, *rows.shape[1:])[:, -1]


def scoring_rows(placed: torch.Tensor, layout: RowLayout) -> tuple[list[int], int]:
    """
    This process's rows whose demonstration is scored, and how many rows every process scores: the most any process
    has, so that reward models run the same number of forwards on every process (the short ones pad with repeats).
    `placed` is over every row.
    """
    per_process = placed.view(layout.num_processes, layout.num_local)
    rows = per_process[layout.process_index].nonzero(as_tuple=True)[0].tolist()
    return rows, int(per_process.sum(1).max())


def scatter_scored(gathered: torch.Tensor, placed: torch.Tensor, layout: RowLayout, width: int) -> torch.Tensor:
    """
    Rewards gathered from [`scoring_rows`]' `width` rows per process, put back in their rows: `(every row, F)`, NaN
    where no demonstration was placed.
    """
    result = gathered.new_full((layout.num_rows, gathered.size(1)), float("nan"))
    per_process = placed.view(layout.num_processes, layout.num_local)
    for process in range(layout.num_processes):
        owned = per_process[process].nonzero(as_tuple=True)[0]
        result[process * layout.num_local + owned] = gathered[process * width : process * width + owned.numel()]
    return result


def rollout_inputs(batch: dict, per_token_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The advantages as a column (`(B, 1)`, or `(B, T)` as given) and `log pi_old`, which is the detached current
    log-probability when the batch has none (a single update per generation, as `GRPOTrainer` reads it).
    """
    advantages = batch["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = batch.get("old_per_token_logps")
    return advantages, per_token_logps.detach() if old is None else old


def forward_inputs(batch: dict) -> dict:
    """
    What `GRPOTrainer._get_per_token_logps_and_entropies` reads of a batch, as its keyword arguments: ids, attention
    mask, the number of completion positions to keep, and the multimodal and token-type inputs.
    """
    return {
        "input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
        "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
        "logits_to_keep": batch["completion_ids"].size(1),
        **{k: batch.get(k) for k in FORWARD_KEYS},
    }
