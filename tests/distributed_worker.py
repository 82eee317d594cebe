"""The script each process runs in the multi-process tests (`tests/test_distributed.py`).

    torchrun --nproc_per_node 2 tests/distributed_worker.py --output DIR --cases '[{...}, ...]'
    python tests/distributed_worker.py --output DIR --cases '[{...}, ...]'   # the 1-process reference

Each case trains a tiny model for a few SGD steps with [`~trl_hpt.HPTTrainer`] and writes, under `DIR/<name>/`,
`params.pt` (initial and final parameters, rank 0) and `rank<k>.json` (what rank `k` computed at every step: the
per-prompt accuracy and gate weights, and its local rows' placement, weights and normalisers).

The runs are reproducible across process counts: the model is seeded identically on every rank, the data order comes
from GRPOTrainer's seeded sampler, and generation is a deterministic `rollout_func` whose completion depends only on
the prompt and the row's slot in its group (its global position modulo `num_generations`), so a 1-process run with
the per-device batch doubled sees exactly the rollouts of a 2-process run. SGD without clipping keeps float-level
gradient differences float-level in the parameters (AdamW would amplify them to the size of the learning rate).

Case keys: `name`, `mode` (`switch`, `soft_luffy` or `rl`), `loss_type`, `per_device_batch`, `num_generations`,
`steps`, `solved` (`mixed`: some prompts are never solved and others partly; `none`: no prompt is ever solved) and,
optionally, `demonstration_aggregation` and `reward_model` (add a tiny reward model, weight 0, whose forwards each rank
counts: a rank that runs fewer than another would hang a sharded reward model).
"""

import argparse
import json
import os
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is flagged experimental by TRL

import torch  # noqa: E402


# The checkout's package first, whichever way the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl_hpt.batch import HPTRows, hpt_rows
from trl_hpt.testing import addition_rows, build_char_tokenizer, build_tiny_model, tiny_model, train_args  # noqa: E402


ROWS = addition_rows([(a, b) for a in range(1, 5) for b in range(1, 5)])
# Correct rollouts per group for each row (with `solved="mixed"`): 0 sends the prompt to SFT under `switch`. Chosen
# so that, in the sampler's order for seed 0, gated groups land on either rank, including groups that span ranks.
NUM_CORRECT = [1, 2, 0, 3, 1, 0, 2, 0, 0, 3, 0, 1, 2, 0, 1, 2]
ROW_OF_PROMPT = {row["prompt"]: i for i, row in enumerate(ROWS)}


def correct_slots(prompt: str, solved: str, num_generations: int) -> int:
    """How many rollouts of the prompt's group are correct: 0 sends the prompt to SFT under `switch`."""
    if solved == "none":
        return 0
    return min(NUM_CORRECT[ROW_OF_PROMPT[prompt]], num_generations - 1)


def completion_text(prompt: str, slot: int, solved: str, num_generations: int) -> str:
    """The deterministic rollout for `slot` of the prompt's group: the answer for the first slots, else wrong."""
    index = ROW_OF_PROMPT[prompt]
    answer = ROWS[index]["solution"]
    if slot < correct_slots(prompt, solved, num_generations):
        return answer
    # Wrong answers of different lengths and contents, so rewards, advantages and token counts all vary.
    return str(int(answer) + slot + 1) + "x" * ((index + slot) % 3)


def make_rollout_func(solved: str):
    def rollout_func(prompts, trainer):
        # The local rows are the slice [rank * n, (rank + 1) * n) of the generation batch.
        num_generations = trainer.num_generations
        start = trainer.accelerator.process_index * len(prompts)
        tokenizer = trainer.processing_class
        prompt_ids, completion_ids, logprobs = [], [], []
        for i, prompt in enumerate(prompts):
            text = completion_text(prompt, (start + i) % num_generations, solved, num_generations)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            prompt_ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            completion_ids.append(ids)
            logprobs.append([-1.0] * len(ids))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout_func


def reward(completions, solution, **kwargs):
    """1 for the exact answer, otherwise a value in [0, 0.9) that differs between almost any two completions."""
    values = []
    for completion, answer in zip(completions, solution):
        text = str(completion).replace(" ", "")  # tokenizers without a Fuse decoder put spaces between characters
        if text == answer:
            values.append(1.0)
        else:
            values.append(0.9 * (sum(ord(c) * (i + 1) for i, c in enumerate(text)) % 97) / 97)
    return values


def build_trainer(case: dict, output_dir: str):
    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_hpt import HPTTrainer

    mode = case["mode"]
    feedback = {"switch": "switch", "soft_luffy": "soft", "rl": "rl"}[mode]
    # train_args: SGD without clipping, constant learning rate, CPU, seed 0, no saving, logging every step.
    config = train_args(
        output_dir,
        feedback=feedback,
        demonstration_loss="luffy" if mode == "soft_luffy" else "sft",
        demonstration_aggregation=case.get("demonstration_aggregation"),
        imitation_guard=case.get("imitation_guard", False),
        imitation_guard_rate=0.3,
        style_gate=case.get("style_gate", False),
        loss_type=case["loss_type"],
        per_device_train_batch_size=case["per_device_batch"],
        num_generations=case["num_generations"],
        max_completion_length=8,
        max_steps=case["steps"],
        learning_rate=0.1,
        beta=0.0,
        log_level="error",
        # A rank left out of a collective fails the run in minutes instead of gloo's default 30.
        ddp_timeout=120,
    )
    tokenizer = build_char_tokenizer(chat_template=False)
    model = tiny_model(tokenizer)
    rows = ROWS
    if case.get("style_gate"):  # demonstrations written unlike the correct rollouts, so that the style gap is not 0
        rows = [{**row, "completion": " ".join(row["completion"])} for row in ROWS]
    reward_funcs, reward_processing_classes, forwards = reward, None, []
    if case.get("reward_model"):
        from transformers import AutoModelForSequenceClassification

        config.reward_weights = [1.0, 0.0]
        scorer_config = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=1).config
        scorer_config.num_labels = 1
        scorer = AutoModelForSequenceClassification.from_config(scorer_config)
        scorer.register_forward_pre_hook(lambda module, args: forwards.append(1))
        reward_funcs, reward_processing_classes = [reward, scorer], [None, tokenizer]
    trainer = HPTTrainer(
        model=model,
        reward_funcs=reward_funcs,
        reward_processing_classes=reward_processing_classes,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        rollout_func=make_rollout_func(case["solved"]),
    )
    trainer.remove_callback(PrinterCallback)  # the logs are in the records; keep the test's output short
    trainer.reward_model_forwards = forwards
    return trainer


def record_steps(trainer) -> list[dict]:
    """
    Wraps (on this instance only) the two methods where the gate is decided, to keep what this rank computed.

    `_record_gate` receives the per-prompt accuracy, alpha, beta and placement every rank computed from gathered
    rewards (the trainer keeps them only on the main process); `_mix_demonstrations` returns this rank's rows.
    """
    steps: list[dict] = []
    pending: dict = {}
    original_record = trainer._record_gate
    original_mix = trainer._mix_demonstrations

    def _record_gate(demos, accuracy, decision, num_generations):
        pending.update(
            accuracy=accuracy.tolist(),
            alpha=decision.alpha.tolist(),
            beta=decision.beta.tolist(),
            placed=decision.placed.bool().tolist(),
        )
        return original_record(demos, accuracy, decision, num_generations)

    def _mix_demonstrations(output, inputs, demos, *args):
        output = original_mix(output, inputs, demos, *args)
        mask = output["completion_mask"]
        # A batch with nothing of HPT's in it is GRPOTrainer's own, without the HPT key.
        rows = hpt_rows(output) or HPTRows(torch.zeros(mask.size(0), dtype=torch.bool), torch.ones(mask.size(0)), 0, 0)
        steps.append(
            {
                "step": trainer.state.global_step,
                **pending,
                "row_index": [d.index for d in demos] if demos is not None else [],
                "demonstration": rows.demonstration.tolist(),
                "weight": rows.weights.tolist(),
                "advantages": output["advantages"].tolist(),
                "tokens": mask.sum(-1).tolist(),
                "completions": [ids[m.bool()].tolist() for ids, m in zip(output["completion_ids"], mask)],
                "num_items_in_batch": float(output["num_items_in_batch"]),
                "token_mean_tokens": float(rows.separate_tokens),
            }
        )
        pending.clear()
        return output

    trainer._record_gate = _record_gate
    trainer._mix_demonstrations = _mix_demonstrations
    return steps


def run_case(case: dict, output: Path) -> None:
    case_dir = output / case["name"]
    case_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(case, str(case_dir / "trainer"))
    rank = trainer.accelerator.process_index
    model = trainer.model
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    steps = record_steps(trainer)
    trainer.train()
    final = {
        name: p.detach().clone() for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
    }
    logs = [h for h in trainer.state.log_history if "loss" in h]
    record = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "steps": steps,
        "logs": logs,
        "reward_model_forwards": len(trainer.reward_model_forwards),
    }
    (case_dir / f"rank{rank}.json").write_text(json.dumps(record))
    if trainer.accelerator.is_main_process:
        torch.save({"initial": initial, "final": final}, case_dir / "params.pt")
    trainer.accelerator.wait_for_everyone()
    print(f"[rank {rank}] case {case['name']}: {trainer.state.global_step} steps done", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="Directory for parameters and gate records.")
    parser.add_argument("--cases", required=True, help="JSON list of cases (keys: see the module docstring).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for case in json.loads(args.cases):
        run_case(case, args.output)


if __name__ == "__main__":
    main()
