"""minipref: preference objectives for diffusion models, one file per paper, pure functions of tensors.

Every objective takes per-sample denoising errors (or predictions, or step log-probabilities), never a model, and
returns a ``LossOutput(loss, metrics)``. The conventions (one beta, mean over dims, shared noise) are in ``common.py``
and, numbered (§1-§10, identities I1-I10), in docs/conventions.md; ``OBJECTIVES`` maps a method name to its function
and the data it needs, and ``METHODS`` (``methods.py``) is the table every trainer reads: a method's options, what a
step needs, and its loss adapter.

Docstrings cite the papers by number, 000-004, with title and arXiv id at the top of each module; the Papers table
of docs/methods.md lists them all.
"""

from .bce import bce_loss
from .common import LossOutput, gaussian_step_log_prob, implicit_reward, pairwise_accuracy, per_sample_mse
from .contrast import contrast_loss, contrast_weights
from .dpo import dpo_loss
from .dspo import dspo_loss
from .kto import kto_loss
from .methods import METHODS, Method, Option, StepErrors, get_method, register
from .registry import DATA_KINDS, OBJECTIVES, Objective, get_objective
from .sft import csft_prompts, sft_loss
from .spin import spin_loss
from .spo import ddim_step_gaussian, spo_loss

__all__ = [
    "LossOutput",
    "per_sample_mse",
    "implicit_reward",
    "pairwise_accuracy",
    "gaussian_step_log_prob",
    "sft_loss",
    "csft_prompts",
    "bce_loss",
    "dpo_loss",
    "kto_loss",
    "spin_loss",
    "contrast_weights",
    "contrast_loss",
    "dspo_loss",
    "spo_loss",
    "ddim_step_gaussian",
    "Objective",
    "OBJECTIVES",
    "DATA_KINDS",
    "get_objective",
    "METHODS",
    "Method",
    "Option",
    "StepErrors",
    "get_method",
    "register",
]
