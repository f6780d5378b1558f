"""The diffusers side of a text-to-image pipeline: load its parts, encode prompts and images, and sample images
(validation). What differs between model families is one object per family (`full/models/families.py`: SD1.5,
SDXL; `flow_families.py`: SD3/SD3.5, FLUX.1); the functions here take a family by name and ask it. LoRA, the
reference and saving live in `full/models/lora.py`.

* **sd15** (SD1.x / SD2.x): one CLIP text encoder, the UNet is conditioned on its last hidden state.
* **sdxl**: two text encoders whose penultimate hidden states are concatenated on the feature axis
  (768 + 1280 = 2048), the pooled projection of the second one, and `add_time_ids`, the six numbers
  (original h, w, crop top, left, target h, w) of SDXL's micro-conditioning (Podell et al., Sec. 2.2),
  taken from each image's *real* original size and crop. The SDXL VAE overflows in fp16, so it stays in
  fp32 unless a fixed VAE is given with `--pretrained_vae_model_name_or_path` (as the diffusers scripts do).
* **sd3**, **flux**: rectified-flow transformers, prompts through the pipeline's own `encode_prompt`
  (docs/flow_matching.md).

The reference model of every objective is the frozen starting point (docs/conventions.md §4): with LoRA it is the
*same* denoiser with its adapters disabled, run under `torch.no_grad()` -- no second copy of the weights.
`Components.unet` is the trained denoiser of any family (a UNet, or SD3's / FLUX's transformer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from full.models.families import PromptEmbeds, family_of_index, get_family, training_target  # noqa: F401
from full.paths import missing_local_path

FAMILIES = ("sd15", "sdxl", "sd3", "flux")  # the names in `full.models.families.FAMILIES` (public: `full.models.FAMILIES`)
WEIGHT_DTYPES = {None: torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def detect_family(pretrained: str, revision: str | None = None) -> str:
    """The family's name ("sd15", "sdxl", "sd3", "flux") from the pipeline's `model_index.json` (a local dir or a
    hub id)."""
    from diffusers import DiffusionPipeline

    if missing_local_path(pretrained):
        raise ValueError(f"cannot read a diffusers pipeline at --pretrained_model_name_or_path={pretrained!r}: "
                         "no such local directory")
    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
    except Exception as error:  # missing dir, no model_index.json, offline without a cached hub id, ...
        raise ValueError(
            f"cannot read a diffusers pipeline at --pretrained_model_name_or_path={pretrained!r} "
            f"(expected a dir or hub id with model_index.json): {type(error).__name__}: {error}"
        ) from error
    family = family_of_index(index)
    if family is None:
        raise ValueError(
            f"{pretrained!r} is a {index.get('_class_name', '?')}; minipref trains StableDiffusionPipeline, "
            "StableDiffusionXLPipeline (unet + vae + text_encoder), StableDiffusion3Pipeline and FluxPipeline"
        )
    return family.name


def pipeline_class(family: str):
    return get_family(family).pipeline_class()


def save_pipeline(family: str, model, output_dir) -> Path:
    """``--save_pipeline``: the base pipeline with the denoiser a full run saved in ``output_dir/unet`` (or
    ``transformer``), written into ``output_dir`` as diffusers writes pipelines, so
    ``DiffusionPipeline.from_pretrained(output_dir)`` loads it."""
    from diffusers import AutoencoderKL

    fam = get_family(family)
    components = {fam.denoiser: fam.denoiser_class().from_pretrained(Path(output_dir) / fam.denoiser)}
    if model.pretrained_vae_model_name_or_path:
        components["vae"] = AutoencoderKL.from_pretrained(model.pretrained_vae_model_name_or_path)
    pipe = fam.pipeline_class().from_pretrained(model.pretrained_model_name_or_path, revision=model.revision,
                                                variant=model.variant, **components)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


@dataclass
class Components:
    """What training needs from a pipeline. `tokenizers`/`text_encoders` are empty when training from a cache.
    `unet` is the trained denoiser (a UNet, or a flow family's transformer); `noise_scheduler` the training
    scheduler (DDPM for the UNet families; `flow_families.FlowTraining` for the flow ones)."""

    family: str
    pretrained: str
    unet: torch.nn.Module
    noise_scheduler: object
    vae: torch.nn.Module | None = None
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    vae_dtype: torch.dtype = torch.float32
    reference_unet: torch.nn.Module | None = None  # --train_mode full: the frozen copy of the starting denoiser
    text_pipeline: object = None  # flow families: the pipeline around the text encoders (its encode_prompt)


def load_components(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    vae_path: str | None = None,
    with_vae: bool = True,
    with_text_encoders: bool = True,
    options: dict | None = None,
) -> Components:
    """Load the denoiser, the training scheduler (DDPM for the UNet, as every diffusers training script; the flow
    scripts' scheduler copy and timestep flags, ``options``, for SD3/FLUX), and optionally the VAE and text
    encoders, all frozen, in fp32 on the CPU. `place_components` moves and casts them."""
    from diffusers import AutoencoderKL

    fam = get_family(detect_family(pretrained, revision))
    kw = dict(revision=revision)
    denoiser = fam.denoiser_class().from_pretrained(pretrained, subfolder=fam.denoiser, variant=variant, **kw)
    scheduler = fam.load_training_scheduler(pretrained, revision, options or {}, denoiser=denoiser)
    parts = Components(fam.name, pretrained, denoiser, scheduler)
    if with_vae:
        if vae_path:  # e.g. madebyollin/sdxl-vae-fp16-fix: a full VAE repo, no subfolder
            parts.vae = AutoencoderKL.from_pretrained(vae_path, **kw)
        else:
            parts.vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kw)
    if with_text_encoders:
        parts.tokenizers, parts.text_encoders = fam.load_text_encoders(pretrained, variant, revision)
    for module in [parts.unet, parts.vae, *parts.text_encoders]:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return parts


def place_components(parts: Components, device, weight_dtype: torch.dtype, *, fixed_vae: bool,
                     unet_dtype: torch.dtype | None = None) -> None:
    """Frozen weights in `weight_dtype` on `device` (the LoRA weights are upcast to fp32 separately).

    The SDXL VAE stays in fp32 unless `fixed_vae` (a VAE given by path, e.g. the fp16-fix one); the SD1.5
    VAE is fine in half precision.
    """
    def move(module, dtype):
        module.to(device)
        if dtype != module.dtype:  # (a no-op `.to(dtype)` makes diffusers warn about fp32 modules)
            module.to(dtype=dtype)

    move(parts.unet, unet_dtype or weight_dtype)  # a fully trained denoiser keeps fp32 master weights
    if parts.reference_unet is not None:
        move(parts.reference_unet, weight_dtype)
    for encoder in parts.text_encoders:
        move(encoder, weight_dtype)
    if parts.vae is not None:
        fp32 = get_family(parts.family).vae_fp32_unless_fixed and not fixed_vae
        parts.vae_dtype = torch.float32 if fp32 else weight_dtype
        move(parts.vae, parts.vae_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Conditioning: prompts -> embeddings, and SDXL's micro-conditioning (each family's own, families.py)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(parts: Components, captions: list[str], device) -> PromptEmbeds:
    if not parts.text_encoders:
        raise ValueError("text encoders were not loaded (training from a cache); use the cached embeddings")
    return get_family(parts.family).encode_prompts(parts, list(captions), device)


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Tensor:
    """`add_time_ids` per image: (orig h, orig w, crop top, crop left, target h, target w). (N, 2) x 2 -> (N, 6)."""
    return get_family("sdxl").time_ids(original_sizes, crop_top_lefts, resolution)


def unet_conditioning(family: str, prompt: PromptEmbeds, time_ids: Tensor | None, dtype) -> dict:
    """Keyword arguments of `unet(...)` besides the latents and timesteps."""
    return get_family(family).conditioning(prompt, time_ids, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Images -> latents, noise -> target
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(parts: Components, pixel_values: Tensor, generator=None, batch_size: int | None = None) -> Tensor:
    """Pixels in [-1, 1] (N, 3, R, R) -> scaled VAE latents (N, 4, R/f, R/f), a sample of the posterior.
    ``generator``: one `torch.Generator`, or a list of N (image ``k`` draws from ``generator[k]``)."""
    vae = parts.vae
    if vae is None:
        raise ValueError("the VAE was not loaded (training from a cache); use the cached latents")
    size = batch_size or len(pixel_values)
    chunks = pixel_values.split(size)
    if isinstance(generator, list):  # one generator per image (per-sample randomness): split it with the pixels
        gens = [generator[i : i + size] for i in range(0, len(generator), size)]
    else:
        gens = [generator] * len(chunks)
    latents = torch.cat([vae.encode(c.to(parts.vae_dtype)).latent_dist.sample(g) for c, g in zip(chunks, gens)])
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------------------------
# Sampling (validation grids): the real pipeline, with the training UNet or a saved LoRA
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(parts: Components, prompts: list[str], *, device, dtype, resolution: int, num_per_prompt: int = 1,
                  steps: int = 25, guidance_scale: float = 7.5, seed: int = 0, unet=None, lora_dir=None,
                  unet_dir=None, vae_path: str | None = None, revision: str | None = None) -> list:
    """PIL images from the family's pipeline: with `unet` (the training denoiser, adapters on) or, as users will
    load what a run saved, a fresh pipeline with the LoRA of `lora_dir` (`load_lora_weights`) or the denoiser folder
    `unet_dir` (`UNet2DConditionModel` / the transformer class `.from_pretrained`)."""
    from contextlib import nullcontext

    from diffusers import AutoencoderKL

    fam = get_family(parts.family)
    components = fam.pipeline_flags()
    if lora_dir is None:
        components[fam.denoiser] = fam.denoiser_class().from_pretrained(unet_dir) if unet_dir is not None else \
            unet if unet is not None else parts.unet
        components.update(fam.pipeline_components(parts))
    if "vae" not in components and vae_path:
        components["vae"] = AutoencoderKL.from_pretrained(vae_path, revision=revision)
    pipe = fam.pipeline_class().from_pretrained(parts.pretrained, revision=revision, torch_dtype=dtype, **components)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    generator = torch.Generator(device).manual_seed(seed)
    with autocast:
        return pipe(list(prompts), num_images_per_prompt=num_per_prompt, num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=resolution, width=resolution, generator=generator).images

