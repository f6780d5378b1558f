"""SPO's sampler pieces: the guided prediction, the stochastic DDIM step as a Gaussian, and the log-probability of
a step under it (paper 003 Sec. 4, docs/conventions.md §7). Each DDIM step with eta > 0 is
`x_{t-1} ~ N(mean(x_t, out), std^2 I)` (`minipref.ddim_step_gaussian`), so SPO can score how likely the policy
and the reference make a sampled step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import minipref
from full.models import pipeline as models



@dataclass
class Guidance:
    """Prompt conditioning of a batch and the unconditional one, for `guided_prediction`."""

    family: str
    uncond: models.PromptEmbeds  # batch 1: "" (SD1.5) or zeros (SDXL, force_zeros_for_empty_prompt)
    time_ids: Tensor | None  # (1, 6): (R, R, 0, 0, R, R), SDXL only
    scale: float
    dtype: torch.dtype


def guided_prediction(unet, latents: Tensor, timesteps: Tensor, cond: models.PromptEmbeds, guide: Guidance,
                      use_cfg: bool = True) -> Tensor:
    """`out_u + s (out_c - out_u)` in fp32, one forward over `[uncond; cond]` (B -> 2B -> B)."""
    n = latents.shape[0]
    time_ids = None if guide.time_ids is None else guide.time_ids.expand(n, -1)
    if not use_cfg or guide.scale == 1:
        conditioning = models.unet_conditioning(guide.family, cond, time_ids, guide.dtype)
        return unet(latents.to(guide.dtype), timesteps, **conditioning, return_dict=False)[0].float()
    pooled = None if cond.pooled is None else torch.cat([guide.uncond.pooled.expand(n, -1), cond.pooled])
    both = models.PromptEmbeds(torch.cat([guide.uncond.hidden.expand(n, -1, -1), cond.hidden]), pooled)  # (2B, L, D)
    conditioning = models.unet_conditioning(guide.family, both, None if time_ids is None else time_ids.repeat(2, 1),
                                            guide.dtype)
    out = unet(latents.to(guide.dtype).repeat(2, 1, 1, 1), timesteps.repeat(2), **conditioning,
               return_dict=False)[0].float()
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guide.scale * (out_cond - out_uncond)


def step_alphas(scheduler, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """`abar_t` and `abar_prev` per sample, with `DDIMScheduler.step`'s rule `prev = t - T // num_inference_steps`
    (and `final_alpha_cumprod` past 0).

    The SPO authors' `ddim_with_logprob.py` clamps `prev` at 0 instead (`alphas_cumprod[0]`). The two agree whenever
    the scheduler config says `set_alpha_to_one: false`, as SD1.5's and SDXL-base's do (then `final_alpha_cumprod
    == alphas_cumprod[0]`; tests/test_spo.py pins it), so SPO on both models gives the authors' numbers. They differ
    only for a config with `true`: there we keep diffusers' rule, the step the pipeline itself samples at
    inference, whose last step is deterministic (std 0, no log-density): MSPO's rollouts do not branch there."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)
    prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=timesteps.device)
    return alphas[timesteps], torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)


def step_gaussian(scheduler, out: Tensor, x_t: Tensor, timesteps: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(mean, std) of the stochastic DDIM step from `x_t` (fp32), std shaped (B, 1, 1, 1)."""
    abar_t, abar_prev = step_alphas(scheduler, timesteps)
    return minipref.ddim_step_gaussian(out, x_t.float(), abar_t, abar_prev, eta=eta,
                                       prediction_type=scheduler.config.prediction_type)


def ddim_scheduler(pretrained: str, revision, num_inference_steps: int, device):
    """diffusers' DDIMScheduler from the pipeline's scheduler config (timestep list, alphas), as the authors do.

    Without x0 clipping or thresholding: Stable Diffusion's schedulers use neither, and the Gaussian of
    `minipref.ddim_step_gaussian` is the unclipped step (a config without the key would get DDIM's default, True)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision,
                                              clip_sample=False, thresholding=False)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler



def step_log_probs(unet, scheduler, pairs: "StepPairs", guide: Guidance, eta: float, use_cfg: bool) -> Tensor:
    """`log pi(x_{t-1} | x_t)` of the winner's and the loser's step: (2N,), winners first."""
    x_t = torch.cat([pairs.x_t[:, 0], pairs.x_t[:, 1]])  # (N, 2, ...) -> (2N, ...), winners then losers
    x_prev = torch.cat([pairs.x_prev[:, 0], pairs.x_prev[:, 1]])
    timesteps = pairs.timesteps.repeat(2)
    pooled = None if pairs.pooled is None else pairs.pooled.repeat(2, 1)
    cond = models.PromptEmbeds(pairs.hidden.repeat(2, 1, 1), pooled)  # a pair shares its prompt
    out = guided_prediction(unet, x_t, timesteps, cond, guide, use_cfg)
    mean, std = step_gaussian(scheduler, out, x_t, timesteps, eta)
    return minipref.gaussian_step_log_prob(x_prev, mean, std)

