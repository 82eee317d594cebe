"""The `trl-hpt` command line: `train`, `demo`, `eval` and `convert-gguf`.

    trl-hpt train --config examples/recipes/hpt_qwen2.5_math_7b.yaml
    trl-hpt train --config examples/recipes/hpt_qwen2.5_math_7b.yaml --learning_rate 1e-6 --output_dir runs/hpt
    trl-hpt demo
    trl-hpt eval --help
    trl-hpt convert-gguf model.Q4_1.gguf --output_dir models/converted

`train` is built on TRL's own argument machinery ([`~trl.TrlParser`]): every field of [`HPTScriptArguments`],
[`~trl_hpt.HPTConfig`] (so every `GRPOConfig` / `TrainingArguments` field) and TRL's `ModelConfig` is both a
command-line flag and a key of the YAML file given with `--config`; flags on the command line override the file.

The program runs in the current process. For several GPUs or machines, start it with Accelerate's module form:

    accelerate launch --config_file examples/accelerate/multi_gpu.yaml -m trl_hpt.cli train --config recipe.yaml

Torch and TRL's trainers are imported only once a subcommand runs, so `trl-hpt --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trl import ScriptArguments


__all__ = ["HPTScriptArguments", "get_reward_registry", "main", "make_parser", "resolve_reward_funcs", "train"]

_COMMANDS = {
    "train": "Train a model with HPTTrainer from a YAML recipe and/or command-line flags.",
    "demo": "Run the embedded CPU demo: HPT on a tiny model and a synthetic task, nothing to download.",
    "eval": "Evaluate a model on the paper's math benchmarks (AIME, AMC, MATH-500, ...).",
    "convert-gguf": "Turn a GGUF checkpoint (llama.cpp's format) into a model directory that trains, cached.",
}


@dataclass
class HPTScriptArguments(ScriptArguments):
    """
    Script arguments of `trl-hpt train`, on top of TRL's [`~trl.ScriptArguments`] (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, `dataset_streaming`).

    Args:
        dataset_adapter (`str`, *optional*):
            Adapter from the dataset's schema to HPT's prompt-completion rows: a key of
            [`~trl_hpt.adapters.ADAPTERS`] (`luffy`, `verl`, `problem_solution`, `identity`). `None` detects it from
            the columns.
        dataset_adapter_options (`dict` or `str`, *optional*):
            Options of the adapter (e.g. `{"drop_system_prompt": true}`), as a mapping in YAML or a JSON string on
            the command line.
        reward_funcs (`list[str]`, *optional*, defaults to `["math_verify"]`):
            Reward functions: names of [`~trl_hpt.rewards.REWARD_FUNCS`] (`math_verify`, `accuracy`, `format`),
            `exact_match`, or dotted import paths (`my_module.my_reward`). Weights go in `reward_weights`.
        gguf_file (`str`, *optional*):
            The GGUF file inside the directory (or Hub repository) `model_name_or_path`, as transformers'
            `gguf_file`. The checkpoint is converted once to a cached model directory
            ([`~trl_hpt.models.convert_gguf`]) and trained from there. A `.gguf` file given as
            `model_name_or_path`, or a directory whose only checkpoint is one, needs no `gguf_file`.
    """

    dataset_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Adapter from the dataset's schema to HPT's prompt-completion rows: luffy (alias openr1), verl, "
            "problem_solution or identity (alias none). None: detected from the columns."
        },
    )
    dataset_adapter_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options of the dataset adapter, e.g. '{\"drop_system_prompt\": true}' (a JSON string on the "
            "command line, a mapping in YAML)."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_verify"],
        metadata={
            "help": "Reward functions: names from trl_hpt.rewards.REWARD_FUNCS (math_verify, accuracy, format), "
            "exact_match, or dotted import paths such as my_module.my_reward. Weight them with reward_weights."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "The GGUF file inside model_name_or_path (a directory or Hub repository). It is converted once to "
            "a cached model directory and trained from there; a .gguf model_name_or_path needs no gguf_file."
        },
    )

    def __post_init__(self):
        if isinstance(self.dataset_adapter_options, str):
            self.dataset_adapter_options = json.loads(self.dataset_adapter_options)
        if isinstance(self.reward_funcs, str):  # a bare string in YAML
            self.reward_funcs = [self.reward_funcs]


# ------------------------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------------------------


def get_reward_registry() -> dict[str, Callable]:
    """
    Reward functions the command line knows by name: [`~trl_hpt.rewards.REWARD_FUNCS`] plus `exact_match`
    ([`~trl_hpt.rewards.exact_match_reward`], handy for toy tasks and tests).
    """
    from trl_hpt.rewards import REWARD_FUNCS, exact_match_reward

    return {"exact_match": exact_match_reward, **REWARD_FUNCS}


def resolve_reward_funcs(names: str | Sequence[str]) -> list[Callable]:
    """
    Turns reward names from a recipe into callables.

    Args:
        names (`str` or `list[str]`):
            Keys of [`get_reward_registry`] (case, and `-` versus `_`, do not matter) or dotted import paths
            (`package.module.function`, looked up from the current directory too, as TRL's scripts do).

    Returns:
        `list[Callable]`: The reward functions, in the order given.
    """
    from trl_hpt.rewards import get_reward_funcs

    names = [names] if isinstance(names, str) else list(names)
    # A reward module next to the recipe should work without installing it, as with `trl grpo`.
    if any("." in str(name) for name in names) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return get_reward_funcs(names, registry=get_reward_registry())


# ------------------------------------------------------------------------------------------------------------------
# Parsers
# ------------------------------------------------------------------------------------------------------------------


def make_parser(command: str, prog: str | None = None):
    """
    The [`~trl.TrlParser`] of one subcommand (`train`, `demo` or `eval`).

    `train` parses `(HPTScriptArguments, HPTConfig, ModelConfig)`, `demo` parses
    [`~trl_hpt.demo.DemoArguments`] and `eval` parses [`~trl_hpt.evaluation.EvalArguments`]; all accept `--config`.
    """
    from trl import TrlParser

    prog = prog or f"trl-hpt {command}"
    if command == "train":
        from trl import ModelConfig

        from trl_hpt.config import HPTConfig

        return TrlParser((HPTScriptArguments, HPTConfig, ModelConfig), prog=prog, description=_COMMANDS[command])
    if command == "demo":
        from trl_hpt.demo import DemoArguments

        return TrlParser((DemoArguments,), prog=prog, description=_COMMANDS[command])
    if command == "eval":
        from trl_hpt.evaluation import EvalArguments

        return TrlParser((EvalArguments,), prog=prog, description=_COMMANDS[command])
    raise ValueError(f"Unknown command {command!r}; use one of {sorted(_COMMANDS)}.")


# ------------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------------


def _hub_dataset_name(name: str | None) -> str | None:
    # The model card links the dataset on the Hub; a local file or directory has no page there.
    if name is None or Path(name).expanduser().exists():
        return None
    return name


def _resolve_gguf_model(model_name_or_path: str, gguf_file: str | None, model_init_kwargs: dict, training_args):
    """
    The model id to train from, and the loading options without `gguf_file`: a GGUF checkpoint becomes its cached
    model directory, because TRL loads the config and tokenizer of a model id without `gguf_file`, and a model
    loaded from GGUF neither trains nor saves. Anything else passes through unchanged.
    """
    from trl_hpt.models import resolve_gguf, resolve_model_init

    if gguf_file is not None:
        model_init_kwargs = {**model_init_kwargs, "gguf_file": gguf_file}
    if resolve_gguf(model_name_or_path, model_init_kwargs.get("gguf_file")) is None:
        return model_name_or_path, model_init_kwargs
    # One process converts while the others wait, then they all find the cached directory.
    with training_args.main_process_first(local=True, desc="GGUF conversion"):
        return resolve_model_init(model_name_or_path, model_init_kwargs)


def train(script_args: HPTScriptArguments, training_args, model_args):
    """
    Trains with [`~trl_hpt.HPTTrainer`] as `trl grpo` trains with `GRPOTrainer`, saves the model, the trainer state
    and a model card to `output_dir`, and pushes to the Hub when `push_to_hub` is set.

    Args:
        script_args ([`HPTScriptArguments`]):
            Dataset and reward settings.
        training_args ([`~trl_hpt.HPTConfig`]):
            The training configuration.
        model_args (`trl.ModelConfig`):
            Model id or path, dtype, attention implementation, revision, PEFT/LoRA and quantization settings.

    Returns:
        [`~trl_hpt.HPTTrainer`]: The trainer, after training.
    """
    from trl import get_peft_config, get_quantization_config

    from trl_hpt.adapters import load_hpt_dataset
    from trl_hpt.trainer import HPTTrainer

    if not model_args.model_name_or_path:
        raise ValueError("trl-hpt train needs a model: set `model_name_or_path` in the recipe or pass it as a flag.")
    if not script_args.dataset_name:
        raise ValueError(
            "trl-hpt train needs a dataset: set `dataset_name` (a Hub dataset or a local file/directory)."
        )

    # HPTTrainer loads the model from its id, so the loading options travel in model_init_kwargs; values the user
    # set there explicitly win. trust_remote_code is HPTConfig's own field (False unless asked for).
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    model_name_or_path, training_args.model_init_kwargs = _resolve_gguf_model(
        model_args.model_name_or_path, getattr(script_args, "gguf_file", None), model_init_kwargs, training_args
    )

    reward_funcs = resolve_reward_funcs(script_args.reward_funcs)
    dataset_options = dict(script_args.dataset_adapter_options or {})

    def load(split):
        return load_hpt_dataset(
            script_args.dataset_name,
            split=split,
            adapter=script_args.dataset_adapter,
            subset=script_args.dataset_config,
            streaming=script_args.dataset_streaming,
            **dataset_options,
        )

    train_dataset = load(script_args.dataset_train_split)
    eval_dataset = load(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None

    trainer = HPTTrainer(
        model=model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    # The log history (with the hpt/* metrics) next to the model, as transformers' example scripts keep it.
    trainer.save_state()
    dataset_name = _hub_dataset_name(script_args.dataset_name)
    model_name = Path(training_args.output_dir).name
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):  # transformers >= 5.18: close trackers and the process group
        trainer.end()
    return trainer


def _run_train(argv: list[str]) -> int:
    script_args, training_args, model_args = make_parser("train").parse_args_and_config(argv)
    train(script_args, training_args, model_args)
    return 0


def _run_demo(argv: list[str]) -> int:
    from trl_hpt.demo import run_demo

    (demo_args,) = make_parser("demo").parse_args_and_config(argv)
    run_demo(demo_args)
    return 0


def _run_eval(argv: list[str]) -> int:
    from trl_hpt import evaluation

    (eval_args,) = make_parser("eval").parse_args_and_config(argv)
    # run_eval prints its table and writes the JSON results itself.
    evaluation.run_eval(eval_args)
    return 0


def _run_convert_gguf(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-hpt convert-gguf",
        description=_COMMANDS["convert-gguf"] + " Prints the directory, for `--model_name_or_path $(...)`.",
    )
    parser.add_argument("model", help="A .gguf file, or a directory (or Hub id) holding one; see --gguf_file.")
    parser.add_argument(
        "--gguf_file", default=None, help="The GGUF file's name inside MODEL, when MODEL is a directory."
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Where to write the model. Default: a directory in the cache ($TRL_HPT_CACHE, else ~/.cache/trl_hpt), "
        "keyed by the file's path, size and modification time, so a second run returns at once.",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="Convert again even if the directory is up to date.")
    args = parser.parse_args(argv)

    from trl_hpt.models import convert_gguf

    try:
        directory = convert_gguf(
            args.model,
            gguf_file=args.gguf_file,
            output_dir=args.output_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(directory)
    return 0


_RUNNERS = {"train": _run_train, "demo": _run_demo, "eval": _run_eval, "convert-gguf": _run_convert_gguf}


def _top_level_parser() -> argparse.ArgumentParser:
    from trl_hpt import __version__

    parser = argparse.ArgumentParser(
        prog="trl-hpt",
        description="Hybrid Post-Training (HPT, arXiv:2509.04419) for TRL. Run `trl-hpt <command> --help` for the "
        "options of a command.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"trl-hpt {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="{" + ",".join(_COMMANDS) + "}")
    for name, help_text in _COMMANDS.items():
        # The subcommand's own TrlParser reads its flags (and its --help), so nothing heavy is built here.
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of the `trl-hpt` console script (and of `python -m trl_hpt.cli`).

    Args:
        argv (`list[str]`, *optional*):
            The arguments after the program name; `None` reads `sys.argv`.

    Returns:
        `int`: The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_level_parser()
    if not argv or argv[0] not in _COMMANDS:
        # Unknown commands and flags get argparse's usage error; no argument at all prints the help.
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
        return 0
    return _RUNNERS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
