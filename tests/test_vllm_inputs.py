"""vLLM's loss inputs reach rollout rows only: demonstrations get no importance-sampling correction or off-policy mask.

With `use_vllm=True`, GRPOTrainer adds the sampling log-probs (`sampling_per_token_logps`) and the truncated
importance-sampling ratio (`importance_sampling_ratio`, per token or per sequence) to each generation batch, and the
loss multiplies rollout tokens by the ratio and, with `off_policy_mask_threshold`, by DeepSeek-V3.2's off-policy
sequence mask. A demonstration was not sampled: it has neither. vLLM needs a GPU, so these tests build the batch
GRPOTrainer would hand to the loss (transformers generation, then the vLLM fields computed as TRL computes them) and
turn the vLLM switches on on the trainer.
"""

import pytest
import torch
from trl import GRPOTrainer

from trl_hpt.batch import hpt_rows, replace_rows
from trl_hpt.demonstrations import Demonstration
from trl_hpt.testing import assert_same, gated_trainer, generation_batch, loss_and_grads, per_token_logps


G = 4
OFF_POLICY_THRESHOLD = 0.05


def vllm_trainer(tmp_path, tokenizer, feedback, demonstration_loss, mode):
    # The first two prompts are never solved: switch sends them to SFT.
    trainer = gated_trainer(
        tmp_path, tokenizer, loss_type="dapo", feedback=feedback, demonstration_loss=demonstration_loss
    )
    batch = generation_batch(trainer, G)
    # What `use_vllm=True` turns on in GRPOTrainer's loss (vLLM itself is not needed to build its inputs).
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.off_policy_mask_threshold = OFF_POLICY_THRESHOLD
    return trainer, add_vllm_fields(trainer, batch)


def add_vllm_fields(trainer, batch):
    """
    The generation batch as GRPOTrainer builds it with vLLM: old log-probs from the training model, sampling log-probs
    from the (slightly different) inference engine, and their truncated importance-sampling ratio, per token or per
    sequence. Demonstration rows hold the neutral values the swap writes (sampling log-probs 0, ratio 1).
    """
    torch.manual_seed(0)
    mask = batch["completion_mask"]
    demonstration = hpt_rows(batch).demonstration.unsqueeze(1)
    with torch.no_grad():
        old = per_token_logps(trainer, batch)
    # Rollouts were sampled by a policy a little off the training one, so the ratios are not 1 and some rollouts
    # exceed the off-policy threshold.
    sampling = old + 0.3 * torch.randn_like(old)
    diff = (old - sampling) * mask
    if trainer.vllm_importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.clamp(torch.exp(diff), max=trainer.vllm_importance_sampling_clip_max)
    batch["old_per_token_logps"] = torch.where(demonstration, torch.zeros_like(old), old)
    batch["sampling_per_token_logps"] = torch.where(demonstration, torch.zeros_like(sampling), sampling)
    batch["importance_sampling_ratio"] = torch.where(demonstration, torch.ones_like(ratio), ratio)
    return batch


def rows_of(batch, keep):
    index = keep.nonzero(as_tuple=True)[0]
    num_rows = batch["completion_ids"].size(0)
    return {
        k: v.index_select(0, index) if torch.is_tensor(v) and v.dim() and v.size(0) == num_rows else v
        for k, v in batch.items()
    }


CONFIGS = [
    pytest.param("switch", "sft", id="switch-sft"),
    pytest.param("soft", "luffy", id="soft-luffy"),
]
MODES = ["token_truncate", "sequence_truncate"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("feedback, demonstration_loss", CONFIGS)
def test_demonstration_rows_ignore_sampling_logps_and_importance_ratio(
    tmp_path, char_tokenizer, feedback, demonstration_loss, mode
):
    trainer, batch = vllm_trainer(tmp_path, char_tokenizer, feedback, demonstration_loss, mode)
    demonstration = hpt_rows(batch).demonstration
    assert demonstration.any() and (~demonstration).any()
    # A negative advantage on demonstrations (luffy: a legal mixed-group value; sft: ignored), so that the
    # off-policy mask would drop them if it reached them.
    batch["advantages"] = torch.where(demonstration, torch.full_like(batch["advantages"], -0.5), batch["advantages"])
    reference = loss_and_grads(trainer, batch)

    poisoned = dict(batch)
    rows = demonstration.unsqueeze(1)
    poisoned["importance_sampling_ratio"] = torch.where(rows, 0.0, batch["importance_sampling_ratio"])
    poisoned["sampling_per_token_logps"] = torch.where(rows, 50.0, batch["sampling_per_token_logps"])
    assert_same(loss_and_grads(trainer, poisoned), reference, atol=0, rtol=0)

    # The same changes on rollout rows do change the loss: they are live inputs there.
    online = (~demonstration & (hpt_rows(batch).weights > 0)).unsqueeze(1)
    changed = dict(batch)
    changed["importance_sampling_ratio"] = torch.where(
        online, 0.5 * batch["importance_sampling_ratio"], batch["importance_sampling_ratio"]
    )
    assert not torch.allclose(loss_and_grads(trainer, changed)[0], reference[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("feedback, demonstration_loss", CONFIGS)
def test_rollout_rows_get_grpo_trainers_correction(tmp_path, char_tokenizer, feedback, demonstration_loss, mode):
    """HPT's loss = GRPOTrainer's loss on the weighted rollout rows + the demonstration term, with vLLM's inputs on."""
    trainer, batch = vllm_trainer(tmp_path, char_tokenizer, feedback, demonstration_loss, mode)
    demonstration, weights = hpt_rows(batch).demonstration, hpt_rows(batch).weights
    rollouts = ~demonstration & (weights > 0)
    assert set(weights[rollouts].tolist()) == {1.0}
    # The off-policy mask and the ratio both act in this batch (else the comparison would not test them).
    advantages = batch["advantages"].unsqueeze(1)
    kept = GRPOTrainer.get_off_policy_mask(
        advantages,
        batch["old_per_token_logps"],
        batch["sampling_per_token_logps"],
        batch["completion_mask"],
        OFF_POLICY_THRESHOLD,
    )
    assert (kept[rollouts] == 0).any() and (kept[rollouts] == 1).any()
    assert not torch.allclose(batch["importance_sampling_ratio"][rollouts], torch.ones(()))

    hpt = loss_and_grads(trainer, batch)
    # dapo divides by the generation batch's token count, so the rollout sub-batch keeps the full batch's normaliser.
    grpo = loss_and_grads(trainer, rows_of(batch, rollouts), compute_loss=GRPOTrainer._compute_loss)
    demonstrations_only = replace_rows(batch, weights=torch.where(demonstration, weights, torch.zeros_like(weights)))
    demo = loss_and_grads(trainer, demonstrations_only)
    assert demo[0] != 0
    combined = (grpo[0] + demo[0], [g + d for g, d in zip(grpo[1], demo[1])])
    assert_same(hpt, combined, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sequence_level", [False, True], ids=["token", "sequence"])
def test_swap_writes_neutral_vllm_fields_for_demonstrations(tmp_path, char_tokenizer, sequence_level):
    mode = "sequence_truncate" if sequence_level else "token_truncate"
    trainer, _ = vllm_trainer(tmp_path, char_tokenizer, "switch", "sft", mode)
    num_rows, width = 2 * G, 3
    torch.manual_seed(0)
    completion_mask = torch.ones(num_rows, width, dtype=torch.long)
    completion_mask[1, 2:] = 0
    ratio = torch.rand(num_rows, 1 if sequence_level else width) + 0.5
    output = {
        "completion_ids": torch.randint(10, 20, (num_rows, width)),
        "completion_mask": completion_mask,
        "old_per_token_logps": -torch.rand(num_rows, width),
        "sampling_per_token_logps": -torch.rand(num_rows, width),
        "ref_per_token_logps": -torch.rand(num_rows, width),
        "importance_sampling_ratio": ratio,
        "advantages": torch.randn(num_rows),
    }
    before = {k: v.clone() for k, v in output.items()}
    demo = [30, 31, 32, 33, char_tokenizer.eos_token_id]  # longer than the rollouts: the batch widens
    demonstration = torch.tensor([False, False, False, True, False, False, False, False])
    trainer._place_demonstrations(output, demonstration, [Demonstration(demo)] * num_rows)

    new_width = len(demo)
    assert output["completion_ids"].shape == (num_rows, new_width)
    assert output["completion_ids"][3].tolist() == demo and output["completion_mask"][3].tolist() == [1] * new_width
    for key, fill in (("old_per_token_logps", 0.0), ("sampling_per_token_logps", 0.0), ("ref_per_token_logps", 0.0)):
        assert output[key].shape == (num_rows, new_width), key
        assert (output[key][3] == fill).all(), key
        torch.testing.assert_close(output[key][~demonstration, :width], before[key][~demonstration], msg=key)
    ratio_after = output["importance_sampling_ratio"]
    assert ratio_after.shape == ((num_rows, 1) if sequence_level else (num_rows, new_width))
    assert (ratio_after[3] == 1.0).all()
    torch.testing.assert_close(ratio_after[~demonstration, : ratio.size(1)], ratio[~demonstration])
    if not sequence_level:
        assert (ratio_after[~demonstration, width:] == 1.0).all()  # padding: neutral
    assert output["completion_mask"][~demonstration, width:].eq(0).all()


def test_sequence_level_ratio_stays_per_sequence_when_rollouts_are_one_token_long(tmp_path, char_tokenizer):
    """A (B, 1) sequence-level ratio must not be mistaken for per-token values when the completions are 1 wide."""
    trainer, _ = vllm_trainer(tmp_path, char_tokenizer, "switch", "sft", "sequence_truncate")
    num_rows = G
    ratio = torch.tensor([[0.5], [2.0], [1.5], [0.8]])
    output = {
        "completion_ids": torch.full((num_rows, 1), char_tokenizer.eos_token_id),  # every rollout stopped at once
        "completion_mask": torch.ones(num_rows, 1, dtype=torch.long),
        "sampling_per_token_logps": -torch.rand(num_rows, 1),
        "importance_sampling_ratio": ratio.clone(),
        "advantages": torch.randn(num_rows),
    }
    demonstration = torch.tensor([False, False, False, True])
    trainer._place_demonstrations(
        output, demonstration, [Demonstration([30, 31, char_tokenizer.eos_token_id])] * num_rows
    )
    assert output["completion_ids"].shape == (num_rows, 3)
    # Still one ratio per sequence: widening it would correct only each rollout's first token.
    assert output["importance_sampling_ratio"].shape == (num_rows, 1)
    assert output["importance_sampling_ratio"][:, 0].tolist() == [0.5, 2.0, 1.5, 1.0]
