"""Tiny local models and tokenizers for tests: random weights, no downloads, a few hundred parameters per layer.

    from helpers_tiny import build_tiny_causal_lm, build_tiny_tokenizer, save_tiny_model

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(tokenizer)
    path = save_tiny_model(tmp_path / "tiny")  # a directory `from_pretrained` can load

The tokenizer is character level over printable ASCII, so any prompt or answer (LaTeX included) round-trips through
encode/decode exactly; characters outside ASCII map to `<unk>`.
"""

import string
from pathlib import Path


# A Zephyr-style template: role markers are single tokens, each turn ends with the eos token, and the generation
# prompt opens an assistant turn, so that generation stops at eos exactly like a chat model's.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Printable ASCII (digits, letters, punctuation including `\`, `{`, `}`, `$`, space) plus newline and tab.
CHARACTERS = [c for c in string.printable if c not in "\r\x0b\x0c"]


def build_tiny_tokenizer(tmp_dir=None, chat_template: bool = True):
    """
    Builds a character-level `PreTrainedTokenizerFast` with the `tokenizers` library.

    Args:
        tmp_dir (`str` or `Path`, *optional*):
            If given, the tokenizer is also saved there with `save_pretrained`.
        chat_template (`bool`, *optional*, defaults to `True`):
            Whether to set [`CHAT_TEMPLATE`]. Without it, callers fall back to plain-text prompts.

    Returns:
        `PreTrainedTokenizerFast`: pad/bos/eos/unk special tokens set, role markers as special tokens, left padding
        (what batched generation needs), no special tokens added automatically when encoding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *ROLE_TOKENS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character is its own pre-token; Fuse joins decoded tokens back without separators.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **SPECIAL_TOKENS,
        additional_special_tokens=ROLE_TOKENS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tmp_dir is not None:
        tokenizer.save_pretrained(str(tmp_dir))
    return tokenizer


def build_tiny_causal_lm(tokenizer, seed: int = 0, model_type: str = "llama"):
    """
    Builds a randomly initialised causal LM sized for CPU tests (hidden size 16, 2 layers, 2 heads).

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            Tokenizer whose vocabulary size and special token ids the model takes.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation, so that two calls give the same model.
        model_type (`str`, *optional*, defaults to `"llama"`):
            `"llama"` or `"qwen2"` (the paper's backbone family). Prefer `"llama"` for saved models: for `qwen2`
            checkpoints, transformers 5's `AutoTokenizer` ignores the saved tokenizer class and rebuilds a byte-level
            `Qwen2Tokenizer`, which does not round-trip this character vocabulary.

    Returns:
        `PreTrainedModel`: The model in eval mode, float32, with `generation_config` pad/bos/eos ids set.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if model_type not in classes:
        raise ValueError(f"model_type must be one of {sorted(classes)}, got {model_type!r}.")
    config_class, model_class = classes[model_type]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Seed only the initialisation, leaving the caller's global RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_tiny_model(path, seed: int = 0, chat_template: bool = True, model_type: str = "llama") -> str:
    """
    Builds a tiny tokenizer and model and saves both to `path`, a directory `AutoModelForCausalLM.from_pretrained`
    and `AutoTokenizer.from_pretrained` load like a Hub checkpoint.

    Args:
        path (`str` or `Path`):
            Directory to create (parents included).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation.
        chat_template (`bool`, *optional*, defaults to `True`):
            Whether the saved tokenizer has a chat template.
        model_type (`str`, *optional*, defaults to `"llama"`):
            See [`build_tiny_causal_lm`].

    Returns:
        `str`: The directory, as a string.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(path, chat_template=chat_template)
    build_tiny_causal_lm(tokenizer, seed=seed, model_type=model_type).save_pretrained(str(path))
    return str(path)
