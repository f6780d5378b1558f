"""Rectified flow (SD3, SD3.5, FLUX.1): the tensor maths a trainer needs, as pure functions. No model calls here.

What a flow model changes for minipref (docs/flow_matching.md has the derivation and the citations):

* **noising** is a straight line between the clean latent and the noise, ``x_t = (1 - sigma) x0 + sigma * noise``,
  with ``sigma`` in ``(0, 1]`` read from a diffusers ``FlowMatchEulerDiscreteScheduler``;
* **the target** is the velocity ``v = noise - x0`` (the ``dx_t / dsigma`` of that line), so the per-sample error is
  the velocity error ``err_v = mean (v_theta - v)^2`` (``minipref.per_sample_mse``);
* **timesteps** are drawn as diffusers' ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py`` draw
  them: ``u`` from ``diffusers.training_utils.compute_density_for_timestep_sampling``, then
  ``index = floor(u * num_train_timesteps)`` into the scheduler's (shifted, descending) training table;
* **the weight per timestep** that turns a velocity error into the noise error of the same prediction is
  ``(1 - sigma)^2``: ``err_eps = (1 - sigma)^2 err_v``. Multiplying ``err_v`` by it (``noise_equivalent_error``) lets
  every error-based core objective run unchanged with the SD convention's beta (docs/conventions.md §2).

FLUX packs its latents into 2x2 patches; ``pack_flux_latents`` / ``unpack_flux_latents`` call diffusers'
``FluxPipeline._pack_latents`` / ``_unpack_latents`` (static methods) rather than copying them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from minipref import per_sample_mse

if TYPE_CHECKING:  # diffusers is imported where it is used: `import full.models` stays light (the command lines)
    from diffusers import FlowMatchEulerDiscreteScheduler

__all__ = ["TimestepSampling", "SD3_SCRIPT_SAMPLING", "FLUX_SCRIPT_SAMPLING", "training_schedule", "sample_timesteps",
           "loss_weighting", "add_noise", "velocity_target", "velocity_error", "x0_from_velocity",
           "noise_from_velocity", "velocity_from_noise", "noise_error_weight", "noise_equivalent_error",
           "elbo_velocity_weight", "log_snr", "pack_flux_latents", "unpack_flux_latents", "flux_latent_image_ids"]

WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


@dataclass(frozen=True)
class TimestepSampling:
    """The timestep flags of the diffusers SD3/FLUX scripts (``--weighting_scheme``, ``--logit_mean``, ...).

    ``logit_normal`` and ``mode`` change the *density* of ``u`` (SD3 paper, arXiv:2403.03206, Sec. 3.1);
    ``sigma_sqrt``, ``cosmap`` and ``none`` draw ``u`` uniformly (``sigma_sqrt``/``cosmap`` weight the loss instead,
    ``loss_weighting``).
    """

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


# The scripts' defaults: train_dreambooth_lora_sd3.py `--weighting_scheme logit_normal` (mean 0, std 1, mode 1.29);
# train_dreambooth_lora_flux.py `--weighting_scheme none` (uniform u).
SD3_SCRIPT_SAMPLING = TimestepSampling("logit_normal")
FLUX_SCRIPT_SAMPLING = TimestepSampling("none")


def training_schedule(scheduler_config: Mapping[str, Any]) -> "FlowMatchEulerDiscreteScheduler":
    """The scheduler copy the scripts draw training timesteps from (``noise_scheduler_copy``), never ``set_timesteps``.

    Its ``timesteps`` run from ``num_train_timesteps`` down to 1 and ``sigmas = timesteps / num_train_timesteps``.
    With ``use_dynamic_shifting=False`` (SD3, SD3.5: ``shift=3.0``) the table is already shifted,
    ``sigma = shift s / (1 + (shift - 1) s)``; with ``use_dynamic_shifting=True`` (FLUX.1) training sees the
    unshifted table, as in the FLUX script.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))


def sample_timesteps(schedule: "FlowMatchEulerDiscreteScheduler", batch_size: int, sampling: TimestepSampling,
                     generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
    """``(timesteps, sigmas)``, each shape ``(B,)``, drawn as the diffusers SD3/FLUX scripts draw them.

    The transformer takes ``timesteps`` (SD3) or ``timesteps / 1000`` (FLUX's script); the noising uses ``sigmas``.
    A pair's winner and loser must share one draw (docs/conventions.md §3): draw ``B`` and repeat, never ``2B``.
    ``device``: where ``u`` is drawn (a CUDA ``generator`` needs its own device); the result is on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=sampling.weighting_scheme, batch_size=batch_size, logit_mean=sampling.logit_mean,
        logit_std=sampling.logit_std, mode_scale=sampling.mode_scale, generator=generator,
        device=device if device is not None else "cpu").cpu()
    num_train_timesteps = schedule.config.num_train_timesteps
    # index = floor(u N), into a table that runs from sigma_max (index 0) down to sigma_min. The scripts do exactly
    # this; the clamp only guards u = 1 ("mode" at u_raw = 0), which would index past the end of the table.
    indices = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    # The scripts look sigma up by matching the timestep (`get_sigmas`); the table's entries are distinct, so the
    # same index gives the same sigma.
    return schedule.timesteps[indices], schedule.sigmas[indices]


def loss_weighting(weighting_scheme: str, sigmas: Tensor) -> Tensor:
    """The scripts' per-sample loss weight (diffusers ``compute_loss_weighting_for_sd3``), shape of ``sigmas``.

    ``sigma_sqrt``: ``sigma^-2``; ``cosmap``: ``2 / (pi (1 - 2 sigma + 2 sigma^2))``; any other scheme: 1. Because it is
    one number per sample, ``mean(w (pred - target)^2) = w * per_sample_mse(pred, target)``.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)


def _per_sample(sigmas: Tensor, like: Tensor) -> Tensor:
    """``sigmas`` of shape ``(B,)`` viewed as ``(B, 1, 1, ...)`` to broadcast against ``like``."""
    if sigmas.ndim != 1 or sigmas.shape[0] != like.shape[0]:
        raise ValueError(f"sigmas must have shape ({like.shape[0]},), got {tuple(sigmas.shape)}")
    return sigmas.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """The point at ``sigma`` on the straight line from the clean latent to the noise."""
    sigma = _per_sample(sigmas, x0)
    # x_t = (1 - sigma) x0 + sigma * noise
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """What the transformer is trained to predict: the line's direction, constant along it."""
    # v = dx_t / dsigma = noise - x0
    return noise - x0


def velocity_error(prediction: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """The per-sample velocity error, shape ``(B,)``: the flow model's ``err`` for every core objective."""
    # err_v = mean over non-batch dims of (v_theta - (noise - x0))^2
    return per_sample_mse(prediction, velocity_target(x0, noise))


def x0_from_velocity(noisy: Tensor, velocity: Tensor, sigmas: Tensor) -> Tensor:
    """The clean latent a velocity implies at ``x_t`` (one Euler step from ``sigma`` to 0)."""
    sigma = _per_sample(sigmas, noisy)
    # x_t = x0 + sigma (noise - x0) = x0 + sigma v   =>   x0 = x_t - sigma v
    return noisy - sigma * velocity


def noise_from_velocity(noisy: Tensor, velocity: Tensor, sigmas: Tensor) -> Tensor:
    """The noise a velocity implies at ``x_t`` (one Euler step from ``sigma`` to 1)."""
    sigma = _per_sample(sigmas, noisy)
    # x_t = noise - (1 - sigma)(noise - x0) = noise - (1 - sigma) v   =>   noise = x_t + (1 - sigma) v
    return noisy + (1.0 - sigma) * velocity


def velocity_from_noise(noisy: Tensor, noise_prediction: Tensor, sigmas: Tensor) -> Tensor:
    """The velocity an eps-prediction implies at ``x_t``; needs ``sigma < 1`` (at pure noise, eps fixes no x0)."""
    sigma = _per_sample(sigmas, noisy)
    if bool((sigma >= 1).any()):
        raise ValueError("velocity_from_noise needs every sigma < 1: at sigma = 1 a noise prediction fixes no x0")
    # invert noise = x_t + (1 - sigma) v:   v = (noise - x_t) / (1 - sigma)
    return (noise_prediction - noisy) / (1.0 - sigma)


def noise_error_weight(sigmas: Tensor) -> Tensor:
    """The per-timestep weight relating the two errors of one prediction: ``err_eps = (1 - sigma)^2 err_v``.

    From ``noise = x_t + (1 - sigma) v`` at a fixed ``x_t``, a velocity prediction's implied noise is off by
    ``eps_theta - eps = (1 - sigma)(v_theta - v)``; squaring and averaging gives the weight. The Diffusion-DPO bound
    in the SD convention is written with ``err_eps`` and a constant timestep factor (docs/conventions.md §2), so the
    same bound on a flow model is the velocity-error margin with ``beta_t = beta (1 - sigma)^2``.
    """
    # err_eps / err_v = (1 - sigma)^2
    return (1.0 - sigmas) ** 2


def noise_equivalent_error(velocity_errors: Tensor, sigmas: Tensor) -> Tensor:
    """A velocity error rewritten as the noise error of the same prediction, shape ``(B,)``.

    Feed these to any core objective (``dpo_loss``, ``kto_loss``, ...) with the SD beta: the rectified-flow bound in
    the SD convention, no objective changed. Feeding raw ``err_v`` instead is Flow-DPO with a constant beta
    (weight 1 per timestep), a different weighting of the timesteps (docs/flow_matching.md).
    """
    if velocity_errors.shape != sigmas.shape:
        raise ValueError(f"velocity_errors {tuple(velocity_errors.shape)} and sigmas {tuple(sigmas.shape)} must match")
    # err_eps = (1 - sigma)^2 err_v
    return noise_error_weight(sigmas).to(velocity_errors.dtype) * velocity_errors


def log_snr(sigmas: Tensor) -> Tensor:
    """``lambda = log SNR = log((1 - sigma)^2 / sigma^2)``: signal scale ``1 - sigma``, noise scale ``sigma``."""
    # lambda(sigma) = 2 log((1 - sigma) / sigma)
    return 2.0 * torch.log((1.0 - sigmas) / sigmas)


def elbo_velocity_weight(sigmas: Tensor) -> Tensor:
    """The weight of ``err_v`` in the continuous-time ELBO, per unit of ``sigma``: ``(1 - sigma) / sigma``.

    The ELBO weights the noise error by ``-(1/2) d lambda / d sigma = 1 / (sigma (1 - sigma))`` (Kingma et al.,
    Variational Diffusion Models, arXiv:2107.00630, Eq. (17) in terms of lambda); times ``err_eps = (1 - sigma)^2
    err_v`` this is the velocity weight below. Diffusion-DPO, and minipref, hold that factor constant and fold it into
    beta; this function is for the docs' comparison, not used by the objectives.
    """
    # w_ELBO(sigma) = (1/(sigma (1 - sigma))) (1 - sigma)^2 = (1 - sigma) / sigma
    return (1.0 - sigmas) / sigmas


def pack_flux_latents(latents: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, (H/2)(W/2), 4C)``: FLUX's 2x2 patch tokens, by ``FluxPipeline._pack_latents``."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent height and width must be even, got {height}x{width}")
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_flux_latents(packed: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """The inverse of ``pack_flux_latents``, by ``FluxPipeline._unpack_latents``.

    That method takes the image size in pixels and the VAE's factor and computes the latent size as
    ``2 * (pixels // (2 * factor))``; any factor gives back the latent size, so we pass factor 1 and latent sizes.
    """
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, latent_height, latent_width, 1)


def flux_latent_image_ids(batch_size: int, latent_height: int, latent_width: int, device=None,
                          dtype=torch.float32) -> Tensor:
    """The position ids of the packed tokens, ``((H/2)(W/2), 3)``, by ``FluxPipeline._prepare_latent_image_ids``.

    One id per 2x2 token: in the installed diffusers the caller halves the latent size (the pipeline does; older
    versions, which the FLUX training script was written against, halved inside), so we pass ``H // 2, W // 2``.
    """
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(batch_size, latent_height // 2, latent_width // 2, device, dtype)
