"""The diffusion step shared by the trainers that denoise real images (offline methods, SPIN), for every family.

1. latents `x0` (VAE, or a cache built by `full/data/cache.py`) and prompt embeddings `c`;
2. one `t` and one `eps` per item, *shared by the winner and the loser of a pair* (docs/conventions.md §3), drawn from
   the item's own generator in the offline trainer (so that P processes and one process draw the same), and the
   family's noising (`Family.noised`): `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, target `eps` or `v`, for the
   UNet families; `x_t = (1 - sigma) x0 + sigma eps`, target `v = eps - x0`, for the rectified-flow ones;
3. the reference `eps_ref(x_t, t, c)`: the same denoiser with its LoRA disabled, under `torch.no_grad()`
   (only for the methods that need it); then the policy forward over all `n*B` images at once;
4. the family's `core_predictions`: the eps form every core objective takes (a flow model's implied noise).

The trainer then turns `(pred, ref_pred, target)` into its minipref objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import minipref
from full.models.config import ModelConfig
from full.models import pipeline as models
from full.models.families import call_denoiser, get_family


@dataclass
class StepInputs:
    """One micro-batch, flattened image-major: for pairs all B winners, then all B losers."""

    latents: Tensor  # (n*B, C, h, w)
    prompt: models.PromptEmbeds  # hidden (n*B, L, D), pooled (n*B, P) for SDXL, SD3, FLUX
    time_ids: Tensor | None  # (n*B, 6), SDXL
    n: int  # images per item: 2 (pairs, sharing t and eps) or 1
    desirable: Tensor | None = None  # (B,) bool, binary methods
    embeddings: Tensor | None = None  # (B, 2, E), contrast


def _image_major(x: Tensor) -> Tensor:
    return x.transpose(0, 1).flatten(0, 1)  # (B, n, ...) -> (n*B, ...)


def inputs_from_images(batch: dict, parts: models.Components, model: ModelConfig, device, generator, table=None, *,
                       label_in_prompt: bool = False) -> StepInputs:
    """Pixels -> VAE latents and captions -> prompt embeddings, on the fly. ``label_in_prompt``: the row writes the
    label into the prompt (CSFT)."""
    pixels = batch["pixel_values"].to(device)  # (B, n, 3, R, R)
    n = pixels.shape[1]
    if isinstance(generator, list):  # per item: the winner and the loser of item i both draw from generator[i]
        generator = generator * n
    latents = models.encode_images(parts, _image_major(pixels), generator,
                                     model.vae_encode_batch_size).float()  # (n*B, 4, R/8, R/8)
    captions = batch["captions"]
    if label_in_prompt:  # CSFT: the label goes into the prompt
        captions = minipref.csft_prompts(captions, batch["desirable"])
    prompt = models.encode_prompts(parts, captions, device)  # (B, ...): a pair shares its prompt
    pooled = None if prompt.pooled is None else prompt.pooled.repeat(n, 1)
    prompt = models.PromptEmbeds(prompt.hidden.repeat(n, 1, 1), pooled)
    family, time_ids = get_family(parts.family), None
    if family.uses_time_ids:  # SDXL's micro-conditioning, at the training resolution
        time_ids = family.time_ids(_image_major(batch["original_sizes"]), _image_major(batch["crop_top_lefts"]),
                                   pixels.shape[-1]).to(device)
    embeddings = None if table is None else torch.stack([table[r] for r in batch["row_ids"]]).to(device)
    return StepInputs(latents, prompt, time_ids, n, batch.get("desirable"), embeddings)


def inputs_from_cache(batch: dict, family: str, device) -> StepInputs:
    n = batch["latents"].shape[1]
    get = lambda key: _image_major(batch[key]).to(device).float() if key in batch else None  # noqa: E731
    prompt = models.PromptEmbeds(get("prompt_embeds"), get("pooled"))
    emb = batch.get("embeddings")
    return StepInputs(get("latents"), prompt, get("time_ids") if get_family(family).uses_time_ids else None, n,
                      batch.get("desirable"), None if emb is None else emb.to(device).float())


def denoise(unet, reference, noise_scheduler, family: str, inputs: StepInputs, *, with_reference: bool,
            generator, weight_dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """Predictions of the policy and (optionally) the reference on one noised batch, and the target, in the eps form
    of the core objectives. ``reference``: ``(model_input, timesteps, conditioning) -> prediction`` without a graph
    (`full.run.weights`: the denoiser with its LoRA off, a frozen copy, or SPIN's opponent)."""
    fam = get_family(family)
    step = fam.noised(noise_scheduler, inputs.latents, inputs.n, generator, weight_dtype)
    conditioning = fam.conditioning(inputs.prompt, inputs.time_ids, weight_dtype, step)
    ref_pred = reference(step.model_input, step.timestep, conditioning) if with_reference else None
    pred = call_denoiser(unet, step.model_input, step.timestep, conditioning)
    return fam.core_predictions(pred, ref_pred, step)
