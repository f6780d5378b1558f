"""SPO: step-by-step preference optimisation on pairs of *single denoising steps*.

Paper 003, "Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference
Optimization" (Liang et al. 2024, arXiv:2406.04314), Sec. 4, Eq. (4)-(5), as docs/conventions.md §7 states them
in this repository's convention, with the clipping of the authors' code.

Pairs are made online. At a denoising step with ``t < 750`` (Sec. 5.1; the timestep-range ablation is in Sec. 5.4),
``k`` candidates ``x_{t-1}`` are drawn from one shared ``x_t`` with a stochastic DDIM step (eta = 1); a step-aware
preference model scores each candidate's predicted ``x0`` given ``(prompt, t)`` (Sec. 4.2); best and worst form the
pair, kept only when ``softmax([s_best, s_worst])`` differs by more than a threshold (0.3 SD1.5, 0.4 SDXL); the chain
continues from a *random* candidate. The objective is DPO on the log-probabilities of the two steps under the policy:

    log rho_y = clamp( log pi_theta(x_{t-1}^y | x_t) - log pi_ref(x_{t-1}^y | x_t),  log(1 - clip), log(1 + clip) )
    L_SPO     = mean softplus( -beta * (log rho_w - log rho_l) )

The clamp is PPO's trust region (the ratio ``rho`` lives in ``[1 - clip, 1 + clip]``): outside it the gradient
is exactly zero, so a pair the policy has moved far on stops pushing. Clamping the log-ratio is the same as clamping
``exp(log-ratio)`` and taking the log, without overflowing ``exp``. The log-probabilities come from
``gaussian_step_log_prob`` and are averaged over dimensions.

Hyperparameters (Sec. 5.1): DDIM 20 steps, eta 1, CFG 5; 4 candidates (SD1.5) / 2 (SDXL); LoRA rank 4 (SD1.5) /
64 (SDXL). Beta 10 and clip 0.1 are not readable in the extracted Sec. 5.1 (its "strength of regularization" lost
its value): they come from the authors' config, RockeyCoss/SPO ``configs/basic_config.py`` (``train.beta = 10.0``,
``train.eps = 0.1``).

``ddim_step_gaussian`` gives the Gaussian a stochastic DDIM step samples from, so the toy and the full-scale SPO
score ``log pi(x_{t-1} | x_t)`` with one implementation (tests check it against diffusers' ``DDIMScheduler.step``).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

import torch

from .common import LossOutput, check_choice, check_number, check_per_sample, check_same_shape, pairwise_accuracy


def spo_loss(
    logp_w: Tensor,
    ref_logp_w: Tensor,
    logp_l: Tensor,
    ref_logp_l: Tensor,
    *,
    beta: float = 10.0,
    clip: float = 0.1,
) -> LossOutput:
    """Eq. (4)-(5) of paper 003 with the ratio clipping of docs/conventions.md §7; inputs are step log-probs ``(B,)``."""
    check_per_sample(logp_w=logp_w, ref_logp_w=ref_logp_w, logp_l=logp_l, ref_logp_l=ref_logp_l)
    beta = check_number(beta, "beta")
    clip = check_number(clip, "clip", high=1.0)
    low, high = math.log(1 - clip), math.log(1 + clip)

    # log pi_theta(x_{t-1} | x_t) - log pi_ref(x_{t-1} | x_t), for the winning and the losing step
    raw_w, raw_l = logp_w - ref_logp_w, logp_l - ref_logp_l
    # log rho = clamp(log-ratio, log(1 - clip), log(1 + clip)): zero gradient outside the trust region
    log_ratio_w = raw_w.clamp(low, high)
    log_ratio_l = raw_l.clamp(low, high)
    # beta (log rho_w - log rho_l)
    logit = beta * (log_ratio_w - log_ratio_l)
    # L = mean softplus(-logit) = mean -log sigmoid(logit)
    loss = -F.logsigmoid(logit).mean()

    clipped = ((raw_w < low) | (raw_w > high) | (raw_l < low) | (raw_l > high)).float()
    return LossOutput(
        loss,
        {
            "loss": loss.item(),
            "implicit_acc": pairwise_accuracy(logit),
            "logit": logit.detach().float().mean().item(),
            "log_ratio_w": raw_w.detach().float().mean().item(),
            "log_ratio_l": raw_l.detach().float().mean().item(),
            "clip_frac": clipped.mean().item(),
        },
    )


def ddim_step_gaussian(
    model_output: Tensor,
    x_t: Tensor,
    alpha_bar_t,
    alpha_bar_prev,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` of one stochastic DDIM step ``x_t -> x_prev`` (Song et al. 2021, "Denoising Diffusion Implicit
    Models", Eq. (12) and (16)):

        x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
        std    = eta * sqrt( (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev) )
        mean   = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps_hat

    ``eta = 1`` makes ``std`` the DDPM posterior standard deviation of the (possibly strided) step, as SPO samples.
    ``alpha_bar_t`` / ``alpha_bar_prev`` are numbers or per-sample tensors ``(B,)``; ``std`` comes back shaped
    ``(B, 1, ..., 1)`` to broadcast over the sample. ``mean`` is differentiable in ``model_output``, so
    ``gaussian_step_log_prob(x_prev, mean, std)`` is the policy's log-probability of the step.

    The last step (``t - T/steps < 0``): the SPO authors clamp the previous timestep at 0, so ``alpha_bar_prev =
    alphas_cumprod[0]`` (``ddim_with_logprob.py``). diffusers' ``final_alpha_cumprod`` is the same number when the
    scheduler config sets ``set_alpha_to_one: false``, as SD1.5's and SDXL's do; with ``true`` it is 1, ``std`` is 0
    and the step has no log-density (``gaussian_step_log_prob`` refuses ``std = 0``).
    """
    check_same_shape(model_output=model_output, x_t=x_t)
    check_choice(prediction_type, "prediction_type", ("epsilon", "v_prediction"))
    eta = check_number(eta, "eta")
    shape = (-1,) + (1,) * (x_t.ndim - 1)  # (B,) -> (B, 1, ..., 1)
    abar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device).reshape(shape)
    abar_prev = torch.as_tensor(alpha_bar_prev, dtype=x_t.dtype, device=x_t.device).reshape(shape)
    for name, value in (("alpha_bar_t", abar_t), ("alpha_bar_prev", abar_prev)):
        if value.numel() not in (1, x_t.shape[0]):
            raise ValueError(f"{name} must be a number or have shape ({x_t.shape[0]},), got {value.numel()} values")
    if bool(((abar_t <= 0) | (abar_t >= 1) | (abar_prev <= 0) | (abar_prev > 1) | (abar_prev <= abar_t)).any()):
        raise ValueError("need 0 < alpha_bar_t < alpha_bar_prev <= 1: a step goes from noisier to cleaner")
    if prediction_type == "epsilon":
        eps = model_output
        # x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
        x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    else:
        # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, solved for x0 and eps given x_t
        x0 = abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * model_output
        eps = abar_t.sqrt() * model_output + (1 - abar_t).sqrt() * x_t
    # std = eta sqrt( (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev) )
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance.sqrt()
    # mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps_hat   (clamped at 0 against rounding)
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std.expand(x_t.shape[0], *std.shape[1:])  # (1 or B, 1, ..., 1) -> (B, 1, ..., 1)
