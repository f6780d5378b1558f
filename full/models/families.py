"""Model families: one object per family, beside the method table. Trainers ask the family and never compare names.

A family says everything a trainer needs to know about a pipeline that the method table does not:

| what                          | `sd15` / `sdxl` (UNet, eps or v)                 | `sd3` / `flux` (rectified-flow transformer)  |
|-------------------------------|--------------------------------------------------|----------------------------------------------|
| pipeline, trained part        | `StableDiffusion(XL)Pipeline`, `unet`            | `StableDiffusion3Pipeline` / `FluxPipeline`, |
|                               |                                                  | `transformer`                                |
| prompts                       | CLIP hidden states (+ SDXL's pooled, time ids)   | the pipeline's own `encode_prompt`           |
| noising, target               | DDPM `add_noise`, eps (or v)                     | `x_t = (1 - s) x0 + s eps`, `v = eps - x0`   |
| error handed to the core      | `mean (eps_theta - eps)^2`                       | the same, of the implied noise               |
|                               |                                                  | `eps_theta = x_t + (1 - s) v_theta`          |
| LoRA targets, save / load     | `to_q/k/v/out.0`, `unet_lora_layers`             | + `add_*_proj`, `to_add_out`,                |
|                               |                                                  | `transformer_lora_layers`                    |

`FAMILIES` maps each name to its object; `get_family(name)` looks one up; `family_of_index(model_index)` reads the
family from a pipeline's `model_index.json`. The UNet families live here; the flow ones in `flow_families.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class PromptEmbeds:
    hidden: Tensor  # (N, L, D): the denoiser's cross-attention (UNet) or joint-attention (transformer) context
    pooled: Tensor | None = None  # (N, P): SDXL, SD3, FLUX


@dataclass
class Noised:
    """One noised batch: what the denoiser is fed, and what the family needs to turn its output into the core's
    eps-form predictions (`Family.core_predictions`)."""

    model_input: Tensor  # (n*B, ...) in the weight dtype: the UNet's x_t; FLUX: packed 2x2 tokens
    timestep: Tensor  # (n*B,) what the denoiser's `timestep=` takes
    target: Tensor  # (n*B, C, h, w) the regression target (eps or v for the UNet, v for flow)
    noise: Tensor | None = None  # flow: eps, the core's target
    noisy: Tensor | None = None  # flow: x_t in fp32
    sigmas: Tensor | None = None  # flow: (n*B,)
    extra: dict | None = None  # flow: extra keyword arguments of the denoiser (FLUX: img_ids, guidance)


def call_denoiser(net, model_input: Tensor, timestep: Tensor, conditioning: dict) -> Tensor:
    """One forward of a UNet or a transformer: ``timestep`` by keyword (the transformers' second positional argument
    is the text context)."""
    return net(model_input, timestep=timestep, **conditioning, return_dict=False)[0]


def _token_ids(tokenizer, captions: list[str], device) -> Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)  # (N, 77)


class Family:
    """The interface every family implements (`UNetFamily`, `flow_families.FlowFamily`)."""

    name: str
    pipeline_class_name: str
    denoiser: str  # the pipeline attribute that is trained: "unet" or "transformer"
    denoiser_class_name: str
    default_resolution: int  # the pipeline's native size
    resolution_multiple: int = 8  # the pixels per latent: the VAE's factor (times a transformer's patch size)
    option_defaults_of: str  # whose column of a method option's per-family default applies (`Option.family_default`)
    beta_dpo: tuple[float, str] | None = None  # (factor, diffusers script) of `--beta_dpo`; None: no such script
    card_tags: tuple[str, ...] = ()
    uses_time_ids: bool = False  # SDXL's micro-conditioning
    zeros_for_empty_prompt: bool = False  # the pipeline's unconditional branch is zeros (SDXL's default)
    vae_fp32_unless_fixed: bool = False  # SDXL's VAE overflows in fp16
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections (paper 000)
    lora_state_converter: bool = True  # peft -> diffusers key names before `save_lora_weights` (the UNet scripts do)
    # why a feature is refused on this family, one line each (None: it runs): "spo", "cache", "spin_full"
    refusals: dict[str, str] = {}

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def refuse(self, feature: str) -> None:
        """One `ValueError` line when ``feature`` does not run on this family."""
        why = self.refusals.get(feature)
        if why:
            raise ValueError(why)

    def matches(self, index: dict) -> bool:
        raise NotImplementedError

    def check_model_options(self, options: dict) -> None:
        """Flags that only some families read, given to another: one line naming the flag (`flow_families`)."""
        from full.models.flow_families import FLOW_FLAGS

        given = [f"--{k}" for k in FLOW_FLAGS if options.get(k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} applies to the rectified-flow families (sd3, flux), not "
                             f"{self.name}")

    # ---- loading
    def load_training_scheduler(self, pretrained: str, revision, options: dict, denoiser=None):
        raise NotImplementedError

    def load_text_encoders(self, pretrained: str, variant, revision) -> tuple[list, list]:
        raise NotImplementedError

    # ---- conditioning
    def encode_prompts(self, parts, captions: list[str], device) -> PromptEmbeds:
        raise NotImplementedError

    def time_ids(self, original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Tensor | None:
        return None

    def conditioning(self, prompt: PromptEmbeds, time_ids: Tensor | None, dtype, step: Noised | None = None) -> dict:
        raise NotImplementedError

    # ---- one training step
    def noised(self, noise_scheduler, latents: Tensor, n: int, generator, weight_dtype) -> Noised:
        raise NotImplementedError

    def core_predictions(self, pred: Tensor, ref_pred: Tensor | None, step: Noised):
        """(pred, ref_pred, target) in float32, in the eps form every core objective takes."""
        raise NotImplementedError

    def latents_from_pipeline(self, latents: Tensor, latent_size: tuple[int, int]) -> Tensor:
        """A pipeline's ``output_type="latent"`` images as (B, C, h, w) training latents (FLUX unpacks them)."""
        return latents

    # ---- the pipeline around a trained denoiser (validation, SPIN's opponent samples)
    def pipeline_components(self, parts) -> dict:
        """The loaded frozen parts (VAE, text encoders, tokenizers) as a pipeline's keyword arguments."""
        raise NotImplementedError

    def pipeline_flags(self, index: dict | None = None) -> dict:
        """The pipeline's other keyword arguments: for `from_pretrained` (``index`` None), or for a pipeline built
        from parts (``index``: its model_index.json)."""
        return {}


class UNetFamily(Family):
    """SD1.x / SD2.x (one CLIP text encoder) and SDXL (two, pooled, `add_time_ids`): eps- or v-prediction UNets."""

    denoiser, denoiser_class_name = "unet", "UNet2DConditionModel"

    def __init__(self, name: str, pipeline_class_name: str, *, two_encoders: bool, default_resolution: int,
                 beta_dpo: tuple[float, str], card_tags: tuple[str, ...]):
        self.name, self.pipeline_class_name, self.two_encoders = name, pipeline_class_name, two_encoders
        self.default_resolution, self.beta_dpo, self.card_tags = default_resolution, beta_dpo, card_tags
        self.option_defaults_of = name
        self.uses_time_ids = self.zeros_for_empty_prompt = self.vae_fp32_unless_fixed = two_encoders

    def matches(self, index: dict) -> bool:
        has = lambda name: isinstance(index.get(name), (list, tuple)) and index[name][0] is not None  # noqa: E731
        return has("unet") and has("vae") and has("text_encoder") and has("text_encoder_2") == self.two_encoders

    def load_training_scheduler(self, pretrained: str, revision, options: dict, denoiser=None):
        from diffusers import DDPMScheduler  # as every diffusers UNet training script

        return DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)

    def load_text_encoders(self, pretrained: str, variant, revision) -> tuple[list, list]:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        kw = dict(revision=revision)
        tokenizers = [AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)]
        encoders = [CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **kw)]
        if self.two_encoders:
            tokenizers.append(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2",
                                                                        variant=variant, **kw))
        return tokenizers, encoders

    def encode_prompts(self, parts, captions: list[str], device) -> PromptEmbeds:
        if not self.two_encoders:
            (tokenizer,), (encoder,) = parts.tokenizers, parts.text_encoders
            return PromptEmbeds(encoder(_token_ids(tokenizer, captions, device), return_dict=False)[0])  # (N, 77, 768)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
            out = encoder(_token_ids(tokenizer, captions, device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds), (N, 1280)
        return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)  # (N, 77, 768 + 1280)

    def time_ids(self, original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Tensor | None:
        """SDXL's `add_time_ids` per image: (orig h, orig w, crop top, crop left, target h, target w)."""
        if not self.uses_time_ids:
            return None
        target = torch.full_like(original_sizes, resolution)
        return torch.cat([original_sizes, crop_top_lefts, target], dim=-1).float()  # (N, 2) x 2 -> (N, 6)

    def conditioning(self, prompt: PromptEmbeds, time_ids: Tensor | None, dtype, step: Noised | None = None) -> dict:
        kwargs = {"encoder_hidden_states": prompt.hidden.to(dtype)}
        if self.uses_time_ids:
            if prompt.pooled is None or time_ids is None:
                raise ValueError("SDXL needs pooled prompt embeddings and add_time_ids")
            kwargs["added_cond_kwargs"] = {"text_embeds": prompt.pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return kwargs

    def noised(self, noise_scheduler, latents: Tensor, n: int, generator, weight_dtype) -> Noised:
        b = latents.shape[0] // n
        noise, timesteps = draw_noise_and_timesteps(b, latents.shape[1:], noise_scheduler.config.num_train_timesteps,
                                                    generator, latents.device)
        noise, timesteps = noise.repeat(n, 1, 1, 1), timesteps.repeat(n)  # (B,) -> (n*B,): a pair shares t, eps
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
        return Noised(noisy, timesteps, training_target(noise_scheduler, latents, noise, timesteps))

    def core_predictions(self, pred: Tensor, ref_pred: Tensor | None, step: Noised):
        return pred.float(), None if ref_pred is None else ref_pred.float(), step.target.float()

    def pipeline_components(self, parts) -> dict:
        components = {}
        if parts.vae is not None:
            components["vae"] = parts.vae
        if parts.text_encoders:
            components["text_encoder"], components["tokenizer"] = parts.text_encoders[0], parts.tokenizers[0]
            if self.two_encoders:
                components["text_encoder_2"], components["tokenizer_2"] = parts.text_encoders[1], parts.tokenizers[1]
        return components

    def pipeline_flags(self, index: dict | None = None) -> dict:
        if index is None:  # from_pretrained
            return {} if self.two_encoders else {"safety_checker": None, "requires_safety_checker": False}
        if self.two_encoders:  # built from parts: the flags from_pretrained would read from model_index.json
            return {"add_watermarker": False,
                    "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def draw_noise_and_timesteps(b: int, shape, num_train_timesteps: int, generator, device) -> tuple[Tensor, Tensor]:
    """eps (b, *shape) and t (b,): from one generator for the batch, or item i from ``generator[i]`` (then an item's
    draws do not depend on which process or batch it is in: `full.run.accelerator.sample_generators`)."""
    if not isinstance(generator, list):
        noise = torch.randn((b, *shape), generator=generator, device=device)
        return noise, torch.randint(0, num_train_timesteps, (b,), generator=generator, device=device)
    noise = torch.cat([torch.randn((1, *shape), generator=g, device=device) for g in generator])
    timesteps = torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g, device=device) for g in generator])
    return noise, timesteps


def training_target(noise_scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """`eps` for epsilon-prediction, the velocity for v-prediction (SD2.x-768): the losses never care which."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config (epsilon or v_prediction)")


# diffusers' train_diffusion_dpo.py (SD1.5) has no 1/2 in its loss, logsigmoid(beta_dpo * diff): our beta is 2x;
# train_diffusion_dpo_sdxl.py keeps it, -0.5 * beta_dpo * diff: our beta is the same (docs/conventions.md).
SD15 = UNetFamily("sd15", "StableDiffusionPipeline", two_encoders=False, default_resolution=512,
                  beta_dpo=(2.0, "train_diffusion_dpo.py"), card_tags=("stable-diffusion",))
SDXL = UNetFamily("sdxl", "StableDiffusionXLPipeline", two_encoders=True, default_resolution=1024,
                  beta_dpo=(1.0, "train_diffusion_dpo_sdxl.py"), card_tags=("stable-diffusion-xl",))


def _all() -> dict[str, Any]:
    from full.models.flow_families import FLUX, SD3

    return {f.name: f for f in (SD15, SDXL, SD3, FLUX)}


FAMILIES: dict[str, Family] = {}  # filled on first use: flow_families imports this module


def _table() -> dict[str, Family]:
    if not FAMILIES:
        FAMILIES.update(_all())
    return FAMILIES


def get_family(name: str) -> Family:
    if name not in _table():
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_index(index: dict) -> Family | None:
    """The family whose pipeline `model_index.json` this is, or None."""
    return next((f for f in _table().values() if f.matches(index)), None)
