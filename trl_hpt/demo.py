"""The embedded default run: HPT on a tiny model and a synthetic arithmetic task, on CPU, with nothing to download.

A character-level tokenizer and a tiny Qwen2-style model are built in memory. The task is `a+b=` for a, b < 30
(written fixed-width), split into disjoint held-out, warm-up and training problems. A short SFT on the warm-up
problems leaves the model at partial competence: it solves about half of the unseen sums, mostly those without a
carry. HPT then trains on the rest: prompts with at least one correct rollout go to RL, prompts no rollout solves are
learnt from their demonstrations. Held-out greedy accuracy is printed before and after, with the share of prompts
sent to SFT over training.

Run it with `trl-hpt demo` (or `python -m trl_hpt.demo`).
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field

from trl_hpt.rewards import exact_match_reward
from trl_hpt.testing import addition_rows, build_char_tokenizer, build_tiny_model


@dataclass
class DemoArguments:
    """Settings of the embedded demo (`trl-hpt demo --help` lists them); the defaults finish in under a minute on 2
    CPU cores."""

    output_dir: str = field(default="trl-hpt-demo", metadata={"help": "Where the trainer writes its outputs."})
    seed: int = field(default=0, metadata={"help": "Seed of the problem split, the model and the training."})
    max_operand: int = field(default=30, metadata={"help": "Problems are a+b= for a, b < max_operand."})
    warmup_problems: int = field(default=400, metadata={"help": "Problems of the warm-up SFT, before HPT."})
    warmup_steps: int = field(default=900, metadata={"help": "Steps of the warm-up SFT (batches of 32)."})
    hpt_steps: int = field(default=200, metadata={"help": "Optimizer steps of HPT."})
    num_generations: int = field(default=8, metadata={"help": "Rollouts per prompt."})
    prompts_per_step: int = field(default=8, metadata={"help": "Prompts per HPT step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Learning rate of the warm-up SFT."})
    hpt_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of HPT."})
    eval_size: int = field(default=80, metadata={"help": "Held-out problems, scored before and after HPT."})
    feedback: str = field(
        default="switch", metadata={"help": "HPT's feedback strategy, as HPTConfig.feedback (switch, soft, rl...)."}
    )


def split_problems(seed: int, max_operand: int, eval_size: int, warmup_problems: int):
    """Held-out problems, warm-up problems (SFT before HPT) and HPT's training problems, all disjoint."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    rng.shuffle(pairs)
    held_out = pairs[:eval_size]
    warmup = pairs[eval_size : eval_size + warmup_problems]
    train = pairs[eval_size + warmup_problems :]
    return warmup, train, held_out


def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int = 4) -> float:
    """Share of rows whose greedy completion is exactly the solution."""
    import torch

    model.eval()
    prompts = [r["prompt"] for r in rows]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].size(1) :], skip_special_tokens=True)
    return sum(exact_match_reward(texts, [r["solution"] for r in rows])) / len(rows)


def warm_start(model, tokenizer, pairs, steps: int, lr: float, seed: int):
    """A short SFT on `pairs`: cross-entropy on the answer and EOS, the prompt as context."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(32)]
        rows = addition_rows(batch)  # the same fixed-width format HPT trains and evaluates on
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
        answers = [
            tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in rows
        ]
        width = max(len(p) + len(c) for p, c in zip(prompts, answers))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, answers)):
            seq = p + c
            ids[i, width - len(seq) :] = torch.tensor(seq)
            labels[i, width - len(c) :] = torch.tensor(c)
            attention[i, width - len(seq) :] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def run_demo(args: DemoArguments | None = None) -> dict:
    """Warm-starts a tiny model, trains it with HPTTrainer, and returns accuracies and the SFT fraction per step."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from trl_hpt import HPTConfig, HPTTrainer

    args = args or DemoArguments()
    # transformers' deprecation notices about its own internals are noise in a demo's output
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.time()
    # Tiny matrices gain nothing from more threads, and spare cores keep the run fast on a shared machine.
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer(chat_template=False)
    model = build_tiny_model(tokenizer, seed=args.seed)
    warmup, train_pairs, held_out_pairs = split_problems(
        args.seed, args.max_operand, args.eval_size, args.warmup_problems
    )
    held_out = addition_rows(held_out_pairs)
    # A short SFT on part of the problems: the model ends up solving some unseen sums but not others.
    warm_start(model, tokenizer, warmup, args.warmup_steps, args.learning_rate, args.seed)
    before = greedy_accuracy(model, tokenizer, held_out)
    print(f"[demo] warm start done in {time.time() - start:.0f}s: held-out accuracy {before:.2f}")

    history = []

    class Recorder(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "hpt/sft_fraction" in logs:
                history.append(
                    {
                        "step": state.global_step,
                        "sft_fraction": logs["hpt/sft_fraction"],
                        "prompt_accuracy": logs["hpt/prompt_accuracy"],
                    }
                )

    config = HPTConfig(
        output_dir=args.output_dir,
        feedback=args.feedback,
        learning_rate=args.hpt_learning_rate,
        max_steps=args.hpt_steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=4,
        temperature=1.0,
        loss_type="dr_grpo",
        scale_rewards="none",
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        log_level="warning",
        hpt_report=True,
    )
    trainer = HPTTrainer(
        model=model,
        reward_funcs=exact_match_reward,
        args=config,
        train_dataset=Dataset.from_list(addition_rows(train_pairs)),
        processing_class=tokenizer,
        callbacks=[Recorder()],
    )
    trainer.remove_callback(PrinterCallback)  # the per-step dicts; the summary below is what the demo shows
    trainer.train()
    after = greedy_accuracy(model, tokenizer, held_out)
    elapsed = time.time() - start
    print("[demo] share of prompts sent to SFT (no rollout correct) and rollout accuracy, averaged over windows:")
    window = max(1, len(history) // 8)
    for i in range(0, len(history), window):
        part = history[i : i + window]
        sft = sum(r["sft_fraction"] for r in part) / len(part)
        accuracy = sum(r["prompt_accuracy"] for r in part) / len(part)
        print(
            f"  steps {part[0]['step']:3d}-{part[-1]['step']:3d}  sft_fraction {sft:.2f}  rollout accuracy {accuracy:.2f}"
        )
    print(f"[demo] held-out greedy accuracy {before:.2f} -> {after:.2f} ({len(held_out)} problems); {elapsed:.0f}s")
    return {"before": before, "after": after, "history": history, "seconds": elapsed}


def main(argv=None):
    """`python -m trl_hpt.demo`: the same flags as `trl-hpt demo`."""
    from trl_hpt.cli import make_parser

    (args,) = make_parser("demo", prog="python -m trl_hpt.demo").parse_args_and_config(argv)
    run_demo(args)


if __name__ == "__main__":
    main()
