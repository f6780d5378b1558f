"""The noise schedule and the two step rules the toy samples with, in plain torch (no diffusers at start-up).

The numbers are diffusers' own, to the last bit: ``tests/test_toy.py`` checks each object here against the
diffusers scheduler it stands for (``DDPMScheduler``, ``DPMSolverMultistepScheduler``, ``DDIMScheduler``) with
``torch.equal``. Why not import diffusers, then? Its import pulls in ``torch._dynamo`` and scipy: ~4 s of CPU, a
quarter of a ``--quick`` run, for a few lines of arithmetic. ``toy.model.make_noise_scheduler`` still returns the
diffusers scheduler for code that wants its other methods (the tutorials use its ``step``).

* ``NoiseSchedule``: the DDPM forward process, ``T = 1000`` linear betas 1e-4..0.02, and ``add_noise``.
* ``DPMSolver``: DPM-Solver++(2M) (Lu et al. 2022) on steps uniform in log-SNR (``use_lu_lambdas``), the sampler of
  the evaluation samples (toy/sampling.py says why not DDIM).
* ``DDIMSteps``: the timesteps and alphas of a ``trailing`` DDIM chain, on which SPO draws its stochastic steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

NUM_TRAIN_TIMESTEPS = 1000


class NoiseSchedule:
    """The DDPM schedule of ``DDPMScheduler(num_train_timesteps=1000, clip_sample=False)``, float32 like diffusers."""

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_train_timesteps = num_train_timesteps
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        # abar_t = prod_{s <= t} (1 - beta_s): abar_T ~ 4e-5, so x_T is ~ pure noise
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for ``x0``, ``noise`` ``(B, D)`` and ``t`` ``(B,)``."""
        alpha_bar = self.alphas_cumprod.to(x0.dtype)[t].reshape(-1, *[1] * (x0.ndim - 1))  # (B,) -> (B, 1, ...)
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (the ** 0.5 and the operand order are diffusers', bit for bit)
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def timestep_count(schedule) -> int:
    """``T`` of a schedule: ours or a diffusers scheduler (both carry ``alphas_cumprod``)."""
    return len(schedule.alphas_cumprod)


class DPMSolver:
    """DPM-Solver++(2M), ``num_inference_steps`` steps uniform in ``log sigma``, where ``sigma_t^2 = (1 - abar_t) / abar_t``.

    In the data-prediction form the solver integrates the ODE in ``lambda = log(alpha / sigma)`` exactly for the
    linear part, and with a first-order (step 0 and the last step, which lands on ``sigma = 0``) or second-order
    multistep estimate of the predicted clean point ``x0`` for the rest.
    """

    def __init__(self, schedule, num_inference_steps: int = 25):
        T = timestep_count(schedule)
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, T], got {num_inference_steps}")
        alphas_cumprod = schedule.alphas_cumprod.float()
        # sigma_t = sqrt((1 - abar_t) / abar_t), then uniform steps in log sigma from sigma_max down to sigma_min
        log_sigmas = np.log(np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5))  # float32, as diffusers
        ramp = np.linspace(0, 1, num_inference_steps)
        log_sigma = (float(log_sigmas[-1]) + ramp * (float(log_sigmas[0]) - float(log_sigmas[-1]))) ** 1.0  # Lu's rho = 1
        sigmas = np.exp(log_sigma)
        self.timesteps = torch.from_numpy(self._sigma_to_t(sigmas, log_sigmas).round().astype(np.int64))
        self.num_inference_steps = num_inference_steps
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # the chain ends at sigma 0
        self._coefficients = [self._step_coefficients(i) for i in range(num_inference_steps)]

    @staticmethod
    def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
        """The (fractional) training timestep of each sigma: linear interpolation in ``log sigma``."""
        log_sigma = np.log(np.maximum(sigmas, 1e-10))
        above = log_sigma[None, :] - log_sigmas[:, None] >= 0  # (T, n): training steps with log sigma below ours
        low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def _alpha_sigma(self, i: int) -> tuple[Tensor, Tensor]:
        # alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha_t: the VP pair behind sigma = sigma_t / alpha_t
        alpha = 1 / ((self.sigmas[i] ** 2 + 1) ** 0.5)
        return alpha, self.sigmas[i] * alpha

    def _step_coefficients(self, i: int) -> dict[str, Tensor]:
        """0-dim float32 tensors for step ``i``, computed once; the same operations as diffusers, so the same bits."""
        alpha_s0, sigma_s0 = self._alpha_sigma(i)
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        # lambda = log alpha - log sigma (half the log-SNR); h = lambda_t - lambda_s0 > 0
        lambda_t, lambda_s0 = torch.log(alpha_t) - torch.log(sigma_t), torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        c = {"alpha_s0": alpha_s0, "sigma_s0": sigma_s0, "ratio": sigma_t / sigma_s0,
             "phi": alpha_t * (torch.exp(-h) - 1.0)}
        if i > 0:
            alpha_s1, sigma_s1 = self._alpha_sigma(i - 1)
            # r0 = h_0 / h, the previous step's length relative to this one
            c["inv_r0"] = 1.0 / ((lambda_s0 - (torch.log(alpha_s1) - torch.log(sigma_s1))) / h)
            c["half_phi"] = 0.5 * c["phi"]
        return c

    @torch.no_grad()
    def sample(self, model: nn.Module, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Run the chain from ``x_T = x`` ``(n, 2)``; returns ``x_0``."""
        n, last, x0_prev = len(x), self.num_inference_steps - 1, None
        for i, t in enumerate(self.timesteps):
            c = self._coefficients[i]
            eps = model(x, t.expand(n), cond)
            # x0_hat = (x_t - sigma_t eps) / alpha_t
            x0 = (x - c["sigma_s0"] * eps) / c["alpha_s0"]
            if i == 0 or i == last:
                # first order (= DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_hat
                x = c["ratio"] * x - c["phi"] * x0
            else:
                # second order: D1 = (x0_hat - x0_hat_prev) / r0, x_t = ... - alpha_t (e^{-h} - 1) (x0_hat + D1 / 2)
                d1 = c["inv_r0"] * (x0 - x0_prev)
                x = c["ratio"] * x - c["phi"] * x0 - c["half_phi"] * d1
            x0_prev = x0
        return x


class DDIMSteps:
    """The ``trailing`` timesteps of a DDIM chain and its alphas, as ``DDIMScheduler(timestep_spacing="trailing",
    set_alpha_to_one=False)``: the chain starts at ``t = T - 1`` and its last step lands on ``abar_0``, not 1, so
    every step keeps a nonzero variance (and a log-density, which SPO needs)."""

    def __init__(self, schedule, num_inference_steps: int = 20):
        T = timestep_count(schedule)
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, T], got {num_inference_steps}")
        self.num_train_timesteps, self.num_inference_steps = T, num_inference_steps
        self.alphas_cumprod = schedule.alphas_cumprod
        self.final_alpha_cumprod = schedule.alphas_cumprod[0]
        step_ratio = T / num_inference_steps
        self.timesteps = torch.from_numpy(np.round(np.arange(T, 0, -step_ratio)).astype(np.int64) - 1)


def sinusoidal_embedding(t: Tensor, frequencies: Tensor) -> Tensor:
    """``[cos(t f_k), sin(t f_k)]`` for ``t`` ``(B,)`` and ``frequencies`` ``(D/2,)``: ``(B, D)`` (diffusers' ``Timesteps``
    with ``flip_sin_to_cos=True``, ``downscale_freq_shift=0``)."""
    angles = t[:, None].float() * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def embedding_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """``f_k = max_period^(-k / (D/2))`` for ``k < D/2``: periods from 2 pi to ~2 pi max_period."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
