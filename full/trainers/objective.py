"""What one step of the offline trainer (and SPIN) computes, and with which beta.

The method is a row of the method table (`minipref/methods.py`): its options come from the flags, checked
against the row at parse time (`full.cli.method_options`); here they get their per-family defaults, and beta is
resolved in this one place, from the first of

    --beta_dpo B (the diffusers DPO scripts' convention, converted per model family)
    --beta / a --preset's beta
    the default of the method's minipref loss function

and logged with where it came from. A step then turns the model's predictions into the row's `StepErrors` and
calls the row's adapter: every formula lives in `minipref`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor

import minipref
from minipref.methods import Method, StepErrors

logger = logging.getLogger(__name__)

# diffusers' train_diffusion_dpo.py (SD1.5) has no 1/2 in its loss, logsigmoid(beta_dpo * diff): our beta is 2x;
# train_diffusion_dpo_sdxl.py keeps it, -0.5 * beta_dpo * diff: our beta is the same (docs/conventions.md).
BETA_DPO_FACTOR = {"sd15": 2.0, "sdxl": 1.0}
BETA_DPO_SCRIPT = {"sd15": "train_diffusion_dpo.py", "sdxl": "train_diffusion_dpo_sdxl.py"}


@dataclass(frozen=True)
class Objective:
    """A method with its options and beta resolved for one model family."""

    method: Method
    options: dict
    beta: float | None
    beta_source: str

    @property
    def needs_reference(self) -> bool:
        return self.method.reference(self.options)

    def loss(self, pred: Tensor, ref_pred: Tensor | None, target: Tensor, inputs, batch=None) -> minipref.LossOutput:
        """The row's loss of one micro-batch. ``inputs`` (`full.trainers.denoise.StepInputs`) gives the labels and
        Diff-contrast's embeddings; ``batch`` (`full.run.global_batch.GlobalBatch`) the other processes' items for
        the losses that look across the batch (None: this process's)."""
        err = minipref.per_sample_mse(pred, target)  # (n*B,)
        ref_err = None if ref_pred is None else minipref.per_sample_mse(ref_pred, target)
        emb = inputs.embeddings  # (B, 2, E): [winner, loser]
        errors = StepErrors(err, ref_err, inputs.n, inputs.desirable, pred, ref_pred, target,
                            None if emb is None else emb[:, 0], None if emb is None else emb[:, 1])
        return self.method.loss(errors, self.options, self.beta, batch)


def resolve_objective(method: Method, options: dict, beta: float | None, beta_source: str | None,
                      family: str) -> Objective:
    """The method's options with their per-family defaults, and beta from the first source that sets it."""
    options = dict(options)
    for option in method.options:
        if option.family_default and options.get(option.name) is None:
            options[option.name] = option.family_default[family]
    beta_dpo = options.get("beta_dpo")
    if beta_dpo is not None:
        beta = BETA_DPO_FACTOR[family] * beta_dpo
        beta_source = f"--beta_dpo {beta_dpo:g} in the convention of diffusers' {BETA_DPO_SCRIPT[family]}"
    elif beta is None:
        beta = method.beta
        beta_source = f"the default of minipref.{minipref.OBJECTIVES[method.objective].fn.__name__}"
    if beta is not None:
        logger.info("beta %g (from %s)", beta, beta_source)
    return Objective(method, options, beta, beta_source or "--beta")
