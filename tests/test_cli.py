"""The `trl-hpt` command line: help, argument precedence, reward lookup, and a real `train` run on local files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from trl_hpt import cli
from trl_hpt.testing import save_char_model, save_tiny_model, write_luffy_jsonl


ROOT = Path(__file__).resolve().parents[1]
PAPER_RECIPE = ROOT / "examples" / "recipes" / "hpt_qwen2.5_math_7b.yaml"


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_char_model(root / "model"), write_luffy_jsonl(root / "train.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------------------------------


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "trl-hpt" in out
    for command in ("train", "demo", "eval"):
        assert command in out
    # No arguments at all prints the same help and succeeds.
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fly"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_form_help_does_not_import_torch():
    # `python -m trl_hpt.cli` is what `accelerate launch -m` runs; its top-level help stays light.
    code = (
        "import sys, runpy\n"
        "sys.argv = ['trl-hpt', '--help']\n"
        "try:\n"
        "    runpy.run_module('trl_hpt.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: trl-hpt" in result.stdout


@pytest.mark.parametrize(
    "command, flags",
    [
        ("train", ["--config", "--feedback", "--switch_gate", "--dataset_adapter", "--reward_funcs", "--use_peft"]),
        ("demo", ["--hpt_steps", "--feedback"]),
        ("eval", ["--model_name_or_path"]),
    ],
)
def test_subcommand_help(capsys, command, flags):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"trl-hpt {command}" in out
    for flag in flags:
        if flag != "--config":  # TrlParser handles --config itself, outside the dataclass flags
            assert flag in out, flag


def test_demo_and_eval_dispatch_their_parsed_arguments(monkeypatch, tmp_path):
    import trl_hpt.demo

    seen = {}
    monkeypatch.setattr(trl_hpt.demo, "run_demo", lambda args: seen.setdefault("demo", args))
    assert cli.main(["demo", "--hpt_steps", "3", "--feedback", "soft"]) == 0
    assert isinstance(seen["demo"], trl_hpt.demo.DemoArguments)
    assert (seen["demo"].hpt_steps, seen["demo"].feedback) == (3, "soft")

    from trl_hpt import evaluation

    monkeypatch.setattr(evaluation, "run_eval", lambda args: seen.setdefault("eval", args) and {})
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("model_name_or_path: some/model\nlimit: 2\n")
    assert cli.main(["eval", "--config", str(recipe), "--limit", "5"]) == 0
    assert isinstance(seen["eval"], evaluation.EvalArguments)
    assert (seen["eval"].model_name_or_path, seen["eval"].limit) == ("some/model", 5)


def test_demo_help_documents_every_flag(capsys):
    from dataclasses import fields

    from trl_hpt.demo import DemoArguments

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = "".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for field in fields(DemoArguments):
        help_text = field.metadata.get("help")
        assert help_text and "".join(help_text.split()) in out, field.name


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and rewards
# ---------------------------------------------------------------------------------------------------------------------


def test_command_line_overrides_the_recipe():
    parser = cli.make_parser("train")
    script_args, config, model_args = parser.parse_args_and_config(
        ["--config", str(PAPER_RECIPE), "--learning_rate", "1e-3", "--switch_gate", "0.5", "--bf16", "false"]
        + ["--use_cpu", "true", "--dataset_adapter_options", '{"drop_system_prompt": true}']
    )
    assert config.learning_rate == 1e-3 and config.switch_gate == 0.5  # from the command line
    assert config.demonstration_loss_coef == 1.0 and config.loss_type == "dr_grpo"  # from the recipe
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert script_args.dataset_adapter == "luffy"
    assert script_args.dataset_adapter_options == {"drop_system_prompt": True}


def test_unknown_recipe_key_is_refused(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: x\nbf16: false\nuse_cpu: true\nswitch_gaet: 0.5\n")
    with pytest.raises(ValueError, match="switch_gaet"):
        cli.make_parser("train").parse_args_and_config(["--config", str(recipe)])


def test_reward_lookup():
    from trl_hpt.demo import exact_match_reward
    from trl_hpt.rewards import REWARD_FUNCS

    registry = cli.get_reward_registry()
    assert registry["exact_match"] is exact_match_reward
    for name, func in REWARD_FUNCS.items():
        assert cli.resolve_reward_funcs([name]) == [func]
    assert cli.resolve_reward_funcs("Exact-Match") == [exact_match_reward]
    assert cli.resolve_reward_funcs(["trl_hpt.demo.exact_match_reward"]) == [exact_match_reward]
    with pytest.raises(ValueError, match="Unknown reward function 'nope'"):
        cli.resolve_reward_funcs(["nope"])


# ---------------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------------


class _FakeTrainer:
    """Stands in for HPTTrainer to see what `train` builds, without loading a model or reaching the Hub."""

    instances = []

    def __init__(self, model, reward_funcs, args, train_dataset, eval_dataset, peft_config, quantization_config):
        self.init = dict(locals())
        self.args = args
        self.calls = []
        self.hub_model_id = "someone/run"
        self.callback_handler = type("Handler", (), {"callbacks": []})()
        self.accelerator = type("Accelerator", (), {"print": staticmethod(lambda *a, **k: None)})()
        if args.hpt_report:  # as HPTTrainer.__init__ registers its report
            from trl_hpt.callbacks import HPTReportCallback

            self.add_callback(HPTReportCallback(self))
        _FakeTrainer.instances.append(self)

    def add_callback(self, callback):
        self.callback_handler.callbacks.append(callback)

    def __getattr__(self, name):
        if name in ("train", "save_model", "save_state", "create_model_card", "push_to_hub", "end"):
            return lambda *args, **kwargs: self.calls.append((name, args, kwargs))
        raise AttributeError(name)


def test_train_wires_model_dataset_peft_and_hub(monkeypatch, local_files, tmp_path):
    import trl_hpt.trainer
    from trl_hpt.callbacks import HPTReportCallback

    model_dir, data_file = local_files
    _FakeTrainer.instances = []
    monkeypatch.setattr(trl_hpt.trainer, "HPTTrainer", _FakeTrainer)
    argv = ["train", "--config", str(ROOT / "examples" / "recipes" / "hpt_lora.yaml")]
    argv += ["--model_name_or_path", model_dir, "--dataset_name", data_file, "--output_dir", str(tmp_path / "out")]
    argv += ["--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--report_to", "none"]
    argv += ["--push_to_hub", "true", "--hub_model_id", "someone/run", "--model_revision", "v1"]
    assert cli.main(argv) == 0

    (trainer,) = _FakeTrainer.instances
    assert trainer.init["model"] == model_dir  # loaded by HPTTrainer from its id, like `trl grpo`
    assert trainer.args.model_init_kwargs == {"revision": "v1", "attn_implementation": None, "dtype": "float32"}
    assert trainer.args.trust_remote_code is False
    assert [f.__name__ for f in trainer.init["reward_funcs"]] == ["math_verify_reward"]
    dataset = trainer.init["train_dataset"]
    assert {"prompt", "completion", "solution"} <= set(dataset.column_names)  # the luffy adapter ran
    assert trainer.init["eval_dataset"] is None
    peft_config = trainer.init["peft_config"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.target_modules) == (64, 128, "all-linear")
    assert any(isinstance(cb, HPTReportCallback) for cb in trainer.callback_handler.callbacks)
    names = [name for name, _, _ in trainer.calls]
    assert names == ["train", "save_model", "save_state", "create_model_card", "push_to_hub", "end"]
    card_kwargs = dict(trainer.calls[3][2])
    # A local dataset has no Hub page to link in the model card.
    assert card_kwargs == {"model_name": "out", "dataset_name": None}


def test_train_runs_a_recipe_on_local_files(local_files, tmp_path):
    model_dir, data_file = local_files
    out = tmp_path / "run"
    argv = ["train", "--config", str(PAPER_RECIPE), "--model_name_or_path", model_dir, "--dataset_name", data_file]
    argv += ["--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8"]
    argv += ["--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "8"]
    argv += ["--use_vllm", "false", "--bf16", "false", "--dtype", "float32", "--use_cpu", "true"]
    argv += ["--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"]
    argv += ["--disable_tqdm", "true", "--reward_funcs", "math_verify", "exact_match"]
    assert cli.main(argv) == 0

    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "hpt/sft_fraction" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert all(0.0 <= entry["hpt/sft_fraction"] <= 1.0 for entry in logged)
    card = ModelCard.load(out / "README.md")
    assert "hpt" in card.data.tags and "2509.04419" in card.text
    assert (out / "hpt_gate_history.jsonl").is_file() and (out / "hpt_report.json").is_file()


def test_eval_command_end_to_end_on_a_local_model(tmp_path, capsys):
    """`trl-hpt eval --limit 2` on a tiny local checkpoint: real loading, generation, scoring and the JSON file."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    output = tmp_path / "results.json"
    argv = ["eval", "--model_name_or_path", str(model_dir), "--benchmarks", "AIME24", "AMC23", "--limit", "2"]
    argv += ["--num_samples", "2", "--k", "1", "2", "--max_new_tokens", "4", "--output_file", str(output)]
    assert cli.main(argv) == 0
    results = json.loads(output.read_text())
    text = json.dumps(results)
    assert "AIME24" in text and "AMC23" in text and "pass@2" in text
    assert "AIME24" in capsys.readouterr().out  # the printed table
