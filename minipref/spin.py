"""SPIN-Diffusion: self-play, the model against its own earlier iterate.

Yuan et al., "Self-Play Fine-Tuning of Diffusion Models for Text-to-Image Generation" (2024, arXiv:2402.10210), as
used in paper 000 Sec. 3.2 (iii): iteration ``k`` plays against a frozen copy ``theta_k``. For each prompt the winner
is the *real* image and the loser is the opponent's own sample for the same prompt; the reference is the opponent
itself:

    L_SPIN(theta; theta_k) = -log sigmoid( r(x_real) - r(x_generated) ),
    r(x) = -(beta/2) (||eps_theta(x_t) - eps||^2 - ||eps_theta_k(x_t) - eps||^2)

This is Diffusion-DPO's loss (paper 000 Eq. (4)) on self-generated pairs. When the model can no longer tell its
samples from real data the gradient vanishes; after each iteration the opponent becomes the trained model. The
full SPIN-Diffusion paper uses a per-timestep decomposition over the whole chain; paper 000 and this function use
the single-timestep DPO form, the one the LoRA study trained with.

Hyperparameters (paper 000 Sec. 4): SD v1.5 LoRA rank 8, AdamW lr 1e-4, 500 warmup, 10k steps; beta as DPO.
"""

from __future__ import annotations

from torch import Tensor

from .common import LossOutput
from .dpo import dpo_loss


def spin_loss(
    err_real: Tensor,
    err_generated: Tensor,
    opp_err_real: Tensor,
    opp_err_generated: Tensor,
    *,
    beta: float = 5000.0,
) -> LossOutput:
    """DPO with winner = real image, loser = the opponent's sample, reference = the opponent ``theta_k``."""
    try:
        # L = -log sigmoid(r(x_real) - r(x_generated)),  r(x) = -(beta/2)(err_theta(x) - err_theta_k(x))
        out = dpo_loss(err_real, err_generated, opp_err_real, opp_err_generated, beta=beta)
    except ValueError as error:  # name the arguments as the caller knows them
        message = str(error)
        for dpo_name, spin_name in (
            ("ref_err_w", "opp_err_real"),
            ("ref_err_l", "opp_err_generated"),
            ("err_w", "err_real"),
            ("err_l", "err_generated"),
        ):
            message = message.replace(dpo_name, spin_name)
        raise ValueError(message) from None
    out.metrics["reward_real"] = out.metrics["reward_w"]
    out.metrics["reward_generated"] = out.metrics["reward_l"]
    return out
