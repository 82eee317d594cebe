"""The embedded demo (the README's first command) runs HPTTrainer for real, on a short budget here."""

from trl_hpt.demo import DemoArguments, run_demo, split_problems


def test_demo_runs_hpt_and_reports(tmp_path):
    result = run_demo(DemoArguments(output_dir=str(tmp_path), warmup_steps=30, hpt_steps=3, eval_size=16))
    assert [r["step"] for r in result["history"]] == [1, 2, 3]
    assert all(0.0 <= r["sft_fraction"] <= 1.0 for r in result["history"])
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
    assert (tmp_path / "hpt_gate_history.jsonl").exists() and (tmp_path / "hpt_report.png").exists()


def test_demo_problem_sets_are_disjoint():
    warmup, train, held_out = split_problems(seed=0, max_operand=30, eval_size=80, warmup_problems=400)
    assert len(held_out) == 80 and len(warmup) == 400 and len(train) == 900 - 480
    assert not (set(warmup) & set(train)) and not (set(held_out) & (set(warmup) | set(train)))
