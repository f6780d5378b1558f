"""The pieces every objective shares: the per-sample denoising error, the implicit reward, and input checks.

Conventions (docs/conventions.md §1-§5), used by every file in this package:

* ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``t`` a diffusers training timestep.
* ``target`` is ``eps`` (epsilon-prediction) or the velocity (v-prediction); no loss here cares which.
* ``err = mean over all non-batch dims of (pred - target)^2``, shape ``(B,)``: a *mean*, not a sum, as in
  every public implementation, so ``beta`` is per-element and does not change with the resolution.

Why a difference of denoising errors is a reward
-----------------------------------------------
A diffusion model is a policy over denoising chains. One reverse step is Gaussian,
``p_theta(x_{t-1} | x_t) = N(mu_theta(x_t), sigma_t^2 I)``, and with the epsilon parameterisation
``mu_theta = (x_t - (beta_t / sqrt(1 - abar_t)) eps_theta) / sqrt(alpha_t)``. For the same ``x_t``, ``x_{t-1}``
drawn from the forward posterior ``q(x_{t-1} | x_t, x0)``, the log-ratio against a reference model is

    log p_theta(x_{t-1}|x_t) - log p_ref(x_{t-1}|x_t)
        = -(k_t / 2) * ( ||eps_theta(x_t) - eps||^2 - ||eps_ref(x_t) - eps||^2 )  + terms equal for both models

with ``k_t = beta_t^2 / (sigma_t^2 alpha_t (1 - abar_t))`` (Diff-contrast, paper 002 "Diffusion Preference Alignment
via Relative Text-Image Contrast", arXiv:2406.06382, Eq. (8) and App. Eq. (11)-(12); DSPO, paper 004 "DSPO: Direct
Score Preference Optimization for Diffusion Model Alignment", ICLR 2025, Eq. (11) and App. B.1). Holding the timestep
weight constant, as Ho et al. and Diffusion-DPO do, folds ``k_t`` and the element count of the mean into one constant
``beta``:

    r(x) = -(beta / 2) * (err_model(x) - err_ref(x))                                   (implicit reward)

With this convention ``beta = 5000`` is the original Diffusion-DPO code's ``beta_dpo = 5000``, the diffusers SDXL
DPO script's ``beta_dpo = 5000`` (it keeps the 1/2), the diffusers SD1.5 DPO script's ``beta_dpo = 2500`` (it drops
the 1/2) and twice the Diffusion-KTO code's beta (its logit is ``beta_K * (err_ref - err_model)``).
docs/conventions.md has the table (tests/test_conventions.py recomputes every row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "LossOutput",
    "per_sample_mse",
    "implicit_reward",
    "pairwise_accuracy",
    "gaussian_step_log_prob",
]


@dataclass
class LossOutput:
    """What every objective returns: a scalar ``loss`` to call ``.backward()`` on, and detached ``metrics``."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks. Each raises ValueError naming the argument, so a shape bug surfaces at the call site instead of
# as a broadcasting surprise (silently wrong numbers) or a stack trace from deep inside torch.
# ---------------------------------------------------------------------------------------------------------------


def check_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_per_sample(**named: Tensor) -> int:
    """Check that every argument is a float tensor of shape ``(B,)`` with one shared ``B >= 1``; return ``B``."""
    batch, first = None, None
    for name, value in named.items():
        check_tensor(value, name)
        if value.ndim != 1:
            raise ValueError(
                f"{name} must be a per-sample vector of shape (B,), got shape {tuple(value.shape)}; "
                "reduce (pred - target)^2 with per_sample_mse first"
            )
        if value.shape[0] == 0:
            raise ValueError(f"{name} is empty: an objective needs at least one sample")
        if batch is None:
            batch, first = value.shape[0], name
        elif value.shape[0] != batch:
            raise ValueError(
                f"{name} has batch size {value.shape[0]} but {first} has {batch}; they must match"
            )
    return batch


def check_same_shape(**named: Tensor) -> None:
    shape, first = None, None
    for name, value in named.items():
        check_tensor(value, name)
        if value.ndim == 0:
            raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
        if shape is None:
            shape, first = value.shape, name
        elif value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} but {first} has {tuple(shape)}; they must match")


def check_number(value, name: str, *, low: float = 0.0, low_inclusive: bool = False, high: float | None = None) -> float:
    """A finite real number ``> low`` (or ``>= low``) and, if given, ``< high``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or (value == low and not low_inclusive):
        bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
        raise ValueError(f"{name} must be {bound}, got {value:g}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high:g}, got {value:g}")
    return value


def check_labels(labels, name: str, batch: int, device: torch.device) -> Tensor:
    """Binary labels as a bool tensor of shape ``(B,)``. Accepts bools, or 0/1 numbers; anything else is an error
    (a soft label such as 0.5 would otherwise be silently rounded, and a Pick-a-Pic tie is not a label)."""
    if isinstance(labels, Tensor):
        tensor = labels
    elif isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        if not all(isinstance(v, (bool, int, float)) for v in labels):
            raise ValueError(f"{name} must hold booleans (or 0/1), got {labels!r}")
        tensor = torch.tensor([float(v) for v in labels])
    else:
        raise ValueError(f"{name} must be a bool tensor of shape (B,), got {type(labels).__name__}")
    if tensor.ndim != 1 or tensor.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the errors, got {tuple(tensor.shape)}")
    if tensor.dtype != torch.bool:
        if tensor.is_complex() or not bool(((tensor == 0) | (tensor == 1)).all()):
            raise ValueError(f"{name} must be boolean (True/False or 0/1), got values {tensor.tolist()}")
        tensor = tensor == 1
    return tensor.to(device)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(repr(c) for c in choices)}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The shared formulas.
# ---------------------------------------------------------------------------------------------------------------


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``err = mean over all non-batch dims of (pred - target)^2``, shape ``(B,)``.

    Half-precision inputs are upcast to float32 before squaring: a bf16 mean over 4x64x64 latents loses the
    small error differences that the implicit reward is made of.
    """
    check_same_shape(pred=pred, target=target)
    if pred.dtype in (torch.float16, torch.bfloat16) or target.dtype in (torch.float16, torch.bfloat16):
        pred, target = pred.float(), target.float()
    # err_i = (1/D) sum_d (pred_id - target_id)^2:  (B, ...) -> (B, D) -> (B,)
    squared = (pred - target).pow(2)
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def implicit_reward(err_model: Tensor, err_ref: Tensor, beta: float) -> Tensor:
    """``r = -(beta / 2) * (err_model - err_ref)``, shape ``(B,)`` (derivation in the module docstring).

    ``beta = 0`` is allowed (it switches the preference term off, as DSPO with beta 0 does); negative is not.
    """
    check_per_sample(err_model=err_model, err_ref=err_ref)
    beta = check_number(beta, "beta", low_inclusive=True)
    # r = -(beta/2)(err_model - err_ref)
    return -(beta / 2.0) * (err_model - err_ref)


def pairwise_accuracy(margin: Tensor) -> float:
    """``mean(margin > 0) + 0.5 * mean(margin == 0)``: ties count half, so an untrained model reads 0.5."""
    margin = margin.detach()
    # acc = mean(m > 0) + 0.5 mean(m == 0)
    return ((margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()).item()


def masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values[mask]`` as a float; NaN when the mask is empty (the metric does not exist this batch)."""
    if not bool(mask.any()):
        return float("nan")
    return values.detach()[mask].float().mean().item()


def gaussian_step_log_prob(sample: Tensor, mean: Tensor, std) -> Tensor:
    """Log-density of one stochastic sampler step, ``log N(sample; mean, std^2 I)``, *averaged* over non-batch dims.

        log p(x_{t-1} | x_t) = mean_d [ -(x_{t-1,d} - mu_d)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

    Averaging (not summing) keeps the scale independent of the resolution, as the SPO code does; the constant
    terms cancel in every ratio the objectives take. ``std`` is a number or a tensor broadcastable to ``sample``
    (e.g. shape ``(B, 1, 1, 1)`` when the step size differs per sample). Returns shape ``(B,)``.
    """
    check_same_shape(sample=sample, mean=mean)
    if isinstance(std, Tensor):
        check_tensor(std, "std")
        if not bool((std > 0).all()):
            raise ValueError("std must be > 0 everywhere (a deterministic step has no log-density)")
    else:
        std = check_number(std, "std")
        std = torch.tensor(std, dtype=sample.dtype, device=sample.device)
    # std must broadcast to sample's shape; checked by hand because torch.broadcast_shapes imports sympy on first
    # use (~0.5 s of CPU on the toy's critical path, SPO)
    fits = std.ndim <= sample.ndim and all(s in (1, n) for s, n in zip(reversed(std.shape), reversed(sample.shape)))
    if not fits:
        raise ValueError(f"std of shape {tuple(std.shape)} does not broadcast to sample {tuple(sample.shape)}")
    # log N(x; mu, std^2) = -(x - mu)^2 / (2 std^2) - log std - log sqrt(2 pi), per element
    log_prob = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    # mean over the non-batch dims:  (B, ...) -> (B, D) -> (B,)
    return log_prob.reshape(log_prob.shape[0], -1).mean(dim=1)
