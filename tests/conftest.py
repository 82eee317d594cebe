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
