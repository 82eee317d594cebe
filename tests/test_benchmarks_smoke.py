"""The benchmark scripts: their pure helpers (fast) and a `--quick` run of each (slow, kept out of the default run)."""

import json
import math
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import summarize  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from trl_hpt.evaluation import pass_at_k  # noqa: E402


def _pass_at_k_by_enumeration(n, c, k):
    """The definition: the share of k-subsets of the n samples that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_pass_at_k_matches_its_definition(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 5, 4) == 1.0  # fewer than k wrong samples: every k-subset holds a correct one
    # No overflow where the binomials are astronomically large.
    assert 0.0 < pass_at_k(2000, 1, 1000) <= 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_markdown_table_and_summary():
    table = markdown_table(["method", "acc"], [["a|b", 1.5], ["c", 2]])
    assert table.splitlines() == ["| method | acc |", "|:---|---:|", "| a\\|b | 1.5 |", "| c | 2 |"]
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [[1]])
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["std"] == pytest.approx(1.0)
    assert math.isnan(summarize([])["median"])


def test_learning_task_split_is_disjoint_and_warm_start_has_no_carry():
    from benchmarks.learning import answer_text, has_carry, prompt_text, task_rows, task_split

    split = task_split(50, 128)
    held, train, warm = map(set, (split["held_out"], split["train"], split["warm_start"]))
    assert len(held) == 128 and not held & train and len(held | train) == 50 * 50
    assert warm <= train and not any(has_carry(*p) for p in warm)
    assert any(has_carry(*p) for p in held) and any(not has_carry(*p) for p in held)
    # Fixed width: no prompt needs padding, every answer has the same length.
    assert {len(prompt_text(a, b)) for a, b in train} == {6}
    assert {len(answer_text(a, b)) for a, b in train} == {2}
    assert task_rows([(7, 45)]) == [{"prompt": "07+45=", "completion": "52", "solution": "52"}]
    assert task_split(50, 128) == split  # the split does not depend on the seed of a run
    # A validation split comes out of the post-training prompts and leaves the held-out problems as they were.
    with_validation = task_split(50, 128, validation=64)
    valid = set(with_validation["validation"])
    assert with_validation["held_out"] == split["held_out"] and len(valid) == 64
    assert not valid & set(with_validation["train"]) and valid | set(with_validation["train"]) == train


RESULTS = ROOT / "benchmarks" / "results"


# `sample/learning.json` is left out: its Markdown was written before the HPT methods' labels gained their
# `demonstration_aggregation` (27b18cb), so only those labels differ from a rendering today.
@pytest.mark.parametrize("name", ["learning.json", "spaced/learning.json", "real_model.json", "speed.json"])
def test_report_reproduces_the_committed_markdown(name, tmp_path):
    out = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/report.py", str(RESULTS / name), "--markdown", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.read_bytes() == (RESULTS / name).with_suffix(".md").read_bytes()


def test_report_dispatches_on_the_benchmark_field_and_plots_learning(tmp_path):
    from benchmarks.report import benchmark_of, main

    reports = {
        name: json.loads((RESULTS / f"{name}.json").read_text()) for name in ("learning", "speed", "real_model")
    }
    # The committed reports predate the field: recognised by their keys.
    assert {name: benchmark_of(report) for name, report in reports.items()} == {n: n for n in reports}
    assert benchmark_of({"benchmark": "speed"}) == "speed"
    with pytest.raises(ValueError):
        benchmark_of({"benchmark": "other"})
    with pytest.raises(ValueError):
        benchmark_of({"results": {}})
    with pytest.raises(SystemExit):
        main([str(RESULTS / "speed.json"), "--plot", str(tmp_path / "speed.png")])
    pytest.importorskip("matplotlib")
    png = tmp_path / "learning.png"
    main([str(RESULTS / "learning.json"), "--markdown", str(tmp_path / "learning.md"), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_overrides_cast_to_the_field_types():
    from benchmarks.common import settings_overrides
    from benchmarks.learning import LearningSettings

    overrides = settings_overrides(
        LearningSettings.quick(), ["learning_rate=1e-4", "seeds=3", "pass_k=1,8", "sensitivity_lr=None"]
    )
    assert overrides == {"learning_rate": 1e-4, "seeds": 3, "pass_k": (1, 8), "sensitivity_lr": None}
    assert settings_overrides(LearningSettings(sensitivity_lr=None), ["sensitivity_lr=0.01"]) == {
        "sensitivity_lr": 0.01
    }


def test_custom_fields_read_literals_and_keep_other_values_as_strings():
    from benchmarks.common import custom_fields, settings_overrides
    from benchmarks.real_model import RealModelSettings

    fields = ["demonstration_loss=sft_sequence_p", "demonstration_loss_coef=4.0", "switch_gate=0", "hpt_report=False"]
    assert custom_fields(fields) == {
        "demonstration_loss": "sft_sequence_p",
        "demonstration_loss_coef": 4.0,
        "switch_gate": 0,
        "hpt_report": False,
    }
    with pytest.raises(ValueError, match="field=value"):
        custom_fields(["demonstration_loss"])
    # The real-model benchmark takes them as the learning benchmark does: one --set, comma-separated.
    overrides = settings_overrides(RealModelSettings(), ["custom_fields=demonstration_loss=dft,switch_gate=0.25"])
    assert overrides == {"custom_fields": ("demonstration_loss=dft", "switch_gate=0.25")}


@pytest.mark.slow
def test_speed_quick_writes_its_outputs(tmp_path):
    out_json, out_md = tmp_path / "speed.json", tmp_path / "speed.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--quick", "--json", str(out_json), "--markdown", str(out_md)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert {"machine", "step_time", "components", "memory", "loss_pass"} <= set(report)
    assert report["machine"]["commit"] and report["machine"]["torch"]
    assert report["step_time"]["same_rollouts"]  # feedback="rl" generated what GRPOTrainer generated
    assert [e["g"] for e in report["loss_pass"]["results"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert report["benchmark"] == "speed"
    assert "HPT/GRPO" in out_md.read_text()


@pytest.mark.slow
def test_learning_quick_writes_its_outputs(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/learning.py", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("learning.json", "learning.md", "learning.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "learning.json").read_text())
    assert set(report["aggregate"]) == {
        "warm_start",
        "sft",
        "sft_trl",
        "grpo",
        "grpo_trl",
        "sft_grpo",
        "luffy",
        "srft",
        "hpt",
        "hpt_lt",
        "hpt_solved",
        "hpt_coef2",
    }
    assert set(report["paired"]) == {"hpt", "hpt_lt", "hpt_solved", "hpt_coef2"}
    # Every run is evaluated on the validation split too, which settings are chosen on.
    assert set(report["aggregate_validation"]) == set(report["aggregate"])
    assert report["benchmark"] == "learning"
    assert "HPT" in (tmp_path / "learning.md").read_text()


def _real_model_report(seeds, seconds=None, steps=20, methods=("sft",)):
    record = {"seconds": 10.0, "step_seconds": [1.0], "logs": [], "final": {"greedy": 0.5}}
    report = {
        "methods": list(methods),
        "model_dir": "m",
        "device": "cpu",
        "quick": False,
        "settings": {"seeds": len(seeds), "steps": steps},
        "results": {"seeds": {str(s): {m: dict(record) for m in methods} for s in seeds}},
    }
    if seconds is not None:
        report["seconds"] = seconds
    return report


def test_real_model_reports_of_disjoint_seeds_merge():
    from benchmarks.real_model import merge_reports

    merged = merge_reports([_real_model_report([0], seconds=100.0), _real_model_report([2])])
    assert sorted(merged["results"]["seeds"]) == ["0", "2"]
    assert merged["settings"]["seeds"] == 2 and merged["processes"] == 2
    assert merged["seconds"] == 100.0  # the partial run's own methods took 10 s
    with pytest.raises(ValueError, match="more than one run"):
        merge_reports([_real_model_report([0]), _real_model_report([0])])
    with pytest.raises(ValueError, match="different settings"):
        merge_reports([_real_model_report([0]), _real_model_report([1], steps=5)])
    # Disjoint methods of the same seeds join; a seed without every method is left out of the pairs.
    merged = merge_reports(
        [_real_model_report([0, 1], methods=("sft", "grpo")), _real_model_report([0], methods=("hpt",))]
    )
    assert merged["methods"] == ["sft", "grpo", "hpt"] and list(merged["results"]["seeds"]) == ["0"]
    assert merged["left_out_seeds"] == ["1"] and merged["settings"]["seeds"] == 1


def test_real_model_report_takes_only_the_listed_methods_of_a_file(tmp_path):
    from benchmarks.real_model import main, merge_reports, select_methods

    stored = _real_model_report([0, 1], methods=("sft", "grpo"))
    # A new configuration run beside its own GRPO, on the stored seeds: GRPO is in both files.
    new = _real_model_report([0, 1], methods=("grpo", "hpt"))
    new["results"]["seeds"]["0"]["hpt"]["final"] = {"greedy": 0.75}
    with pytest.raises(ValueError, match="more than one run"):
        main(["--report", *(_write(tmp_path / n, r) for n, r in (("a.json", stored), ("b.json", new)))])
    only = select_methods(new, ["hpt"])
    assert only["methods"] == ["hpt"] and all(list(r) == ["hpt"] for r in only["results"]["seeds"].values())
    assert new["methods"] == ["grpo", "hpt"]  # the file's report is left as it was
    merged = merge_reports([stored, only])
    assert merged["methods"] == ["sft", "grpo", "hpt"] and merged["results"]["seeds"]["0"]["hpt"]["final"] == {
        "greedy": 0.75
    }
    with pytest.raises(ValueError, match=r"methods \['luffy'\] are not in that run"):
        select_methods(new, ["luffy"])


def _write(path, report):
    path.write_text(json.dumps(report))
    return str(path)


def test_real_model_reports_of_one_gguf_converted_twice_merge():
    from benchmarks.real_model import merge_reports, model_identity

    cache = "/root/.cache/trl_hpt/gguf/SmolLM2-135M-Instruct.Q4_1-"
    assert model_identity(cache + "810b053bd9a29ba3") == model_identity(cache + "183571ae1584b4a7")
    assert model_identity("/models/my-model") == "my-model"  # no cache key: the name as it is
    a, b = _real_model_report([0]), _real_model_report([1])
    a["model_dir"], b["model_dir"] = cache + "810b053bd9a29ba3", cache + "183571ae1584b4a7"
    assert sorted(merge_reports([a, b])["results"]["seeds"]) == ["0", "1"]
    b["model_dir"] = "/models/other"
    with pytest.raises(ValueError, match="different models"):
        merge_reports([a, b])


def test_real_model_custom_runs_merge_with_runs_of_other_methods():
    from benchmarks.real_model import merge_reports

    grpo = _real_model_report([0, 1], methods=("grpo",))
    grpo["settings"]["custom_fields"] = []
    custom = _real_model_report([0, 1], methods=("hpt_custom",))
    custom["settings"]["custom_fields"] = ["demonstration_loss=sft_sequence_p"]
    merged = merge_reports([grpo, custom])
    assert merged["methods"] == ["grpo", "hpt_custom"]
    assert merged["settings"]["custom_fields"] == ["demonstration_loss=sft_sequence_p"]
    other = _real_model_report([2], methods=("hpt_custom",))
    other["settings"]["custom_fields"] = ["demonstration_loss=dft"]
    with pytest.raises(ValueError, match="different custom_fields"):
        merge_reports([custom, other])
    grpo_steps = _real_model_report([0], methods=("grpo",), steps=5)
    with pytest.raises(ValueError, match="different settings"):
        merge_reports([grpo_steps, custom])


def test_real_model_tuning_split_changes_no_other_split():
    from benchmarks.real_model_tasks import make_split

    sizes = {"train": 40, "validation": 8, "test": 12}
    plain, tuned = make_split(sizes), make_split({**sizes, "tuning": 20})
    assert "tuning" not in plain and len(tuned["tuning"]) == 20
    for name in sizes:
        assert tuned[name] == plain[name]
    seen = {p["question"] for name in sizes for p in tuned[name]}
    assert not seen & {p["question"] for p in tuned["tuning"]}  # disjoint from every other split


def test_real_model_tuning_metrics_merge_only_when_every_run_has_them():
    from benchmarks.real_model import merge_reports

    def tuned(seeds, methods, size=8):
        report = _real_model_report(seeds, methods=methods)
        report["settings"].update(tuning_size=size, pass_k=[1])
        for records in report["results"]["seeds"].values():
            for record in records.values():
                record["final"] = {**record["final"], "tuning_greedy": 0.25, "tuning_pass@1": 0.5}
        return report

    assert merge_reports([tuned([0], ("grpo",)), tuned([0], ("hpt",))])["settings"]["tuning_size"] == 8
    baseline = _real_model_report([0], methods=("sft",))  # measured before the tuning split existed
    baseline["settings"]["pass_k"] = [1]
    assert merge_reports([baseline, tuned([0], ("hpt",))])["settings"]["tuning_size"] == 0
    assert merge_reports([tuned([0], ("grpo",), 8), tuned([0], ("hpt",), 16)])["settings"]["tuning_size"] == 0


def _learning_report(methods, seeds=(0, 1), warm=0.3, custom=(), steps=300, score=0.5):
    metrics = {"greedy": warm, "greedy_carry": 0.0, "greedy_no_carry": 0.6, "pass@4": warm}
    per_seed = {
        str(s): {
            "warm_start": dict(metrics),
            "methods": {m: {"final": {**metrics, "greedy": score + 0.1 * s}} for m in methods},
        }
        for s in seeds
    }
    return {
        "benchmark": "learning",
        "machine": {},
        "methods": list(methods),
        "quick": False,
        "seconds": 60.0,
        "settings": {"seeds": len(seeds), "steps": steps, "custom_fields": list(custom), "sensitivity_lr": None},
        "results": {"split": {}, "seeds": per_seed},
    }


def test_learning_reports_of_disjoint_methods_merge(monkeypatch):
    import benchmarks.learning as learning
    from benchmarks.report import learning_paired

    monkeypatch.setattr(learning, "machine_line", lambda machine: "here")
    base = _learning_report(["sft_trl", "grpo_trl", "hpt_custom"], seeds=(0, 1, 2), custom=["old=1"])
    new = _learning_report(["hpt_custom"], custom=["style_gate=True"], score=0.7)
    merged = learning.merge_reports([(base, ["sft_trl", "grpo_trl"]), (new, None)])
    assert merged["methods"] == ["sft_trl", "grpo_trl", "hpt_custom"]
    # Only the seeds both runs have; the custom fields of the run the custom method came from.
    assert list(merged["results"]["seeds"]) == ["0", "1"] and merged["settings"]["seeds"] == 2
    assert merged["settings"]["custom_fields"] == ["style_gate=True"]
    assert merged["merged_from"][1]["methods"] == ["hpt_custom"]
    paired = learning_paired(merged["results"], merged["methods"], "hpt_custom")
    assert paired["sft_trl"]["greedy"][0] == pytest.approx(0.2) and paired["sft_trl"]["wins"] == 2
    with pytest.raises(ValueError, match="more than one run"):
        learning.merge_reports([(base, None), (new, None)])
    with pytest.raises(ValueError, match="not in that run"):
        learning.merge_reports([(base, ["luffy"]), (new, None)])
    # Methods that started from other weights do not pair.
    with pytest.raises(ValueError, match="warm_start differ"):
        learning.merge_reports([(base, ["sft_trl"]), (_learning_report(["hpt_custom"], warm=0.2), None)])
    with pytest.raises(ValueError, match=r"differ in \['steps'\]"):
        learning.merge_reports([(base, ["sft_trl"]), (_learning_report(["hpt_custom"], steps=100), None)])
    with pytest.raises(ValueError, match="no seed has every method"):
        learning.merge_reports([(base, ["sft_trl"]), (_learning_report(["hpt_custom"], seeds=(7,)), None)])


def test_learning_reports_of_disjoint_seeds_merge(monkeypatch):
    import benchmarks.learning as learning
    from benchmarks.report import learning_paired

    monkeypatch.setattr(learning, "machine_line", lambda machine: "here")
    custom = ["style_gate=True"]
    # A stored comparison on seeds 0-1 (two files: baselines, the configuration) and five more seeds in one run.
    base = _learning_report(["sft_trl", "grpo_trl", "hpt_custom"], custom=["old=1"])
    new = _learning_report(["hpt_custom"], custom=custom, score=0.7)
    more = _learning_report(["sft_trl", "grpo_trl", "hpt_custom"], seeds=(5, 6), custom=custom, score=0.4)
    for seed in ("5", "6"):  # the new configuration wins on seeds 0-1 and loses on seeds 5-6
        more["results"]["seeds"][seed]["methods"]["hpt_custom"]["final"]["greedy"] = 0.0
    merged = learning.merge_reports([(base, ["sft_trl", "grpo_trl"]), (new, None), (more, None)])
    assert list(merged["results"]["seeds"]) == ["0", "1", "5", "6"] and merged["settings"]["seeds"] == 4
    assert merged["settings"]["custom_fields"] == custom
    assert [(r["methods"], r["seeds"]) for r in merged["merged_from"]] == [
        (["sft_trl", "grpo_trl"], ["0", "1"]),
        (["hpt_custom"], ["0", "1"]),
        (["sft_trl", "grpo_trl", "hpt_custom"], ["5", "6"]),
    ]
    paired = learning_paired(merged["results"], merged["methods"], "hpt_custom")
    # seeds 0-1: 0.7 + 0.1 s against 0.5 + 0.1 s; seeds 5-6: 0.0 against 0.4 + 0.1 s.
    assert paired["sft_trl"]["greedy"][0] == pytest.approx((0.2 + 0.2 - 0.9 - 1.0) / 4)
    assert paired["sft_trl"]["wins"] == 2
    # The same method on the same seed from two runs, or a configuration whose fields differ between its runs.
    with pytest.raises(ValueError, match="seed 0: method 'sft_trl' is taken from more than one run"):
        learning.merge_reports([(base, None), (_learning_report(["sft_trl"]), None)])
    with pytest.raises(ValueError, match="'hpt_custom' is taken from runs whose 'custom_fields' differ"):
        learning.merge_reports([(base, None), (more, None)])
    # A seed that lacks a method is left out; the remaining seeds still pair.
    partial = learning.merge_reports(
        [(base, None), (_learning_report(["sft_trl"], seeds=(5,), custom=["old=1"]), None)]
    )
    assert list(partial["results"]["seeds"]) == ["0", "1"]


def test_learning_tasks_table_puts_each_task_in_its_columns():
    from benchmarks.report import learning_tasks_tables

    reports = []
    for style, score in (("plain", 0.5), ("spaced", 0.2)):
        report = _learning_report(["grpo_trl", "hpt_custom"], custom=["style_gate=True"], score=score)
        report["settings"]["demonstration_style"] = style
        # GRPO 10 points below the custom configuration on every seed.
        for per_seed in report["results"]["seeds"].values():
            per_seed["methods"]["grpo_trl"]["final"]["greedy"] -= 0.1
        report["aggregate"] = {
            m: {"greedy": (score, 0.0), "greedy_no_carry": (0.6, 0.0)}
            for m in ("warm_start", "grpo_trl", "hpt_custom")
        }
        reports.append(report)
    text = learning_tasks_tables(reports)
    header = text.splitlines()[0]
    assert header == "| method | plain: greedy | plain: no carry | spaced: greedy | spaced: no carry |"
    assert "| GRPO (TRL `GRPOTrainer`) | 50.0 +- 0.0 | 60.0 +- 0.0 | 20.0 +- 0.0 | 60.0 +- 0.0 |" in text
    assert (
        "| HPT, `style_gate=True` | GRPO (TRL `GRPOTrainer`) | +10.0 +- 0.0 (2/2) | +0.0 +- 0.0 | +10.0 +- 0.0 (2/2) |"
        in text
    )


def test_learning_tables_refuse_runs_that_started_from_other_weights(monkeypatch):
    import benchmarks.report as report_module

    monkeypatch.setattr(report_module, "machine_line", lambda machine: machine.get("name", "?"))
    base = _learning_report(["grpo_trl", "hpt_custom"], custom=["style_gate=True"])
    base["machine"] = {"name": "the stored run"}
    moved = _learning_report(["hpt_custom"], custom=["beta=0.05"], warm=0.35)
    moved["machine"] = {"name": "a newer transformers"}
    for report in (base, moved):
        report["aggregate"] = report["aggregate_validation"] = {
            m: {"greedy": (0.5, 0.0), "greedy_no_carry": (0.6, 0.0)} for m in ("warm_start", *report["methods"])
        }
    for table in (report_module.learning_sweep_table, report_module.learning_tasks_tables):
        with pytest.raises(
            ValueError,
            match="task 'plain', seed 0: the warm start differs between the run of "
            "the stored run and that of a newer transformers",
        ):
            table([base, moved])
    # Another task may start elsewhere, and seeds one run lacks are not compared.
    moved["settings"]["demonstration_style"] = "spaced"
    assert "spaced: greedy" in report_module.learning_sweep_table([base, moved])
    other_seeds = _learning_report(["hpt_custom"], seeds=(5,), warm=0.35)
    other_seeds["aggregate_validation"] = base["aggregate_validation"]
    report_module.learning_sweep_table([base, other_seeds])


def test_learning_frontier_names_what_dominates_each_configuration(tmp_path):
    import benchmarks.report as report_module

    def sweep(points, custom=(), style="plain"):
        report = _learning_report([m for m in points if m != "warm_start"], custom=custom)
        report["settings"]["demonstration_style"] = style
        report["aggregate_validation"] = {
            m: {"greedy": ((c + n) / 2, 0.0), "greedy_carry": (c, 0.0), "greedy_no_carry": (n, 0.0)}
            for m, (c, n) in points.items()
        }
        return report

    base = sweep({"warm_start": (0.0, 0.8), "sft_trl": (0.6, 0.9), "grpo_trl": (0.0, 0.94), "luffy": (0.1, 0.9)})
    new = sweep({"hpt_custom": (0.5, 0.88)}, custom=["style_gate=True"])
    text = report_module.learning_frontier_table([base, new])
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()[2:]}
    # Ordered by accuracy with a carry; the frontier is SFT and GRPO, and each other row names one that beats it.
    assert list(rows) == [
        "warm start",
        "GRPO (TRL `GRPOTrainer`)",
        "LUFFY (`soft`, `luffy`)",
        "HPT, `style_gate=True`",
        "SFT (TRL `SFTTrainer`)",
    ]
    assert rows["SFT (TRL `SFTTrainer`)"].endswith("| 60.0 | 90.0 | 75.0 | yes |  |")
    assert rows["GRPO (TRL `GRPOTrainer`)"].endswith("| yes |  |")
    assert rows["HPT, `style_gate=True`"].endswith("|  | SFT (TRL `SFTTrainer`) |")
    # LUFFY is dominated by SFT (more of both) and not by GRPO (less carry): the witness is the one that learnt least.
    assert rows["LUFFY (`soft`, `luffy`)"].endswith("|  | SFT (TRL `SFTTrainer`) |")
    assert rows["warm start"].endswith("|  | GRPO (TRL `GRPOTrainer`) |")
    with pytest.raises(ValueError, match="one task"):
        report_module.learning_frontier_table([base, sweep({"grpo_trl": (0.0, 0.9)}, style="spaced")])
    # The command line: one table flag at a time, the table on stdout.
    paths = [tmp_path / "base.json", tmp_path / "new.json"]
    for path, report in zip(paths, (base, new)):
        path.write_text(json.dumps(report))
    assert report_module.main(["--frontier", *map(str, paths)]) == text + "\n"
    with pytest.raises(SystemExit):
        report_module.main(["--frontier", "--sweep", *map(str, paths)])
    del new["aggregate_validation"]
    with pytest.raises(ValueError, match="validation split"):
        report_module.learning_frontier_table([base, new])


def test_sft_trainer_in_grpo_order_is_hpt_sft_step_for_step():
    """`sft_trl_grpo_order` draws the prompts as GRPOTrainer does: TRL's SFTTrainer then trains exactly as
    `HPTTrainer(feedback="sft")`, so the two pair prompt for prompt. (Within one epoch: across an epoch's end the
    orders agree too, but Adam turns the rounding noise of the key biases, whose gradient is zero, into 1e-6 steps.)"""
    import copy
    import dataclasses

    import torch
    from datasets import Dataset

    import benchmarks.learning as learning
    from benchmarks.common import setup_environment
    from trl_hpt.testing import build_char_tokenizer, build_tiny_model

    setup_environment(1)
    settings = dataclasses.replace(learning.LearningSettings.quick(), steps=6, warmup_steps=20)
    tokenizer = build_char_tokenizer(chat_template=False)
    split = learning.task_split(settings.max_operand, settings.held_out, validation=settings.validation)
    dataset = Dataset.from_list(learning.task_rows(split["train"], settings.max_operand))
    model = build_tiny_model(tokenizer, settings.hidden_size, settings.num_layers, seed=3)
    learning.warm_start(model, tokenizer, learning.warm_start_problems(split, settings), settings, seed=3)
    start = copy.deepcopy(model.state_dict())
    trained = {}
    for method in ("sft", "sft_trl_grpo_order"):
        model.load_state_dict(start)
        learning.run_method(method, model, tokenizer, dataset, split["held_out"], settings, seed=3)
        trained[method] = copy.deepcopy(model.state_dict())
    moved = max((trained["sft"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, "the runs must move the weights"
    for name, value in trained["sft"].items():
        torch.testing.assert_close(trained["sft_trl_grpo_order"][name], value, atol=1e-6, rtol=1e-5, msg=name)
