"""The diffusers side of a Stable Diffusion pipeline: load its parts, encode prompts and images, the training target,
and sample images (validation). LoRA, the reference and saving live in `full/models/lora.py`.

Two families share everything except three small functions (`_encode_prompts_*`, `unet_conditioning`):

* **sd15** (SD1.x / SD2.x): one CLIP text encoder, the UNet is conditioned on its last hidden state.
* **sdxl**: two text encoders whose penultimate hidden states are concatenated on the feature axis
  (768 + 1280 = 2048), the pooled projection of the second one, and `add_time_ids`, the six numbers
  (original h, w, crop top, left, target h, w) of SDXL's micro-conditioning (Podell et al., Sec. 2.2),
  taken from each image's *real* original size and crop. The SDXL VAE overflows in fp16, so it stays in
  fp32 unless a fixed VAE is given with `--pretrained_vae_model_name_or_path` (as the diffusers scripts do).

The reference model of every objective is the frozen starting point (docs/conventions.md §4): with LoRA it is the
*same* UNet with its adapters disabled, run under `torch.no_grad()` -- no second copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from full.paths import missing_local_path

FAMILIES = ("sd15", "sdxl")
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}  # the pipelines' native sizes, as the diffusers scripts use
WEIGHT_DTYPES = {None: torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def detect_family(pretrained: str, revision: str | None = None) -> str:
    """"sd15" or "sdxl" from the pipeline's `model_index.json` (a local dir or a hub id)."""
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
    class_name = index.get("_class_name", "?")
    has = lambda name: isinstance(index.get(name), (list, tuple)) and index[name][0] is not None  # noqa: E731
    if not (has("unet") and has("vae") and has("text_encoder")):
        raise ValueError(
            f"{pretrained!r} is a {class_name} without unet + vae + text_encoder; minipref trains "
            "text-to-image UNet pipelines (StableDiffusionPipeline, StableDiffusionXLPipeline)"
        )
    return "sdxl" if has("text_encoder_2") else "sd15"


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[family]


def save_pipeline(family: str, model, output_dir) -> Path:
    """``--save_pipeline``: the base pipeline with the UNet a full run saved in ``output_dir/unet``, written into
    ``output_dir`` as diffusers writes pipelines, so ``DiffusionPipeline.from_pretrained(output_dir)`` loads it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    components = {"unet": UNet2DConditionModel.from_pretrained(Path(output_dir) / "unet")}
    if model.pretrained_vae_model_name_or_path:
        components["vae"] = AutoencoderKL.from_pretrained(model.pretrained_vae_model_name_or_path)
    pipe = pipeline_class(family).from_pretrained(model.pretrained_model_name_or_path, revision=model.revision,
                                                  variant=model.variant, **components)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


@dataclass
class Components:
    """What training needs from a pipeline. `tokenizers`/`text_encoders` are empty when training from a cache."""

    family: str
    pretrained: str
    unet: torch.nn.Module
    noise_scheduler: object
    vae: torch.nn.Module | None = None
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    vae_dtype: torch.dtype = torch.float32
    reference_unet: torch.nn.Module | None = None  # --train_mode full: the frozen copy of the starting UNet


def load_components(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    vae_path: str | None = None,
    with_vae: bool = True,
    with_text_encoders: bool = True,
) -> Components:
    """Load the UNet, the training scheduler (DDPM, as every diffusers training script), and optionally the
    VAE and text encoders, all frozen, in fp32 on the CPU. `place_components` moves and casts them."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    family = detect_family(pretrained, revision)
    kw = dict(revision=revision)
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **kw)
    scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
    parts = Components(family, pretrained, unet, scheduler)
    if with_vae:
        if vae_path:  # e.g. madebyollin/sdxl-vae-fp16-fix: a full VAE repo, no subfolder
            parts.vae = AutoencoderKL.from_pretrained(vae_path, **kw)
        else:
            parts.vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kw)
    if with_text_encoders:
        parts.tokenizers.append(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw))
        parts.text_encoders.append(
            CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **kw))
        if family == "sdxl":
            parts.tokenizers.append(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw))
            parts.text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", variant=variant, **kw))
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

    move(parts.unet, unet_dtype or weight_dtype)  # a fully trained UNet keeps fp32 master weights
    if parts.reference_unet is not None:
        move(parts.reference_unet, weight_dtype)
    for encoder in parts.text_encoders:
        move(encoder, weight_dtype)
    if parts.vae is not None:
        parts.vae_dtype = torch.float32 if (parts.family == "sdxl" and not fixed_vae) else weight_dtype
        move(parts.vae, parts.vae_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Conditioning: prompts -> embeddings, and SDXL's micro-conditioning
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeds:
    hidden: Tensor  # (N, L, D): the UNet's cross-attention context
    pooled: Tensor | None = None  # (N, P): SDXL only


def _token_ids(tokenizer, captions: list[str], device) -> Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)  # (N, 77)


def _encode_prompts_sd15(parts: Components, captions: list[str], device) -> PromptEmbeds:
    (tokenizer,), (encoder,) = parts.tokenizers, parts.text_encoders
    return PromptEmbeds(encoder(_token_ids(tokenizer, captions, device), return_dict=False)[0])  # (N, 77, 768)


def _encode_prompts_sdxl(parts: Components, captions: list[str], device) -> PromptEmbeds:
    hidden, pooled = [], None
    for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
        out = encoder(_token_ids(tokenizer, captions, device), output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
        pooled = out[0]  # the last encoder's projected pooled output (text_embeds), (N, 1280)
    return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)  # (N, 77, 768 + 1280)


@torch.no_grad()
def encode_prompts(parts: Components, captions: list[str], device) -> PromptEmbeds:
    if not parts.text_encoders:
        raise ValueError("text encoders were not loaded (training from a cache); use the cached embeddings")
    encode = _encode_prompts_sdxl if parts.family == "sdxl" else _encode_prompts_sd15
    return encode(parts, list(captions), device)


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Tensor:
    """`add_time_ids` per image: (orig h, orig w, crop top, crop left, target h, target w). (N, 2) x 2 -> (N, 6)."""
    target = torch.full_like(original_sizes, resolution)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=-1).float()


def unet_conditioning(family: str, prompt: PromptEmbeds, time_ids: Tensor | None, dtype) -> dict:
    """Keyword arguments of `unet(...)` besides the latents and timesteps."""
    kwargs = {"encoder_hidden_states": prompt.hidden.to(dtype)}
    if family == "sdxl":
        if prompt.pooled is None or time_ids is None:
            raise ValueError("SDXL needs pooled prompt embeddings and add_time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": prompt.pooled.to(dtype), "time_ids": time_ids.to(dtype)}
    return kwargs


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


def training_target(noise_scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """`eps` for epsilon-prediction, the velocity for v-prediction (SD2.x-768): the losses never care which."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config (epsilon or v_prediction)")



# ---------------------------------------------------------------------------------------------------------------
# Sampling (validation grids): the real pipeline, with the training UNet or a saved LoRA
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(parts: Components, prompts: list[str], *, device, dtype, resolution: int, num_per_prompt: int = 1,
                  steps: int = 25, guidance_scale: float = 7.5, seed: int = 0, unet=None, lora_dir=None,
                  unet_dir=None, vae_path: str | None = None, revision: str | None = None) -> list:
    """PIL images from the family's pipeline: with `unet` (the training UNet, adapters on) or, as users will load
    what a run saved, a fresh pipeline with the LoRA of `lora_dir` (`load_lora_weights`) or the UNet folder
    `unet_dir` (`UNet2DConditionModel.from_pretrained`)."""
    from contextlib import nullcontext

    from diffusers import AutoencoderKL, UNet2DConditionModel

    components = {}
    if lora_dir is None:
        components["unet"] = UNet2DConditionModel.from_pretrained(unet_dir) if unet_dir is not None else \
            unet if unet is not None else parts.unet
        if parts.vae is not None:
            components["vae"] = parts.vae
        if parts.text_encoders:
            components["text_encoder"], components["tokenizer"] = parts.text_encoders[0], parts.tokenizers[0]
            if parts.family == "sdxl":
                components["text_encoder_2"], components["tokenizer_2"] = parts.text_encoders[1], parts.tokenizers[1]
    if "vae" not in components and vae_path:
        components["vae"] = AutoencoderKL.from_pretrained(vae_path, revision=revision)
    if parts.family == "sd15":
        components.update(safety_checker=None, requires_safety_checker=False)
    pipe = pipeline_class(parts.family).from_pretrained(parts.pretrained, revision=revision, torch_dtype=dtype,
                                                        **components)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    generator = torch.Generator(device).manual_seed(seed)
    with autocast:
        return pipe(list(prompts), num_images_per_prompt=num_per_prompt, num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=resolution, width=resolution, generator=generator).images

