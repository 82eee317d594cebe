"""How strongly the demonstration (SFT) term pulls against the RL term, per `loss_type` and `demonstration_aggregation`.

For one generation batch shaped like a step of HPT (prompts, `num_generations` rollouts each of up to
`max_completion_length` tokens, a quarter of the prompts never solved and sent to SFT), the script computes the
gradient norm of each term alone (the other's rows at weight zero) and prints their ratio, `|grad SFT| / |grad RL|`.
With Adam and gradient clipping only the direction of the summed gradient counts, so this ratio, not `demonstration_loss_coef`
alone, says how much the demonstrations steer a step. A ratio of 100 means the RL term is noise next to the SFT term.

    python benchmarks/balance.py                  # the table, in a few minutes on 2 CPU cores
    python benchmarks/balance.py --json out.json  # and the numbers
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    generation_inputs,
    machine_info,
    setup_environment,
    write_json,  # noqa: E402
)
from benchmarks.report import machine_line, markdown_table  # noqa: E402


LOSS_TYPES = ("dapo", "dr_grpo", "grpo", "bnpo", "cispo")
AGGREGATIONS = ("token_mean", "loss_type", "reference")


def _reward(num_generations: int):
    # By slot: the first prompt of every four is never solved (SFT under switch), the others partly.
    def reward(prompts, completions, **kwargs):
        values = []
        for i, _ in enumerate(prompts):
            group, slot = divmod(i, num_generations)
            values.append(0.0 if group % 4 == 0 else float(slot < 1 + group % 3) + 0.1 * slot)
        return values

    return reward


def measure(loss_type: str, aggregation: str, args) -> float:
    import torch
    from datasets import Dataset

    from trl_hpt import HPTConfig, HPTTrainer
    from trl_hpt.batch import hpt_rows, replace_rows
    from trl_hpt.testing import addition_rows, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer(chat_template=False)
    rows = addition_rows([(a, (7 * a) % 50) for a in range(args.prompts)])
    fields = {"demonstration_aggregation": aggregation}
    if aggregation == "reference":
        fields = {"demonstration_aggregation": "token_mean", "rl_aggregation": "max_length_sum"}
    with tempfile.TemporaryDirectory() as tmp:
        config = HPTConfig(
            output_dir=tmp,
            feedback="switch",
            loss_type=loss_type,
            per_device_train_batch_size=args.prompts * args.generations,
            num_generations=args.generations,
            max_completion_length=args.max_length,
            temperature=1.0,
            report_to="none",
            bf16=False,
            use_cpu=True,
            seed=0,
            **fields,
        )
        trainer = HPTTrainer(
            model=build_tiny_model(tokenizer, hidden_size=64, num_layers=2, seed=0),
            reward_funcs=_reward(args.generations),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    torch.manual_seed(0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions(generation_inputs(trainer, args.prompts, args.generations))
    rows = hpt_rows(batch)
    norms = {}
    for term, keep in (("rl", ~rows.demonstration), ("sft", rows.demonstration)):
        partial = replace_rows(batch, weights=rows.weights * keep)
        trainer.model.zero_grad(set_to_none=True)
        trainer._compute_loss(trainer.model, partial).backward()
        grads = [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]
        norms[term] = float(torch.cat(grads).norm())
    return norms["sft"] / max(norms["rl"], 1e-12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64, help="max_completion_length (rollouts run to it)")
    parser.add_argument("--json", type=Path, help="Also write the ratios here.")
    args = parser.parse_args(argv)
    setup_environment()
    ratios = {lt: {agg: measure(lt, agg, args) for agg in AGGREGATIONS} for lt in LOSS_TYPES}
    headers = ["loss_type", "token_mean", "loss_type", "reference (token_mean + max_length_sum)"]
    table = markdown_table(headers, [[lt, *(f"{ratios[lt][a]:.3g}" for a in AGGREGATIONS)] for lt in LOSS_TYPES])
    print(
        f"|grad SFT term| / |grad RL term|, {args.prompts} prompts x {args.generations} rollouts of up to "
        f"{args.max_length} tokens, {args.prompts // 4} prompts sent to SFT (demonstrations of ~4 tokens)\n"
    )
    print(table)
    print("\n" + machine_line(machine_info()))
    if args.json:
        write_json(args.json, {"ratios": ratios, "settings": vars(args) | {"json": str(args.json)}})


if __name__ == "__main__":
    main()
