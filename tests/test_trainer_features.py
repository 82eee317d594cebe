"""HPTTrainer keeps GRPOTrainer's features: PEFT, several iterations, accumulation, resuming, evaluation."""

import os

import pytest
import torch
from trl import GRPOConfig

from trl_hpt import HPTConfig
from trl_hpt.rewards import exact_match_reward
from trl_hpt.testing import addition_rows, dense_reward, make_trainer, tiny_model, train_args


PAIRS = [(1, 2), (3, 4), (5, 5), (2, 7), (8, 1), (6, 6)]


def _trainer(tmp_path, tokenizer, reward=exact_match_reward, **overrides):
    overrides.setdefault("per_device_train_batch_size", 8)
    return make_trainer(tmp_path, tokenizer, addition_rows(PAIRS), reward, **overrides)


def test_lora_trains_only_the_adapter(tmp_path, char_tokenizer):
    from peft import LoraConfig

    trainer = _trainer(
        tmp_path,
        char_tokenizer,
        max_steps=2,
        learning_rate=0.5,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any((params[n] - v).abs().max() > 0 for n, v in lora.items())
    assert all(torch.equal(params[n], v) for n, v in base.items())
    assert trainer.state.log_history[0]["hpt/sft_fraction"] > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_iterations": 2},
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
        {"steps_per_generation": 3},
        {"num_iterations": 2, "steps_per_generation": 2, "loss_type": "grpo"},
    ],
    ids=["iterations", "accumulation", "steps_per_generation", "iterations+spg"],
)
def test_iterations_accumulation_and_generation_reuse(tmp_path, char_tokenizer, overrides):
    trainer = _trainer(tmp_path, char_tokenizer, reward=dense_reward, max_steps=3, **overrides)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(logs) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    # Like GRPOTrainer's reward metrics, the gate metrics come with the steps that generate.
    assert all(("hpt/prompt_accuracy" in h) == ("reward" in h) for h in logs)
    assert any("hpt/prompt_accuracy" in h for h in logs) and all("hpt/demonstration_loss" in h for h in logs)


def test_checkpoint_resumes_and_finishes(tmp_path, char_tokenizer):
    run = dict(max_steps=4, save_strategy="steps", save_steps=2, reward=dense_reward)
    trainer = _trainer(tmp_path / "a", char_tokenizer, **run)
    trainer.train()
    full = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()

    resumed = _trainer(tmp_path / "a", char_tokenizer, **run)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    # the log keeps the metrics of the steps before the checkpoint
    steps = [h["step"] for h in resumed.state.log_history if "hpt/sft_fraction" in h]
    assert steps == [1, 2, 3, 4]
    moved = max((p.detach() - full[n]).abs().max().item() for n, p in resumed.model.named_parameters())
    assert moved < 1.0  # resumed from the saved weights, not from scratch
    assert os.path.isdir(tmp_path / "a" / "checkpoint-4")


def test_evaluation_uses_no_demonstrations_and_reports_accuracy(tmp_path, char_tokenizer):
    eval_rows = [{"prompt": r["prompt"], "solution": r["solution"]} for r in addition_rows(PAIRS[:4])]
    trainer = _trainer(
        tmp_path,
        char_tokenizer,
        eval_rows=eval_rows,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and "eval_hpt/prompt_accuracy" in evals[0] and "eval_reward" in evals[0]
    assert not any(k.startswith("eval_hpt/sft") for k in evals[0])


def test_accepts_plain_grpo_config(tmp_path, char_tokenizer):
    trainer = _trainer(tmp_path, char_tokenizer, config_cls=GRPOConfig, max_steps=1)
    assert isinstance(trainer.args, HPTConfig) and trainer.args.feedback == "switch"
    assert trainer.args.per_device_train_batch_size == 8 and trainer.args.steps_per_generation == 1
    trainer.train()


def test_unsupported_trl_version_is_refused(tmp_path, char_tokenizer):
    from trl_hpt.trainer import check_trl_version

    # Every loss type of TRL 1.16 is accepted (sapo, luspo and vespo included: see the parity tests).
    for loss_type in ("sapo", "luspo", "vespo"):
        assert train_args(tmp_path, loss_type=loss_type).loss_type == loss_type
    with pytest.raises(ImportError, match=r"trl>=1\.16\.0,<1\.17\.0.*2\.0\.0"):
        check_trl_version("2.0.0")
    check_trl_version("1.16.3")


def test_config_validation_names_the_field(tmp_path):
    for field, value in [
        ("feedback", "sometimes"),
        ("demonstration_loss", "dpo"),
        ("switch_gate", 1.5),
        ("demonstration_loss_coef", -1),
    ]:
        with pytest.raises(ValueError, match=field):
            train_args(tmp_path, **{field: value})


def test_former_demonstration_field_names_still_work_with_a_warning(tmp_path):
    from trl_hpt.config import RENAMED_FIELDS

    values = {"sft_loss_coef": 0.3, "offline_loss": "luffy", "offline_shaping_gamma": 0.5}
    with pytest.warns(FutureWarning, match="offline_loss is deprecated") as record:
        args = train_args(tmp_path, feedback="soft", **values)
    assert (args.demonstration_loss_coef, args.demonstration_loss, args.demonstration_shaping_gamma) == (
        0.3,
        "luffy",
        0.5,
    )
    assert all(getattr(args, old) is None for old in RENAMED_FIELDS)
    assert sum("deprecated" in str(w.message) and "trl-hpt" in str(w.message) for w in record) == 3
    with pytest.raises(ValueError, match="demonstration_aggregation='sum' is not one of"):
        train_args(tmp_path, offline_aggregation="sum")
    # A GRPOConfig turned into an HPTConfig takes the former names too.
    grpo = train_args(tmp_path, cls=GRPOConfig)
    with pytest.warns(FutureWarning, match="sft_loss_coef"):
        assert HPTConfig.from_grpo_config(grpo, sft_loss_coef=2.0).demonstration_loss_coef == 2.0


def test_trainer_setup_checks_name_the_field(tmp_path, caplog):
    import logging

    args = HPTConfig(str(tmp_path), verifier_reward_index=2, report_to="none", bf16=False)
    with pytest.raises(ValueError, match="verifier_reward_index=2 but 2 reward"):
        args.check_trainer_setup(num_reward_funcs=2, uses_demonstrations=True, deepspeed=False, environments=False)
    args = HPTConfig(str(tmp_path), skip_grad_norm_above=80.0, report_to="none", bf16=False)
    with pytest.raises(ValueError, match="skip_grad_norm_above is not supported with DeepSpeed"):
        args.check_trainer_setup(num_reward_funcs=1, uses_demonstrations=True, deepspeed=True, environments=False)
    args = HPTConfig(str(tmp_path), demonstration_loss="luffy", feedback="soft", report_to="none", bf16=False)
    with pytest.raises(ValueError, match="demonstration_loss='luffy' scores each demonstration"):
        args.check_trainer_setup(num_reward_funcs=1, uses_demonstrations=True, deepspeed=False, environments=True)
    with caplog.at_level(logging.WARNING, logger="trl_hpt.config"):
        args.check_trainer_setup(num_reward_funcs=2, uses_demonstrations=True, deepspeed=False, environments=False)
        args.check_trainer_setup(num_reward_funcs=2, uses_demonstrations=False, deepspeed=False, environments=False)
    assert sum("verifier_reward_index=None" in r.getMessage() for r in caplog.records) == 1


def test_config_for_trainer_keeps_an_hpt_config_and_converts_a_grpo_config(tmp_path):
    from trl import GRPOConfig

    given = HPTConfig(str(tmp_path), report_to="none", bf16=False)
    assert HPTConfig.for_trainer(given, "org/tiny-model") is given
    converted = HPTConfig.for_trainer(GRPOConfig(str(tmp_path), report_to="none", bf16=False), "org/tiny-model")
    assert isinstance(converted, HPTConfig) and converted.feedback == "switch"


def test_positional_arguments_follow_grpo_trainers_order(tmp_path, char_tokenizer):
    """Past train_dataset, positional arguments go to GRPOTrainer in its own order (eval_dataset, processing_class...)."""
    from datasets import Dataset

    from trl_hpt import HPTTrainer

    dataset = Dataset.from_list(addition_rows(PAIRS))
    args = train_args(tmp_path, max_steps=1)
    model = tiny_model(char_tokenizer)
    trainer = HPTTrainer(model, exact_match_reward, args, dataset, dataset, char_tokenizer)
    assert trainer.eval_dataset is dataset and trainer.processing_class is char_tokenizer
