"""Names for the model card of a locally trained model: what TRL's card template cannot fill on its own.

TRL's `create_model_card` links the base model on the Hub only when `model.config._name_or_path` is a Hub id, and
writes `hub_model_id` into the card's `pipeline(...)` example, which is `None` until the model is pushed. A model
trained from a local directory (or without `model_name`) thus gets a card reading "fine-tuned version of
[None](https://huggingface.co/None)", `pipeline(model="None")` and "# Model Card for None".
[`model_card_names`] works out the names from what is known, and [`complete_model_card`] writes them into the card
TRL saved:

    names = model_card_names(trainer, model_name)
    trainer.create_model_card(model_name=names["model_name"], ...)  # TRL's card
    complete_model_card(trainer, names)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


__all__ = ["complete_model_card", "model_card_names"]

# What TRL's template (trl/templates/lm_model_card.md) writes for a missing base model and a missing hub id.
_MISSING_BASE_LINK = "a fine-tuned version of [None](https://huggingface.co/None)"
_MISSING_HUB_ID = 'model="None"'
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A snapshot of the Hub cache, `.../models--{org}--{name}/snapshots/{revision}`: the directory name keeps the repo id.
_CACHE_DIR_RE = re.compile(r"^models--(.+)$")


def _hub_id(name_or_path: Any) -> str | None:
    """The Hub repo id a `from_pretrained` argument names, or `None` for a plain local directory or nothing."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        for part in reversed(path.resolve().parts):
            match = _CACHE_DIR_RE.match(part)
            if match:
                return match.group(1).replace("--", "/")
        return None
    return text if _HUB_ID_RE.match(text) else None


def _base_candidates(model: Any) -> list[str]:
    """Where a model came from, most telling first: its config's path, then a PEFT adapter's base model."""
    candidates = []
    config = getattr(model, "config", None)
    if getattr(config, "_name_or_path", None):
        candidates.append(str(config._name_or_path))
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        for adapter in peft_config.values():
            base = getattr(adapter, "base_model_name_or_path", None)
            if base:
                candidates.append(str(base))
    return candidates


def _architecture(model: Any) -> str | None:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return str(architectures[0])
    base = getattr(model, "get_base_model", None)
    return type(base() if callable(base) else model).__name__ if model is not None else None


def model_card_names(trainer, model_name: str | None = None) -> dict[str, str | None]:
    """
    Works out the names a trainer's model card needs, from what the trainer knows.

    Args:
        trainer ([`~trl_hpt.HPTTrainer`] or any TRL trainer):
            The trainer whose card is written (its `model`, `args.output_dir`, `args.hub_model_id` and
            `hub_model_id` are read).
        model_name (`str`, *optional*):
            The name given by the caller; kept when set.

    Returns:
        `dict`: `model_name` (the caller's, else the repo name of the Hub id the model is or will be pushed to, else
        the name of `output_dir`, what `Trainer.push_to_hub` names the model by); `base_model` (the Hub id of the
        model trained from: `model.config._name_or_path` when it is a Hub id, else a PEFT adapter's
        `base_model_name_or_path`, else the repo id of a Hub cache snapshot directory; `None` for a plain local
        directory or a model built in memory); `base_model_label` (how the text names a base model without a Hub id:
        the local directory's name, else the architecture, else `None`); and `model_path` (what the card's
        `pipeline(model=...)` example loads: the Hub id when known, else `output_dir`).
    """
    unwrap = getattr(getattr(trainer, "accelerator", None), "unwrap_model", None)
    model = unwrap(trainer.model) if callable(unwrap) else trainer.model
    args = trainer.args
    hub_model_id = getattr(trainer, "hub_model_id", None) or getattr(args, "hub_model_id", None)
    output_dir = str(args.output_dir) if getattr(args, "output_dir", None) else None

    if model_name is None:
        if hub_model_id:
            model_name = hub_model_id.split("/")[-1]
        elif output_dir:
            model_name = Path(output_dir).name

    candidates = _base_candidates(model)
    base_model = next((hub_id for hub_id in map(_hub_id, candidates) if hub_id), None)
    label = None
    if base_model is None:
        local = next((Path(c) for c in candidates if Path(c).expanduser().exists()), None)
        label = local.expanduser().resolve().name if local is not None else _architecture(model)

    return {
        "model_name": model_name,
        "base_model": base_model,
        "base_model_label": label,
        "model_path": hub_model_id or output_dir,
    }


def complete_model_card(trainer, names: dict[str, str | None]) -> Path | None:
    """
    Fills what TRL's card template left as `None` in `<output_dir>/README.md`, from [`model_card_names`].

    The base model: a Hub id found beyond TRL's own look-up (a PEFT adapter's base, a Hub cache snapshot) is linked
    and written to the card's `base_model` metadata; a local or in-memory base model is named in plain text (a
    `huggingface.co` link to it would not exist, and the Hub refuses a `base_model` that is not a repo id). The
    `pipeline(model=...)` example gets `names["model_path"]`. Everything else of TRL's card is kept as written.

    Args:
        trainer ([`~trl_hpt.HPTTrainer`] or any TRL trainer):
            The trainer whose card was just written by `create_model_card`.
        names (`dict`):
            The output of [`model_card_names`].

    Returns:
        `Path` or `None`: The card, or `None` when there was nothing to complete (not the main process, or no card).
    """
    is_main = getattr(trainer, "is_world_process_zero", None)
    if callable(is_main) and not is_main():
        return None
    path = Path(trainer.args.output_dir) / "README.md"
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    text = card.text
    base_model, label = names.get("base_model"), names.get("base_model_label")
    if _MISSING_BASE_LINK in text:
        if base_model:
            named = f"a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})"
            card.data.base_model = base_model
        elif label:
            named = f"a fine-tuned version of `{label}` (a local model)"
        else:
            named = "a fine-tuned model"
        text = text.replace(_MISSING_BASE_LINK, named)
    if names.get("model_path"):
        # JSON string syntax is Python's for a path: quotes and backslashes come out escaped.
        text = text.replace(_MISSING_HUB_ID, f"model={json.dumps(names['model_path'])}")
    if text != card.text:
        card.text = text
        card.save(os.fspath(path))
    return path
