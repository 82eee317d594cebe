import os


# Tests never reach a hub: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(2)


@pytest.fixture
def char_tokenizer():
    from trl_hpt.demo import build_char_tokenizer

    return build_char_tokenizer()


def tiny_model(tokenizer, seed=0):
    from trl_hpt.demo import build_tiny_model

    return build_tiny_model(tokenizer, hidden_size=32, num_layers=2, seed=seed)


def train_args(tmp_path, cls=None, **overrides):
    """A CPU config for tiny runs: SGD without clipping, so two correct implementations give equal parameters."""
    from trl_hpt import HPTConfig

    cls = cls or HPTConfig
    values = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "learning_rate": 0.05,
        "optim": "sgd",
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "max_steps": 3,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return cls(**values)


def dense_reward(completions, **kwargs):
    """A reward that differs between almost any two completions, so every GRPO step moves the weights."""
    return [(sum(ord(c) * (i + 1) for i, c in enumerate(str(x))) % 97) / 97 for x in completions]


def slot_reward(rows, num_correct, num_generations):
    """
    A reward by rollout slot: the first `num_correct[j]` rollouts of prompt `j`'s group are correct (reward 1), the
    others score `0.2 * slot`, so the accuracy P of each prompt is known exactly and advantages are not all zero.
    """
    correct = {row["prompt"]: k for row, k in zip(rows, num_correct)}

    def reward(prompts, completions, **kwargs):
        return [
            1.0 if i % num_generations < correct[p] else 0.2 * (i % num_generations) for i, p in enumerate(prompts)
        ]

    return reward


def generation_batch(trainer, num_generations):
    """One generation batch as the trainer's dataloader yields it: every training prompt repeated per rollout."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss reads it
    rows = [dict(trainer.train_dataset[i]) for i in range(len(trainer.train_dataset))]
    return trainer._generate_and_score_completions([dict(r) for r in rows for _ in range(num_generations)])


def assert_same(a, b, **tolerance):
    """`a` and `b` are `(loss, [gradients])`: equal loss and equal gradients, parameter by parameter."""
    torch.testing.assert_close(a[0], b[0], **tolerance)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, **tolerance)
