"""Building blocks for tests, benchmarks and the demo: tiny models built in memory, a synthetic task, a CPU config,
and helpers that drive a trainer's generation and loss passes directly. Nothing is downloaded.

    from trl_hpt.testing import PAIRS, addition_rows, build_char_tokenizer, dense_reward, generation_batch
    from trl_hpt.testing import loss_and_grads, make_trainer

    tokenizer = build_char_tokenizer()
    trainer = make_trainer(tmp_path, tokenizer, addition_rows(PAIRS), dense_reward)  # a tiny model on the CPU
    batch = generation_batch(trainer, 4)  # one generation batch, as the dataloader would bring it
    loss, grads = loss_and_grads(trainer, batch)

Two tokenizer families are built here, both character level so that any text round-trips: [`build_char_tokenizer`]
(the demo's, with a minimal chat template) and [`build_tiny_tokenizer`] (a Zephyr-style template with BOS/EOS, for
checkpoints saved and reloaded like Hub models, see [`save_tiny_model`]). Torch, transformers and the trainers are
imported when a function needs them.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


__all__ = [
    "GATED_NUM_CORRECT",
    "LOSS_CONFIGS",
    "NUM_GENERATIONS",
    "PAIRS",
    "addition_rows",
    "assert_same",
    "build_char_tokenizer",
    "build_tiny_causal_lm",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "count_forward_rows",
    "dense_reward",
    "gated_trainer",
    "generation_batch",
    "generation_inputs",
    "loss_and_grads",
    "make_trainer",
    "per_token_logps",
    "save_char_model",
    "save_tiny_model",
    "slot_reward",
    "tiny_model",
    "train_args",
    "write_luffy_jsonl",
]

NUM_GENERATIONS = 4
"""Rollouts per prompt in the tests' generation batches."""

PAIRS = [(1, 2), (3, 4), (5, 5), (2, 7)]
"""Four `a+b=` problems whose prompts have one width (no padding), for tests that build one generation batch."""

GATED_NUM_CORRECT = [0, 0, 2, 1]
"""Correct rollouts per prompt of [`PAIRS`] in [`gated_trainer`]: no rollout solves the first two prompts."""

LOSS_CONFIGS = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo": {"loss_type": "dapo"},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.5},
    "sapo": {"loss_type": "sapo"},
    "luspo": {"loss_type": "luspo"},
    "vespo": {"loss_type": "vespo"},
    "entropy_coef": {"loss_type": "dapo", "entropy_coef": 0.05},
    "adaptive_entropy": {"loss_type": "grpo", "entropy_coef": 0.05, "use_adaptive_entropy": True},
    "kl": {"loss_type": "dapo", "beta": 0.1},
    "kl_bias_corrected": {"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": True},
    "top_entropy": {"loss_type": "dapo", "top_entropy_quantile": 0.5},
    "off_policy_mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.0},
    "sequence_is": {"loss_type": "dapo", "importance_sampling_level": "sequence"},
    "delta": {"loss_type": "grpo", "delta": 1.05, "epsilon": 0.01},
}
"""`GRPOConfig` settings that cover each of GRPOTrainer's loss paths (loss types, entropy, KL, masks, ratios)."""


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A Zephyr-style template: role markers are single tokens, each turn ends with the eos token, and the generation
# prompt opens an assistant turn, so that generation stops at eos exactly like a chat model's.
ZEPHYR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ZEPHYR_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def _char_level_tokenizer(tokens: Sequence[str], character: str, **kwargs):
    """A `PreTrainedTokenizerFast` whose vocabulary is `tokens`, splitting text into single characters (`character`
    is the regex of one), left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(character), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters decode back to the exact text, without separators
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **kwargs)


def build_char_tokenizer(chat_template: bool = True):
    """
    A character-level `PreTrainedTokenizerFast` over printable ASCII (no newlines), built in memory.

    `<|end|>` is both the end-of-turn and the EOS token; `<pad>` pads, on the left as GRPOTrainer requires. With
    `chat_template=True` it carries a minimal chat template whose assistant turn ends with `<|end|>`.
    """
    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    tokenizer = _char_level_tokenizer(
        [*SPECIAL_TOKENS, *chars],
        ".",
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    # The special tokens are whole words: keep the regex splitter from cutting them into characters.
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_tokenizer(tmp_dir=None, chat_template: bool = True):
    """
    A character-level tokenizer over printable ASCII plus newline and tab, with `<s>` / `</s>` / `<pad>` / `<unk>`
    and role markers as special tokens and a Zephyr-style chat template: what a small chat checkpoint looks like.

    Args:
        tmp_dir (`str` or `Path`, *optional*):
            If given, the tokenizer is also saved there with `save_pretrained`.
        chat_template (`bool`, *optional*, defaults to `True`):
            Whether to set the chat template. Without it, callers fall back to plain-text prompts.

    Returns:
        `PreTrainedTokenizerFast`: left padding, no special tokens added automatically when encoding; characters
        outside ASCII map to `<unk>`.
    """
    characters = [c for c in string.printable if c not in "\r\x0b\x0c"]
    tokenizer = _char_level_tokenizer(
        [*ZEPHYR_SPECIAL_TOKENS.values(), *ROLE_TOKENS, *characters],
        r"[\s\S]",
        **ZEPHYR_SPECIAL_TOKENS,
        additional_special_tokens=ROLE_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    if chat_template:
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    if tmp_dir is not None:
        tokenizer.save_pretrained(str(tmp_dir))
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def build_tiny_model(
    tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, config_class=None, **config
):
    """
    A randomly initialised causal LM sized for CPU tests: a Qwen2 architecture unless `config_class` names another
    (`Qwen2MoeConfig`, `LlamaConfig`, ...); `config` overrides or adds configuration fields.

    The global torch generator is seeded with `seed` before the weights are drawn.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config((config_class or Qwen2Config)(**{**values, **config}))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_model(tokenizer, seed: int = 0):
    """The tests' model: [`build_tiny_model`] with hidden size 32 and 2 layers."""
    return build_tiny_model(tokenizer, hidden_size=32, num_layers=2, seed=seed)


def build_tiny_causal_lm(tokenizer, seed: int = 0, model_type: str = "llama"):
    """
    A randomly initialised causal LM for checkpoints saved and reloaded like Hub models (hidden size 16, 2 layers,
    2 heads, 4096 positions), seeding only its own initialisation (the caller's torch generator is left as it was).

    `model_type` is `"llama"` or `"qwen2"` (the paper's backbone family). Prefer `"llama"` for saved models: for
    `qwen2` checkpoints, transformers 5's `AutoTokenizer` ignores the saved tokenizer class and rebuilds a byte-level
    `Qwen2Tokenizer`, which does not round-trip a character vocabulary.

    Returns:
        `PreTrainedModel`: The model in eval mode, float32, with `generation_config` pad/bos/eos ids set.
    """
    import torch
    from transformers import LlamaConfig, Qwen2Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if model_type not in classes:
        raise ValueError(f"model_type must be one of {sorted(classes)}, got {model_type!r}.")
    with torch.random.fork_rng(devices=[]):
        model = build_tiny_model(
            tokenizer,
            hidden_size=16,
            seed=seed,
            config_class=classes[model_type],
            num_attention_heads=2,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
        )
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def save_tiny_model(path, seed: int = 0, chat_template: bool = True, model_type: str = "llama") -> str:
    """
    Saves [`build_tiny_tokenizer`] and [`build_tiny_causal_lm`] to `path` (created with its parents), a directory that
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load like a Hub checkpoint; returns it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(path, chat_template=chat_template)
    build_tiny_causal_lm(tokenizer, seed=seed, model_type=model_type).save_pretrained(str(path))
    return str(path)


def save_char_model(path) -> str:
    """Saves [`build_char_tokenizer`] and [`tiny_model`] to `path` like a Hub checkpoint, so a trainer loads it by
    path; returns it."""
    tokenizer = build_char_tokenizer()
    tiny_model(tokenizer).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def addition_rows(pairs, conversational: bool = False) -> list[dict]:
    """Prompt/demonstration/solution rows for `a+b=` problems."""
    rows = []
    for a, b in pairs:
        # Fixed width, so prompts need no padding: left padding shifts positions between training and generation.
        prompt, answer = f"{a:02d}+{b:02d}=", f"{a + b:02d}"
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": answer}],
                    "solution": answer,
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": answer, "solution": answer})
    return rows


def write_luffy_jsonl(path: Path, num_rows: int = 16) -> str:
    """Rows in the LUFFY / OpenR1-Math-46k schema, read by the `luffy` adapter as it reads the Hub set; returns the
    path."""
    with Path(path).open("w") as file:
        for i in range(num_rows):
            a, b = i % 10, i // 10 + 1
            row = {
                "data_source": "toy",
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "target": [{"role": "assistant", "content": f"\\boxed{{{a + b}}}"}],
                "reward_model": {"ground_truth": str(a + b), "style": "rule"},
            }
            file.write(json.dumps(row) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Config, rewards and trainers
# ---------------------------------------------------------------------------------------------------------------------


def train_args(output_dir, cls=None, **overrides):
    """
    A CPU config for tiny runs (an `HPTConfig` unless `cls` names another, such as `GRPOConfig`): SGD without
    clipping and a constant learning rate, so two correct implementations of a loss give equal parameters.
    """
    if cls is None:
        from trl_hpt.config import HPTConfig as cls
    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "num_generations": NUM_GENERATIONS,
        "max_completion_length": 6,
        "learning_rate": 0.05,
        "optim": "sgd",
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "max_steps": 3,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return cls(**values)


def dense_reward(completions, **kwargs):
    """A reward that differs between almost any two completions, so every GRPO step moves the weights."""
    return [(sum(ord(c) * (i + 1) for i, c in enumerate(str(x))) % 97) / 97 for x in completions]


def slot_reward(rows, num_correct, num_generations, wrong: float = 0.2):
    """
    A reward by rollout slot: the first `num_correct[j]` rollouts of the group of `rows[j]` are correct (reward 1) and
    the others score `wrong * slot` (by default unequal, so advantages are not all zero): each prompt's accuracy P is
    known exactly.
    """
    correct = {row["prompt"]: k for row, k in zip(rows, num_correct)}

    def reward(prompts, completions, **kwargs):
        return [
            1.0 if i % num_generations < correct[p] else wrong * (i % num_generations) for i, p in enumerate(prompts)
        ]

    return reward


def make_trainer(
    output_dir,
    tokenizer,
    rows: list[dict],
    reward_funcs,
    *,
    model=None,
    trainer_cls=None,
    config_cls=None,
    eval_rows: list[dict] | None = None,
    callbacks=None,
    peft_config=None,
    **overrides,
):
    """
    A trainer ([`~trl_hpt.HPTTrainer`] unless `trainer_cls` names another, such as `GRPOTrainer`) on `rows` (and
    `eval_rows`), with a [`tiny_model`] unless `model` is given (a model or a path) and the config of [`train_args`]
    (an `HPTConfig` for HPTTrainer, else a `GRPOConfig`, unless `config_cls` says) with `overrides`. By default one
    generation batch holds every row's group of `num_generations` rollouts.

    With `beta > 0`, GRPOTrainer loads its reference model from the policy's path, so an in-memory model is saved to
    `output_dir/policy` first and the trainer loads it from there.
    """
    from datasets import Dataset
    from trl import GRPOConfig

    from trl_hpt.trainer import HPTTrainer

    trainer_cls = trainer_cls or HPTTrainer
    overrides.setdefault("num_generations", NUM_GENERATIONS)
    overrides.setdefault("per_device_train_batch_size", len(rows) * overrides["num_generations"])
    if config_cls is None and not issubclass(trainer_cls, HPTTrainer):
        config_cls = GRPOConfig
    args = train_args(output_dir, cls=config_cls, **overrides)
    model = tiny_model(tokenizer) if model is None else model
    if args.beta and not isinstance(model, (str, Path)):
        model.save_pretrained(str(Path(output_dir) / "policy"))
        model = str(Path(output_dir) / "policy")
    return trainer_cls(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=None if eval_rows is None else Dataset.from_list(eval_rows),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )


def gated_trainer(output_dir, tokenizer, **kwargs):
    """
    [`make_trainer`] on the [`PAIRS`] rows, rewarded by [`slot_reward`] with [`GATED_NUM_CORRECT`]: the first two
    prompts are never solved, so the switch gate sends them to SFT (their rollouts get weight zero), and the other
    two are partly solved (RL with non-zero advantages). `kwargs` go to [`make_trainer`].
    """
    rows = addition_rows(PAIRS)
    reward = slot_reward(rows, GATED_NUM_CORRECT, kwargs.get("num_generations", NUM_GENERATIONS))
    return make_trainer(output_dir, tokenizer, rows, reward, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Driving the generation and loss passes
# ---------------------------------------------------------------------------------------------------------------------


def generation_inputs(trainer, num_prompts: int, num_generations: int) -> list[dict]:
    """
    Readies a trainer built outside `train()` for direct calls of its generation and loss passes, and returns one
    generation batch's inputs: its first `num_prompts` training rows, each repeated `num_generations` times.
    """
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss reads it
    rows = [dict(trainer.train_dataset[i]) for i in range(num_prompts)]
    return [dict(r) for r in rows for _ in range(num_generations)]


def generation_batch(trainer, num_generations: int) -> dict:
    """One generation batch as the trainer's dataloader yields it: every training prompt repeated per rollout."""
    inputs = generation_inputs(trainer, len(trainer.train_dataset), num_generations)
    return trainer._generate_and_score_completions(inputs)


def per_token_logps(trainer, batch: dict, rows=None):
    """The policy's per-token log-probs of the batch's completions (of `rows` only, a boolean mask, when given)."""
    import torch

    rows = slice(None) if rows is None else rows
    ids = torch.cat([batch["prompt_ids"][rows], batch["completion_ids"][rows]], dim=1)
    attention = torch.cat([batch["prompt_mask"][rows], batch["completion_mask"][rows]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, attention, batch["completion_ids"].size(1)
    )
    return logps


def loss_and_grads(trainer, batch: dict, compute_loss: Callable | None = None):
    """
    `(loss, [gradients])` of one loss pass on a copy of `batch`: `compute_loss(trainer, model, inputs)` (by default
    the trainer's own `_compute_loss`) and its backward, from zeroed gradients.
    """
    import torch

    compute_loss = compute_loss or type(trainer)._compute_loss
    trainer.model.zero_grad()
    loss = compute_loss(trainer, trainer.model, {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def count_forward_rows(trainer) -> list[int]:
    """Counts, on this trainer only, the rows of every policy forward: returns the list it appends to."""
    sizes: list[int] = []
    forward = trainer._get_per_token_logps_and_entropies

    def counting(model, input_ids, *args, **kwargs):
        sizes.append(input_ids.size(0))
        return forward(model, input_ids, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = counting
    return sizes


def assert_same(a: Any, b: Any, **tolerance) -> None:
    """`a` and `b` are `(loss, [gradients])`: equal loss and equal gradients, parameter by parameter."""
    import torch

    torch.testing.assert_close(a[0], b[0], **tolerance)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, **tolerance)
