"""Multi-process correctness: 2 CPU processes (gloo) against 1 process with the same global batch.

Both runs execute `tests/distributed_worker.py` once for all cases (imports dominate the runtime): the 2-process run
under `torchrun --nproc_per_node 2`, the 1-process reference with the per-device batch doubled. Rollouts come from a
deterministic `rollout_func`, so both runs see the same generation batches; SGD without clipping keeps float-level
gradient differences float-level in the parameters.

The file takes about a minute on 2 CPU cores, so it is kept out of the default run (`-m distributed`; `.ci/run` runs
it as a separate step).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = WORKER.parents[1]
NUM_PROCESSES = 2
G = 4
# A whole launch: process start-up, 8 cases of 3 steps. A collective that hangs fails sooner, at the worker's
# `ddp_timeout`.
LAUNCH_TIMEOUT = 420
# Max parameter difference relative to the largest parameter update. Correct runs measure ~1e-7 here; a rank-local
# normaliser (e.g. grpo's row count when demonstrations land unevenly) gives ~1e-2.
RELATIVE_TOLERANCE = 1e-4

# Per-device batch 6 with num_generations 4: the middle group of each generation batch spans both ranks.
SPANNING = {"per_device_batch": 6, "num_generations": G, "steps": 3, "solved": "mixed"}
CASES = [
    # The default balance (demonstration tokens reduced with the rollouts) and, explicitly, a separate SFT token mean.
    {"name": "switch-dapo", "mode": "switch", "loss_type": "dapo", **SPANNING},
    {
        "name": "switch-grpo",
        "mode": "switch",
        "loss_type": "grpo",
        "demonstration_aggregation": "token_mean",
        **SPANNING,
    },
    {
        "name": "switch-dr_grpo",
        "mode": "switch",
        "loss_type": "dr_grpo",
        "demonstration_aggregation": "token_mean",
        **SPANNING,
    },
    {"name": "soft_luffy-dapo", "mode": "soft_luffy", "loss_type": "dapo", **SPANNING},
    # LUFFY with a reward model: demonstrations are scored on every rank alike, placed there or not.
    {"name": "soft_luffy-reward_model", "mode": "soft_luffy", "loss_type": "grpo", "reward_model": True, **SPANNING},
    # Demonstration tokens reduced with the rollouts: the row count dr_grpo divides by includes them.
    {
        "name": "switch_loss_type-dr_grpo",
        "mode": "switch",
        "loss_type": "dr_grpo",
        "demonstration_aggregation": "loss_type",
        **SPANNING,
    },
    {"name": "rl-grpo", "mode": "rl", "loss_type": "grpo", **SPANNING},
    # The imitation guard: replays of unequal size per rank, scored with equal forwards; one drift over all of them.
    {"name": "switch-guard", "mode": "switch", "loss_type": "dapo", "imitation_guard": True, **SPANNING},
    # The style gate: a group spanning ranks is paired once, by the rank holding its first correct rollout.
    {"name": "switch-style", "mode": "switch", "loss_type": "dapo", "style_gate": True, **SPANNING},
    # One group of 4 per step, 2 rows per rank, never solved: rank 0 holds only zero-weight rollouts (alpha = 0) and
    # the demonstration goes to rank 1, which owns the group's last slot.
    {
        "name": "zero-weight-rank",
        "mode": "switch",
        "loss_type": "dapo",
        "per_device_batch": 2,
        "num_generations": G,
        "steps": 3,
        "solved": "none",
    },
]
CASE = {case["name"]: case for case in CASES}
NAMES = list(CASE)
WITH_DEMONSTRATIONS = [name for name in NAMES if CASE[name]["mode"] != "rl"]
# Logged values that must not depend on the number of processes.
LOGGED = (
    "loss",
    "reward",
    "entropy",
    "hpt/prompt_accuracy",
    "hpt/sft_fraction",
    "hpt/rl_fraction",
    "hpt/skipped_rows",
    "hpt/rl_loss",
    "hpt/demonstration_loss",
    "hpt/imitation_scale",
    "hpt/replay_drift",
    "hpt/style_gap",
    "hpt/style_scale",
    "hpt/style_measured",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str]) -> subprocess.Popen:
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    # Own session, so that a timeout can end torchrun and the workers it started, and nothing else.
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait(process: subprocess.Popen, label: str, deadline: float) -> None:
    try:
        log, _ = process.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(
            f"the {label} run did not finish in {LAUNCH_TIMEOUT}s (a rank stuck in a collective?):\n{log[-6000:]}"
        )
    if process.returncode != 0:
        pytest.fail(f"the {label} run exited with {process.returncode}:\n{log[-6000:]}")


def _load(output: Path, name: str, num_processes: int) -> dict:
    ranks = [json.loads((output / name / f"rank{r}.json").read_text()) for r in range(num_processes)]
    params = torch.load(output / name / "params.pt")
    return {"ranks": ranks, "params": params}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    two, one = root / "two", root / "one"
    two.mkdir()
    one.mkdir()
    doubled = [{**case, "per_device_batch": case["per_device_batch"] * NUM_PROCESSES} for case in CASES]
    # Both runs at once: they overlap their start-up, and see the same checkout.
    distributed = _start(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(NUM_PROCESSES),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(WORKER),
            "--output",
            str(two),
            "--cases",
            json.dumps(CASES),
        ]
    )
    single = _start([sys.executable, str(WORKER), "--output", str(one), "--cases", json.dumps(doubled)])
    deadline = time.time() + LAUNCH_TIMEOUT
    try:
        _wait(distributed, f"{NUM_PROCESSES}-process", deadline)
        _wait(single, "1-process", deadline)
    finally:
        for process in (distributed, single):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return {name: {"two": _load(two, name, NUM_PROCESSES), "one": _load(one, name, 1)} for name in NAMES}


def _concat(ranks: list[dict], step: int, key: str) -> list:
    return [value for rank in ranks for value in rank["steps"][step][key]]


@pytest.mark.parametrize("name", NAMES)
def test_every_rank_takes_the_same_gate_decisions(runs, name):
    ranks, single = runs[name]["two"]["ranks"], runs[name]["one"]["ranks"][0]
    assert [r["num_processes"] for r in ranks] == [NUM_PROCESSES] * NUM_PROCESSES
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == len(single["steps"]) == 3
    for step, reference in enumerate(single["steps"]):
        # The same prompts, in the same slots, as the 1-process run: the comparison below is meaningful.
        assert _concat(ranks, step, "row_index") == reference["row_index"]
        assert _concat(ranks, step, "completions") == reference["completions"]
        for key in ("accuracy", "alpha", "beta", "placed"):
            assert ranks[0]["steps"][step][key] == ranks[1]["steps"][step][key], (step, key)
            assert ranks[0]["steps"][step][key] == reference[key], (step, key)


@pytest.mark.parametrize("name", WITH_DEMONSTRATIONS)
def test_each_demonstration_is_placed_once_by_the_owner_of_the_last_slot(runs, name):
    ranks, single = runs[name]["two"]["ranks"], runs[name]["one"]["ranks"][0]
    for step, reference in enumerate(single["steps"]):
        placed = ranks[0]["steps"][step]["placed"]
        expected = [placed[i // G] and i % G == G - 1 for i in range(len(placed) * G)]
        assert _concat(ranks, step, "demonstration") == expected == reference["demonstration"], step
        # Weights the style gate scales come from measured log-probabilities: float-level equal, not bit-equal.
        torch.testing.assert_close(
            torch.tensor(_concat(ranks, step, "weight")), torch.tensor(reference["weight"]), msg=str(step)
        )
        torch.testing.assert_close(
            torch.tensor(_concat(ranks, step, "advantages")), torch.tensor(reference["advantages"]), msg=str(step)
        )
        # The token counts that dapo and the SFT term divide by are global and counted after the swap.
        for key in ("num_items_in_batch", "token_mean_tokens"):
            assert ranks[0]["steps"][step][key] == ranks[1]["steps"][step][key] == reference[key], (step, key)
        tokens = torch.tensor(reference["tokens"], dtype=torch.float)
        demonstration = torch.tensor(reference["demonstration"])
        if CASE[name].get("demonstration_aggregation") == "token_mean":
            # sft: demonstration tokens form their own term
            assert reference["num_items_in_batch"] == tokens[~demonstration].sum().item()
            assert reference["token_mean_tokens"] == tokens[demonstration].sum().item()
        else:  # the default, luffy, "loss_type": demonstration tokens aggregate with the rollouts
            assert reference["num_items_in_batch"] == tokens.sum().item()


def test_the_layouts_cover_groups_spanning_ranks_and_uneven_demonstrations(runs):
    """The data and seed put gated groups where they test something: across ranks, and unevenly per rank."""
    per_device = SPANNING["per_device_batch"]
    assert per_device % G != 0
    ranks = runs["switch-dapo"]["two"]["ranks"]
    spanning_gated = uneven = False
    for step in range(3):
        placed = ranks[0]["steps"][step]["placed"]
        for group, gated in enumerate(placed):
            first_rank, last_rank = group * G // per_device, (group * G + G - 1) // per_device
            spanning_gated |= gated and first_rank != last_rank
        uneven |= sum(ranks[0]["steps"][step]["demonstration"]) != sum(ranks[1]["steps"][step]["demonstration"])
    assert spanning_gated, "no gated group spanned the two ranks"
    assert uneven, "the ranks always held the same number of demonstrations"


def test_every_rank_runs_the_reward_model_equally_often(runs):
    """Rollouts and demonstrations go through one scoring path; every rank calls a reward model as often."""
    ranks = runs["soft_luffy-reward_model"]["two"]["ranks"]
    uneven = any(
        sum(ranks[0]["steps"][step]["demonstration"]) != sum(ranks[1]["steps"][step]["demonstration"])
        for step in range(3)
    )
    assert uneven, "the ranks always held the same number of demonstrations: the check would prove nothing"
    counts = [rank["reward_model_forwards"] for rank in ranks]
    # Each step: one forward for the rollouts and one for the demonstrations, on each rank.
    assert counts == [2 * 3, 2 * 3], counts


def test_a_rank_whose_rows_all_have_zero_weight_still_steps(runs):
    ranks = runs["zero-weight-rank"]["two"]["ranks"]
    for step in range(3):
        # Rank 0 holds only the gated group's first rollouts (alpha = 0); rank 1 holds its last slot: the demo.
        assert ranks[0]["steps"][step]["weight"] == [0.0, 0.0]
        assert ranks[1]["steps"][step]["demonstration"] == [False, True]
    # It finished all steps (the fixture's timeout and the worker's ddp_timeout catch a hang) and, below, matches.
    assert [len(r["logs"]) for r in ranks] == [3, 3]


@pytest.mark.parametrize("name", NAMES)
def test_parameters_equal_the_single_process_run(runs, name):
    two, one = runs[name]["two"]["params"], runs[name]["one"]["params"]
    for key in one["initial"]:
        assert torch.equal(two["initial"][key], one["initial"][key]), key
    update = max((one["final"][k] - one["initial"][k]).abs().max().item() for k in one["final"])
    diff = max((two["final"][k] - one["final"][k]).abs().max().item() for k in one["final"])
    print(f"{name}: max |2-proc - 1-proc| = {diff:.3g}, max update = {update:.3g}, ratio = {diff / update:.3g}")
    assert update > 1e-3, "the runs must move the weights"
    assert diff <= RELATIVE_TOLERANCE * update, f"{name}: parameter difference {diff:.3g} vs update {update:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_logged_metrics_equal_the_single_process_run(runs, name):
    two, one = runs[name]["two"]["ranks"][0]["logs"], runs[name]["one"]["ranks"][0]["logs"]
    assert len(two) == len(one) == 3
    for step, (a, b) in enumerate(zip(two, one)):
        for key in LOGGED:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (step, key)


def test_the_style_gate_measures_over_every_rank(runs):
    # Equal to the single-process run (test_logged_metrics_equal_the_single_process_run), and measured.
    logs = runs["switch-style"]["two"]["ranks"][0]["logs"]
    gaps = [h["hpt/style_gap"] for h in logs if "hpt/style_gap" in h]  # the third step has no solved prompt
    assert len(gaps) == 2 and all(gap != 0 for gap in gaps)


def test_the_imitation_guard_measures_over_every_rank(runs):
    logs = runs["switch-guard"]["two"]["ranks"][0]["logs"]
    # Step 1 fills the replays, step 2 takes their baselines, step 3 measures a drift and moves the scale.
    assert [round(h["hpt/imitation_scale"], 6) for h in logs[:2]] == [1.0, 1.0]
    assert "hpt/replay_drift" in logs[2] and logs[2]["hpt/imitation_scale"] != 1.0
