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
from full.models.families import get_family

logger = logging.getLogger(__name__)


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
    """The method's options with their per-family defaults (a flow family takes the column its object names,
    `Family.option_defaults_of`), and beta from the first source that sets it."""
    fam = get_family(family)
    options = dict(options)
    for option in method.options:
        if option.family_default and options.get(option.name) is None:
            options[option.name] = option.family_default[fam.option_defaults_of]
    beta_dpo = options.get("beta_dpo")
    if beta_dpo is not None:
        if fam.beta_dpo is None:
            raise ValueError(f"--beta_dpo is the convention of diffusers' SD1.5/SDXL DPO scripts; there is none for "
                             f"{family}: give --beta (docs/flow_matching.md, the scale of beta)")
        # the SD1.5 script has no 1/2 in logsigmoid(beta_dpo * diff): our beta is 2x; the SDXL script keeps it
        factor, script = fam.beta_dpo
        beta = factor * beta_dpo
        beta_source = f"--beta_dpo {beta_dpo:g} in the convention of diffusers' {script}"
    elif beta is None:
        beta = method.beta
        beta_source = f"the default of minipref.{minipref.OBJECTIVES[method.objective].fn.__name__}"
    if beta is not None:
        logger.info("beta %g (from %s)", beta, beta_source)
    return Objective(method, options, beta, beta_source or "--beta")
