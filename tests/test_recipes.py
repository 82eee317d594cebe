"""The recipes in examples/recipes/: they parse through the CLI's parser, the paper recipe carries the paper's numbers,
and each one trains on a tiny local model with its own algorithm settings. The quickstart stays a quickstart."""

import ast
import json
from pathlib import Path

import pytest
import yaml
from accelerate.utils import is_peft_model

from trl_hpt import HPTConfig, cli
from trl_hpt.testing import save_char_model, save_tiny_model, write_luffy_jsonl


ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "examples" / "recipes"
RECIPES = sorted(path.name for path in RECIPES_DIR.glob("*.yaml"))
CPU_RECIPE = "hpt_cpu_small.yaml"
# The others are written for GPUs; parsing them on a CPU-only machine needs these (TrainingArguments checks bf16).
GPU_RECIPES = [name for name in RECIPES if name != CPU_RECIPE]
CPU = ["--bf16", "false", "--use_cpu", "true"]
GPUS = 8  # the recipes' batch arithmetic is written for 8 GPUs (one machine)


def parse(name, *overrides):
    return cli.make_parser("train").parse_args_and_config(["--config", str(RECIPES_DIR / name), *CPU, *overrides])


def raw(name):
    return yaml.safe_load((RECIPES_DIR / name).read_text())


def prompts_per_step(config, num_processes):
    completions = config.per_device_train_batch_size * num_processes * config.gradient_accumulation_steps
    return completions / config.num_generations


def test_every_recipe_is_there():
    assert RECIPES == [
        "grpo.yaml",
        "hpt_cpu_small.yaml",
        "hpt_llama3.1_8b.yaml",
        "hpt_lora.yaml",
        "hpt_qwen2.5_math_1.5b.yaml",
        "hpt_qwen2.5_math_7b.yaml",
        "luffy.yaml",
    ]


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_recipe_parses_with_the_cli_parser(name):
    script_args, config, model_args = parse(name)
    assert isinstance(script_args, cli.HPTScriptArguments) and isinstance(config, HPTConfig)
    assert type(model_args).__name__ == "ModelConfig"
    assert script_args.dataset_name == "Elliott/Openr1-Math-46k-8192" and script_args.dataset_adapter == "luffy"
    assert cli.resolve_reward_funcs(script_args.reward_funcs)  # every reward name resolves
    # Every recipe runs bf16 with vLLM generation on GPUs, 1 update per batch, constant learning rate.
    values = raw(name)
    assert values["bf16"] is True and model_args.dtype == "bfloat16"
    assert config.use_vllm and config.vllm_mode == "colocate" and config.num_iterations == 1
    assert config.lr_scheduler_type == "constant"
    # 128 prompts per optimizer step: on 8 GPUs, or on one GPU for the single-GPU LoRA recipe.
    assert prompts_per_step(config, 1 if name == "hpt_lora.yaml" else GPUS) == 128
    # Flags given after the file win over it.
    _, overridden, _ = parse(name, "--learning_rate", "0.5", "--max_steps", "3")
    assert overridden.learning_rate == 0.5 and overridden.max_steps == 3


def test_paper_recipe_has_the_papers_numbers():
    """The paper's reference recipe for Qwen2.5-Math-7B."""
    script_args, config, model_args = parse("hpt_qwen2.5_math_7b.yaml")
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert script_args.dataset_name == "Elliott/Openr1-Math-46k-8192" and script_args.dataset_adapter == "luffy"
    assert script_args.reward_funcs == ["math_verify"]
    assert (config.feedback, config.switch_gate, config.num_generations) == ("switch", 0.0, 8)
    assert (config.demonstration_loss_coef, config.demonstration_loss) == (1.0, "sft")
    assert (config.scale_rewards, config.loss_type, config.num_iterations) == ("none", "dr_grpo", 1)
    assert config.beta == 0.0 and config.entropy_coef == 0.001
    assert config.learning_rate == 5e-6 and config.max_steps == 500
    assert prompts_per_step(config, GPUS) == 128
    assert config.temperature == 1.0 and config.max_completion_length == 8192
    # The reference clips gradients at 1.0 (actor.grad_clip); its "max_grad_norm=80" skips steps whose norm exceeds 80.
    assert config.max_grad_norm == 1.0 and config.skip_grad_norm_above == 80.0
    # The reference's loss arithmetic exactly (tests/test_reference_fidelity.py): no clip, no division by rows.
    assert (config.demonstration_aggregation, config.rl_aggregation) == ("token_mean", "max_length_sum")
    assert config.epsilon >= 1.0
    assert raw("hpt_qwen2.5_math_7b.yaml")["bf16"] is True
    assert config.use_vllm and config.vllm_mode == "colocate"
    assert config.logging_steps == 1 and config.save_steps == 50 and config.report_to == ["wandb"]
    assert not config.push_to_hub


def test_variants_differ_from_the_paper_recipe_where_the_paper_says():
    base = vars(parse("hpt_qwen2.5_math_7b.yaml")[1])
    _, small, small_model = parse("hpt_qwen2.5_math_1.5b.yaml")
    assert small_model.model_name_or_path == "Qwen/Qwen2.5-Math-1.5B" and small.demonstration_loss_coef == 0.3

    _, llama, llama_model = parse("hpt_llama3.1_8b.yaml")
    # The reference trains the base model with a gate of 2 correct rollouts out of 8 (exp_scripts/train_llama.sh).
    assert llama_model.model_name_or_path == "meta-llama/Llama-3.1-8B" and llama.switch_gate == 2 / 8

    _, lora, lora_model = parse("hpt_lora.yaml")
    assert lora_model.use_peft and (lora_model.lora_r, lora_model.lora_alpha) == (64, 128)
    assert lora_model.lora_target_modules == "all-linear"  # ModelConfig turns a one-item list into the string
    assert 1e-5 <= lora.learning_rate <= 5e-5 and lora_model.model_name_or_path == "Qwen/Qwen2.5-Math-1.5B"

    _, luffy, _ = parse("luffy.yaml")
    assert (luffy.feedback, luffy.demonstration_loss, luffy.demonstration_shaping_gamma) == ("soft", "luffy", 0.1)
    _, grpo, _ = parse("grpo.yaml")
    assert grpo.feedback == "rl"
    for config in (small, llama, luffy, grpo):
        for field in ("loss_type", "scale_rewards", "entropy_coef", "num_iterations", "max_completion_length"):
            assert getattr(config, field) == base[field], field


# ---------------------------------------------------------------------------------------------------------------------
# Each recipe trains, tiny
# ---------------------------------------------------------------------------------------------------------------------


def first_rollout_correct(completions, **kwargs):
    """Rollout 0 of the batch is correct, nothing else: the first prompt has P = 1/4, the second P = 0."""
    return [1.0 if i == 0 else 0.0 for i in range(len(completions))]


# With 2 prompts per step at P = 1/4 and P = 0, the share sent to SFT tells the recipe's gate apart.
EXPECTED_SFT_FRACTION = {
    "hpt_qwen2.5_math_7b.yaml": 0.5,  # switch, gate 0: only the unsolved prompt
    "hpt_qwen2.5_math_1.5b.yaml": 0.5,
    "hpt_lora.yaml": 0.5,
    "hpt_llama3.1_8b.yaml": 1.0,  # switch, gate 2/8: both
    "luffy.yaml": 1.0,  # soft: every prompt with a demonstration
    "grpo.yaml": 0.0,  # rl: none
}


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return save_char_model(root / "model"), write_luffy_jsonl(root / "train.jsonl")


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_recipe_trains_a_tiny_model_with_its_algorithm(name, local_files, tmp_path, monkeypatch):
    model_dir, data_file = local_files
    registry = cli.get_reward_registry()
    monkeypatch.setattr(
        cli, "get_reward_registry", lambda: {**registry, "first_rollout_correct": first_rollout_correct}
    )
    rewards = [*raw(name)["reward_funcs"], "first_rollout_correct"]  # the recipe's rewards still run
    script_args, config, model_args = parse(
        name,
        *["--model_name_or_path", model_dir, "--dataset_name", data_file, "--output_dir", str(tmp_path)],
        *["--max_steps", "1", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"],
        *["--num_generations", "4", "--max_completion_length", "12", "--use_vllm", "false", "--dtype", "float32"],
        *["--report_to", "none", "--push_to_hub", "false", "--save_strategy", "no", "--logging_steps", "1"],
        *["--gradient_checkpointing", "false", "--disable_tqdm", "true", "--reward_funcs", *rewards],
    )
    values = raw(name)
    for field in (
        "feedback",
        "switch_gate",
        "demonstration_loss",
        "demonstration_loss_coef",
        "loss_type",
        "scale_rewards",
    ):
        if field in values:
            assert getattr(config, field) == values[field], field

    trainer = cli.train(script_args, config, model_args)

    assert is_peft_model(trainer.model) == bool(values.get("use_peft", False))
    (log,) = [entry for entry in trainer.state.log_history if "hpt/sft_fraction" in entry]
    assert log["hpt/prompt_accuracy"] == pytest.approx(1 / 8)
    assert log["hpt/sft_fraction"] == EXPECTED_SFT_FRACTION[name]
    assert (tmp_path / "README.md").is_file() and (tmp_path / "trainer_state.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The CPU recipe runs as is
# ---------------------------------------------------------------------------------------------------------------------


def test_cpu_recipe_needs_no_override_but_the_model(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its data file relative to the repository root, where it is run
    # Parsed without the CPU flags the GPU recipes need: the file sets them itself.
    script_args, config, model_args = cli.make_parser("train").parse_args_and_config(
        ["--config", str(RECIPES_DIR / CPU_RECIPE)]
    )
    values = raw(CPU_RECIPE)
    assert values["bf16"] is False and config.use_cpu and not config.use_vllm and config.report_to == []
    assert model_args.dtype == "float32" and not config.gradient_checkpointing
    assert config.num_generations <= 4 and config.gradient_accumulation_steps <= 2
    assert config.max_completion_length <= 256 and not config.push_to_hub
    assert (config.feedback, config.switch_gate, config.demonstration_loss) == ("switch", 0.0, "sft")
    # The data is a local file of the repository, read demonstration by its adapter.
    data = Path(script_args.dataset_name)
    assert not data.is_absolute() and data.is_file() and script_args.dataset_adapter == "problem_solution"
    assert cli.resolve_reward_funcs(script_args.reward_funcs)


def test_cpu_recipe_trains_two_steps_through_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    # The tiny model of the evaluation tests: a chat template, and positions for prompt + 128 completion tokens.
    model_dir = save_tiny_model(tmp_path / "tiny-model")
    out = tmp_path / "run"
    argv = ["train", "--config", str(RECIPES_DIR / CPU_RECIPE), "--model_name_or_path", model_dir]
    assert cli.main([*argv, "--output_dir", str(out), "--max_steps", "2"]) == 0

    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "hpt/sft_fraction" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    # A random model solves nothing: every prompt goes to SFT on the shipped worked solutions.
    assert all(entry["hpt/sft_fraction"] == 1.0 and entry["hpt/no_demo_fraction"] == 0.0 for entry in logged)
    assert (out / "model.safetensors").is_file() and (out / "hpt_report.json").is_file()
    report = json.loads((out / "hpt_report.json").read_text())
    prompts_per_step = 8 * 2 // 4  # per_device_train_batch_size x gradient_accumulation_steps / num_generations
    assert report["num_records"] == 2 * prompts_per_step


# ---------------------------------------------------------------------------------------------------------------------
# Quickstart
# ---------------------------------------------------------------------------------------------------------------------


def test_quickstart_is_short_and_compiles():
    path = ROOT / "examples" / "quickstart.py"
    source = path.read_text()
    compile(source, str(path), "exec")
    assert len([line for line in source.splitlines() if line.strip()]) <= 15
    names = {
        node.attr if isinstance(node, ast.Attribute) else node.id
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Name, ast.Attribute))
    }
    assert {"HPTTrainer", "load_hpt_dataset", "REWARD_FUNCS", "push_to_hub"} <= names
    assert 'adapter="luffy"' in source and '"math_verify"' in source
