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

import argparse
import random
import string
import time
import warnings
from dataclasses import dataclass


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_char_tokenizer(chat_template: bool = True):
    """
    A character-level `PreTrainedTokenizerFast` over printable ASCII, built in memory.

    `<|end|>` is both the end-of-turn and the EOS token; `<pad>` pads, on the left as GRPOTrainer requires. With
    `chat_template=True` it carries a minimal chat template whose assistant turn ends with `<|end|>`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters decode back to the exact text, without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        padding_side="left",
    )
    # The special tokens are whole words: keep the regex splitter from cutting them into characters.
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen2-architecture causal LM sized for CPU tests."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
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
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ------------------------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------------------------


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


def _completion_text(completion) -> str:
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    return str(completion)


def exact_match_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the completion, stripped, is exactly the solution."""
    return [float(_completion_text(c).strip() == str(s).strip()) for c, s in zip(completions, solution)]


@dataclass
class DemoArguments:
    """Settings of the embedded demo; the defaults finish in under a minute on 2 CPU cores."""

    output_dir: str = "trl-hpt-demo"
    seed: int = 0
    max_operand: int = 30
    warmup_problems: int = 400
    warmup_steps: int = 900
    hpt_steps: int = 200
    num_generations: int = 8
    prompts_per_step: int = 8
    learning_rate: float = 3e-3
    hpt_learning_rate: float = 1e-3
    eval_size: int = 80
    feedback: str = "switch"


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
    parser = argparse.ArgumentParser(description="Embedded HPT demo on a tiny model (CPU, no download).")
    defaults = DemoArguments()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    run_demo(DemoArguments(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
