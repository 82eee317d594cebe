"""trl-hpt: Hybrid Post-Training and the Unified Policy Gradient Estimator for TRL.

Implements "Towards a Unified View of Large Language Model Post-Training" (Lv et al., 2025, arXiv:2509.04419).

    >>> from trl_hpt import HPTConfig, HPTTrainer

Heavy modules (torch, transformers, trl) are imported lazily so that `trl-hpt --help` stays fast.
"""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

_LAZY = {
    "HPTConfig": "trl_hpt.config",
    "HPTTrainer": "trl_hpt.trainer",
    "HPTReportCallback": "trl_hpt.callbacks",
    "EstimatorSpec": "trl_hpt.estimator",
    "PRESETS": "trl_hpt.estimator",
    "per_token_policy_loss": "trl_hpt.estimator",
}

__all__ = [
    "HPTConfig",
    "HPTReportCallback",
    "HPTTrainer",
    "PRESETS",
    "EstimatorSpec",
    "__version__",
    "per_token_policy_loss",
]

if TYPE_CHECKING:
    from trl_hpt.callbacks import HPTReportCallback
    from trl_hpt.config import HPTConfig
    from trl_hpt.estimator import PRESETS, EstimatorSpec, per_token_policy_loss
    from trl_hpt.trainer import HPTTrainer


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_hpt' has no attribute {name!r}")
