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
    from trl_hpt.testing import build_char_tokenizer

    return build_char_tokenizer()
