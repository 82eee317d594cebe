"""HPT's one key in GRPOTrainer's batch, and the row operations of the loss pass."""

import torch
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

from trl_hpt.batch import HPT_KEY, attach_rows, hpt_rows, replace_rows, rows_to_keep, select_rows


def _batch(num_rows=8, width=5):
    torch.manual_seed(0)
    mask = torch.ones(num_rows, width, dtype=torch.long)
    mask[::2, 3:] = 0
    batch = {
        "prompt_ids": torch.randint(0, 9, (num_rows, 2)),
        "prompt_mask": torch.ones(num_rows, 2, dtype=torch.long),
        "completion_ids": torch.randint(0, 9, (num_rows, width)),
        "completion_mask": mask,
        "advantages": torch.randn(num_rows),
        "num_items_in_batch": torch.tensor(33.0),
    }
    demonstration = torch.arange(num_rows) % 4 == 3
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 2.0])[:num_rows]
    return attach_rows(batch, demonstration, weights, policy_rows=6.0, separate_tokens=17.0), demonstration, weights


def test_rows_survive_grpo_trainers_shuffle_and_split():
    batch, demonstration, weights = _batch()
    batch["row"] = torch.arange(8)
    shuffled = shuffle_sequence_dict(batch)
    for part in split_tensor_dict(shuffled, 4):
        rows = hpt_rows(part)
        assert rows.demonstration.tolist() == demonstration[part["row"]].tolist()
        assert rows.weights.tolist() == weights[part["row"]].tolist()
        # Every micro-batch carries the generation batch's counts.
        assert (rows.policy_rows, rows.separate_tokens) == (6.0, 17.0)


def test_batch_without_hpt_rows_is_grpo_trainers():
    assert hpt_rows({"completion_mask": torch.ones(2, 2)}) is None


def test_replace_rows_copies():
    batch, demonstration, weights = _batch()
    zeroed = replace_rows(batch, weights=torch.zeros(8))
    assert hpt_rows(zeroed).weights.eq(0).all() and hpt_rows(batch).weights.tolist() == weights.tolist()
    assert hpt_rows(zeroed).demonstration.tolist() == demonstration.tolist() and hpt_rows(zeroed).policy_rows == 6.0


def test_select_rows_trims_to_the_longest_kept_completion_and_keeps_the_hpt_key():
    batch, _, weights = _batch(width=4)  # as wide as the HPT key: only the completion tensors may be trimmed
    index = rows_to_keep(batch, weights)
    assert index.tolist() == [0, 2, 3, 6, 7]
    kept = select_rows(batch, index)
    assert kept["completion_ids"].shape == (5, 4)  # row 3 has 4 tokens
    kept = select_rows(batch, torch.tensor([0, 2]))
    assert kept["completion_ids"].shape == (2, 3) and kept["prompt_ids"].shape == (2, 2)
    assert kept[HPT_KEY].shape == (2, 4) and hpt_rows(kept).weights.tolist() == [1.0, 0.5]
    assert kept["num_items_in_batch"].item() == 33.0


def test_rows_to_keep_keeps_one_row_when_none_has_weight():
    batch, _, _ = _batch()
    assert rows_to_keep(batch, torch.zeros(8)).tolist() == [0]
    assert rows_to_keep(batch, torch.ones(8)) is None
    assert rows_to_keep(batch, torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), aux_loss=True) is None


def test_row_layout_places_a_prompts_flag_in_its_last_slot_and_slices_this_process():
    from trl_hpt.batch import RowLayout

    # 2 processes x 4 rows, groups of 2: prompts 0-1 on process 0, prompts 2-3 on process 1.
    layout = RowLayout(num_local=4, num_generations=2, num_processes=2, process_index=1)
    placed = layout.last_slots(torch.tensor([True, False, False, True]))
    assert placed.tolist() == [False, True, False, False, False, False, False, True]
    assert layout.local(torch.arange(8)).tolist() == [4, 5, 6, 7]
    assert layout.per_row(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert layout.per_prompt(torch.arange(8)).tolist() == [1, 3, 5, 7]


def test_scoring_rows_pad_every_process_to_the_same_width_and_scatter_back():
    from trl_hpt.batch import RowLayout, scatter_scored, scoring_rows

    placed = torch.tensor([True, False, True, False, False, False, True, False])  # process 0: 2 rows, process 1: 1
    for process, expected in ((0, [0, 2]), (1, [2])):
        rows, width = scoring_rows(placed, RowLayout(4, 1, 2, process))
        assert (rows, width) == (expected, 2)
    # Each process scored 2 rows (process 1 padded with a repeat); the padding is dropped on the way back.
    gathered = torch.tensor([[10.0], [12.0], [16.0], [16.0]])
    scores = scatter_scored(gathered, placed, RowLayout(4, 1, 2, 0), width=2)
    assert scores[placed].squeeze(1).tolist() == [10.0, 12.0, 16.0]
    assert torch.isnan(scores[~placed]).all()


def test_forward_inputs_are_the_prompt_and_completion_side_by_side():
    from trl_hpt.batch import FORWARD_KEYS, forward_inputs

    batch = {
        "prompt_ids": torch.tensor([[1, 2]]),
        "prompt_mask": torch.tensor([[0, 1]]),
        "completion_ids": torch.tensor([[3, 4, 5]]),
        "completion_mask": torch.tensor([[1, 1, 0]]),
    }
    kwargs = forward_inputs(batch)
    assert kwargs["input_ids"].tolist() == [[1, 2, 3, 4, 5]] and kwargs["attention_mask"].tolist() == [[0, 1, 1, 1, 0]]
    assert kwargs["logits_to_keep"] == 3 and all(kwargs[k] is None for k in FORWARD_KEYS)


def test_rollout_inputs_default_pi_old_to_the_detached_current_policy():
    from trl_hpt.batch import rollout_inputs

    logps = torch.randn(2, 3, requires_grad=True)
    advantages, old = rollout_inputs({"advantages": torch.tensor([1.0, -1.0])}, logps)
    assert advantages.shape == (2, 1) and torch.equal(old, logps.detach()) and not old.requires_grad
    given = torch.zeros(2, 3)
    assert rollout_inputs({"advantages": torch.ones(2, 3), "old_per_token_logps": given}, logps)[1] is given
