"""Sampling the toy model, and the stochastic DDIM step (with its log-density) of SPO.

Two uses:

* ``sample``: draw points from a model (3500 per method for the figure and metrics) with DPM-Solver++(2M)
  (Lu et al. 2022; diffusers' ``DPMSolverMultistepScheduler`` numbers, toy/schedule.py) on steps uniform in log-SNR
  (``use_lu_lambdas``). Why not plain DDIM: our data has a std of 0.1-0.2 against unit noise, so everything that
  shapes it happens at small ``t`` (``1 - abar_t ~ 0.01`` is ``t ~ 50`` on the linear schedule), where uniformly
  spaced DDIM steps are sparse. Even with the *exact* epsilon of the desirable Gaussian, 50 DDIM steps return a
  std of ~0.074 instead of 0.1; 25 log-SNR-spaced DPM-Solver++ steps return 0.100 (tests/test_toy.py checks both).
* ``ddim_step_gaussian`` / ``ddim_step_with_log_prob``: one *stochastic* DDIM step (``eta = 1``, the DDPM
  posterior variance) as the Gaussian it samples from, and as a sampled (or given) step with its log-density
  ``log p_theta(x_{t-1} | x_t)``. SPO (paper 003, "Aesthetic Post-Training Diffusion Models from Generic
  Preferences with Step-by-step Preference Optimization", Sec. 4.1 and 4.4) draws its candidates from that Gaussian
  and scores winner and loser under the policy and the reference with it. The step's math is
  ``minipref.ddim_step_gaussian``, the same function the full-scale SPO script calls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import minipref
from minipref import gaussian_step_log_prob

from .schedule import DDIMSteps, DPMSolver, timestep_count

SAMPLING_STEPS = 25  # DPM-Solver++ steps for the evaluation samples
SPO_CHAIN_STEPS = 20  # stochastic DDIM steps of an SPO rollout


def make_sampler(noise_scheduler, num_inference_steps: int = SAMPLING_STEPS) -> DPMSolver:
    """DPM-Solver++(2M) on the training schedule (ours or diffusers'), steps uniform in log-SNR, ``num_inference_steps``
    of them: the numbers of diffusers' ``DPMSolverMultistepScheduler(use_lu_lambdas=True)`` (toy/schedule.py)."""
    return DPMSolver(noise_scheduler, num_inference_steps)


def make_ddim(noise_scheduler, num_inference_steps: int = SPO_CHAIN_STEPS):
    """A diffusers ``DDIMScheduler`` on the training schedule, ``trailing`` spacing so the chain starts at ``t = T - 1``.

    ``set_alpha_to_one=False`` (as in SD1.5's scheduler config) makes the last step land on ``abar_0`` rather than
    1, so it keeps a small nonzero variance and every step of an SPO chain has a log-density. ``python -m toy`` uses
    ``toy.schedule.DDIMSteps`` (the same timesteps and alphas, without importing diffusers); this one also has
    diffusers' ``step``.
    """
    from diffusers import DDIMScheduler  # imported here: diffusers costs seconds at start-up (toy/schedule.py)

    DDIMSteps(noise_scheduler, num_inference_steps)  # the same range check as ours
    sampler = DDIMScheduler.from_config(
        noise_scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False
    )
    sampler.set_timesteps(num_inference_steps)
    return sampler


def previous_timestep(scheduler, timestep: int) -> int:
    """The step DDIM jumps to from ``timestep`` (negative means "the clean sample"), exactly as ``step`` computes it."""
    return timestep - timestep_count(scheduler) // scheduler.num_inference_steps


def step_alphas(scheduler, timestep: int) -> tuple[float, float]:
    """``(abar_t, abar_prev)`` of the DDIM step from ``timestep``, with the scheduler's own final alpha."""
    prev = previous_timestep(scheduler, timestep)
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return float(scheduler.alphas_cumprod[timestep]), float(abar_prev)


def step_alphas_per_row(scheduler, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(abar_t, abar_prev)`` ``(B,)`` for a batch of DDIM timesteps ``t`` ``(B,)``: ``step_alphas`` row by row."""
    prev = t - timestep_count(scheduler) // scheduler.num_inference_steps
    abar_prev = torch.where(prev >= 0, scheduler.alphas_cumprod[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    return scheduler.alphas_cumprod[t], abar_prev


def ddim_step_std(scheduler, timestep: int, eta: float = 1.0) -> float:
    """``sigma_t(eta)``, DDIM Eq. (16); with ``eta = 1`` the DDPM posterior std of the (possibly strided) step."""
    _, std = ddim_step_gaussian(scheduler, torch.zeros(1, 1), timestep, torch.zeros(1, 1), eta)
    return std


def ddim_step_gaussian(
    scheduler, eps_pred: Tensor, timestep: int, x_t: Tensor, eta: float = 1.0
) -> tuple[Tensor, float]:
    """The Gaussian ``N(mean, std^2 I)`` that a stochastic DDIM step ``x_t -> x_{t-1}`` samples from.

    The math is ``minipref.ddim_step_gaussian`` (shared with the full-scale SPO, parity-tested against diffusers'
    ``DDIMScheduler.step``); this wrapper only reads the step's alphas off the scheduler. ``mean`` is
    differentiable in ``eps_pred``.
    """
    abar_t, abar_prev = step_alphas(scheduler, timestep)
    mean, std = minipref.ddim_step_gaussian(eps_pred, x_t, abar_t, abar_prev, eta=eta)
    return mean, float(std.flatten()[0])


def ddim_step_with_log_prob(
    scheduler,
    eps_pred: Tensor,
    timestep: int,
    x_t: Tensor,
    *,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One stochastic DDIM step and its log-density: returns ``(x_prev, log p(x_prev | x_t))``, shapes ``(B, ...)``, ``(B,)``.

    Without ``prev_sample``, ``x_prev = mean + std * z`` with ``z`` drawn from ``generator`` (a sample of the step);
    with it, ``prev_sample`` is scored as given: use that to evaluate a fixed step under another model (the
    reference, or the policy with gradients). The log-density is ``minipref.gaussian_step_log_prob`` (averaged over
    dims, as SPO's ``ddim_step_with_logprob`` does); it carries gradient through ``mean`` only.
    """
    mean, std = ddim_step_gaussian(scheduler, eps_pred, timestep, x_t, eta)
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype)
        prev_sample = mean.detach() + std * noise
    return prev_sample, gaussian_step_log_prob(prev_sample, mean, std)


def sample(
    model: nn.Module,
    sampler: DPMSolver,
    n: int,
    generator: torch.Generator,
    cond: Tensor | None = None,
) -> Tensor:
    """``n`` points ``(n, 2)`` from ``model``: ``x_T ~ N(0, I)``, then ``sampler``'s (deterministic) steps."""
    return sampler.sample(model, torch.randn(n, 2, generator=generator), cond)
