"""The rectified-flow families: Stable Diffusion 3 / 3.5 (`sd3`) and FLUX.1 (`flux`), wired to `full/models/flow.py`.

What a training step does on them (docs/flow_matching.md has the derivation and the sources):

1. ``sigma`` drawn as diffusers' `train_dreambooth_lora_sd3.py` / `train_dreambooth_lora_flux.py` draw it
   (`flow.sample_timesteps`: `--weighting_scheme`, `--logit_mean`, `--logit_std`, `--mode_scale`; per family the
   script's default), one draw per pair shared by winner and loser;
2. ``x_t = (1 - sigma) x0 + sigma eps`` and the target ``v = eps - x0``; the transformer is fed ``1000 sigma`` (SD3)
   or ``sigma`` (FLUX, whose script passes ``timesteps / 1000``), FLUX its latents as packed 2x2 tokens with their
   position ids and, for FLUX.1-dev, the guidance embedding (`--flux_guidance_scale`, the script's 3.5);
3. the prediction handed to the core objectives is the noise the velocity implies, ``eps_theta = x_t + (1 - sigma)
   v_theta``, and the target ``eps``: so ``mean (eps_theta - eps)^2 = (1 - sigma)^2 err_v`` (`flow.noise_equivalent_
   error`), every objective runs unchanged with the SD convention's beta, and DSPO's score difference is
   ``(1 - sigma)(v_theta - v_ref)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from full.models import flow
from full.models.families import Family, Noised, PromptEmbeds

# ModelConfig fields only the flow families read (None: the family's script default)
FLOW_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length",
              "flux_guidance_scale")
SAMPLING_SCHEMES = ("logit_normal", "mode", "none")  # the density flags; sigma_sqrt / cosmap weight the loss instead


@dataclass
class FlowTraining:
    """A flow family's `Components.noise_scheduler`: the scripts' training copy of the scheduler and their flags."""

    schedule: object  # FlowMatchEulerDiscreteScheduler, never `set_timesteps` (flow.training_schedule)
    sampling: flow.TimestepSampling
    max_sequence_length: int  # T5 tokens
    guidance: float | None  # FLUX.1-dev's guidance embedding; None: the transformer has none

    @property
    def config(self):
        return self.schedule.config


class FlowFamily(Family):
    denoiser = "transformer"
    default_resolution = 1024  # SD3.5 and FLUX.1's native size (the dreambooth scripts default to 512)
    resolution_multiple = 16  # the VAE's factor 8 x the transformer's 2x2 patches (FLUX: packed 2x2 latents)
    option_defaults_of = "sdxl"  # our choice: a method option's per-family default is SDXL's (the large-model column)
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",  # the SD3 and FLUX dreambooth scripts'
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")  # attention layers
    lora_state_converter = False  # the flow scripts save peft's keys as they are
    encoder_names: tuple[str, ...] = ()
    script_sampling: flow.TimestepSampling
    script_sequence_length: int
    refusals = {
        "spo": "SPO needs stochastic step-wise pairs (two Gaussian denoising steps from one x_t); the rectified-flow "
               "Euler sampler of {name} takes deterministic steps. Flow-GRPO (arXiv:2505.05470) derives the SDE form "
               "that would give them; it is not wired here: use full.train (dpo, kto, ...) or full.spin",
        "cache": "--cached_dir: the latent cache (full.cache) stores SD1.5/SDXL conditioning; {name} trains from "
                 "--dataset_name (its prompts are encoded by the pipeline's encode_prompt each step)",
        "spin_full": "--train_mode full with full.spin: the opponent snapshots are UNet folders; on {name} train SPIN "
                     "with --train_mode lora",
    }

    def refuse(self, feature: str) -> None:
        why = self.refusals.get(feature)
        if why:
            raise ValueError(why.format(name=self.name))

    def check_model_options(self, options: dict) -> None:
        if options.get("weighting_scheme") not in (None, *SAMPLING_SCHEMES):
            raise ValueError(f"--weighting_scheme must be one of {', '.join(SAMPLING_SCHEMES)} (sigma_sqrt and cosmap "
                             "weight the loss per sample, which would change every objective's beta per timestep)")

    def sampling(self, options: dict) -> flow.TimestepSampling:
        script = self.script_sampling
        pick = lambda name: getattr(script, name) if options.get(name) is None else options[name]  # noqa: E731
        return flow.TimestepSampling(pick("weighting_scheme"), pick("logit_mean"), pick("logit_std"),
                                     pick("mode_scale"))

    def load_training_scheduler(self, pretrained: str, revision, options: dict, denoiser=None) -> FlowTraining:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = FlowMatchEulerDiscreteScheduler.load_config(pretrained, subfolder="scheduler", revision=revision)
        guidance = None
        if getattr(getattr(denoiser, "config", None), "guidance_embeds", False):
            guidance = options.get("flux_guidance_scale")
            guidance = 3.5 if guidance is None else guidance  # train_dreambooth_lora_flux.py --guidance_scale
        elif options.get("flux_guidance_scale") is not None:
            raise ValueError(f"--flux_guidance_scale: the transformer of {pretrained} has no guidance embedding "
                             "(guidance_embeds false, as FLUX.1-schnell); drop the flag")
        return FlowTraining(flow.training_schedule(config), self.sampling(options),
                            options.get("max_sequence_length") or self.script_sequence_length, guidance)

    def load_text_encoders(self, pretrained: str, variant, revision) -> tuple[list, list]:
        import transformers
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(pretrained, revision=revision)
        tokenizers, encoders = [], []
        for name in self.encoder_names:
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            tokenizers.append(transformers.AutoTokenizer.from_pretrained(pretrained, subfolder=tokenizer_name,
                                                                         revision=revision))
            if not (index.get(name) or [None, None])[1]:  # e.g. SD3 saved without T5: "text_encoder_3": [null, null]
                raise ValueError(f"{pretrained} has no {name} (its model_index.json); {self.name} trains with all "
                                 f"of {', '.join(self.encoder_names)}")
            encoder_class = getattr(transformers, index[name][1])  # CLIPTextModel(WithProjection), T5EncoderModel
            encoders.append(encoder_class.from_pretrained(pretrained, subfolder=name, variant=variant,
                                                          revision=revision))
        return tokenizers, encoders

    def pipeline_components(self, parts) -> dict:
        components = {} if parts.vae is None else {"vae": parts.vae}
        for name, tokenizer, encoder in zip(self.encoder_names, parts.tokenizers, parts.text_encoders):
            components[name], components[name.replace("text_encoder", "tokenizer")] = encoder, tokenizer
        return components

    def text_pipeline(self, parts):
        """The family's pipeline around the text encoders only: its `encode_prompt` is what the user's pipeline runs."""
        if parts.text_pipeline is None:
            components = self.pipeline_components(parts) | {"transformer": None, "vae": None, "scheduler": None}
            parts.text_pipeline = self.pipeline_class()(**components)
        return parts.text_pipeline

    def time_ids(self, original_sizes, crop_top_lefts, resolution):
        return None

    def noised(self, noise_scheduler: FlowTraining, latents: Tensor, n: int, generator, weight_dtype) -> Noised:
        b, device = latents.shape[0] // n, latents.device
        generators = generator if isinstance(generator, list) else [generator]
        per_item = isinstance(generator, list)  # item i draws from generator[i]: P processes draw as one
        noise = torch.cat([torch.randn((1 if per_item else b, *latents.shape[1:]), generator=g, device=device)
                           for g in generators])
        drawn = [flow.sample_timesteps(noise_scheduler.schedule, 1 if per_item else b, noise_scheduler.sampling,
                                       generator=g, device=g.device if g is not None else None) for g in generators]
        timesteps, sigmas = (torch.cat([d[i] for d in drawn]).to(device) for i in (0, 1))
        # (B,) -> (n*B,): a pair's winner and loser share sigma and eps (docs/conventions.md §3)
        noise, timesteps, sigmas = noise.repeat(n, 1, 1, 1), timesteps.repeat(n), sigmas.repeat(n)
        # x_t = (1 - sigma) x0 + sigma eps
        noisy = flow.add_noise(latents, noise, sigmas)
        # v = eps - x0
        target = flow.velocity_target(latents, noise)
        step = Noised(noisy.to(weight_dtype), timesteps, target, noise=noise, noisy=noisy, sigmas=sigmas, extra={})
        return self.to_model(step, noise_scheduler)

    def to_model(self, step: Noised, training: FlowTraining) -> Noised:
        return step

    def from_model(self, pred: Tensor, step: Noised) -> Tensor:
        return pred

    def core_predictions(self, pred: Tensor, ref_pred: Tensor | None, step: Noised):
        def implied_noise(velocity):
            # eps_theta = x_t + (1 - sigma) v_theta   =>   mean (eps_theta - eps)^2 = (1 - sigma)^2 err_v
            return flow.noise_from_velocity(step.noisy, self.from_model(velocity, step).float(), step.sigmas)

        return implied_noise(pred), None if ref_pred is None else implied_noise(ref_pred), step.noise.float()


class SD3Family(FlowFamily):
    name, pipeline_class_name, denoiser_class_name = "sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel"
    card_tags = ("stable-diffusion-3", "sd3")
    encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    script_sampling = flow.SD3_SCRIPT_SAMPLING
    script_sequence_length = 77  # train_dreambooth_lora_sd3.py --max_sequence_length

    def matches(self, index: dict) -> bool:
        return index.get("_class_name") == self.pipeline_class_name

    def check_model_options(self, options: dict) -> None:
        super().check_model_options(options)
        if options.get("flux_guidance_scale") is not None:
            raise ValueError("--flux_guidance_scale applies to FLUX (its guidance embedding), not sd3")

    def encode_prompts(self, parts, captions: list[str], device) -> PromptEmbeds:
        # two CLIP penultimate states (concatenated, zero-padded to T5's width) then T5's, and the two pooled outputs
        hidden, _, pooled, _ = self.text_pipeline(parts).encode_prompt(
            captions, None, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=parts.noise_scheduler.max_sequence_length)
        return PromptEmbeds(hidden, pooled)  # (N, 77 + L, D_T5), (N, P1 + P2)

    def conditioning(self, prompt: PromptEmbeds, time_ids, dtype, step: Noised | None = None) -> dict:
        return {"encoder_hidden_states": prompt.hidden.to(dtype), "pooled_projections": prompt.pooled.to(dtype)}


class FluxFamily(FlowFamily):
    name, pipeline_class_name, denoiser_class_name = "flux", "FluxPipeline", "FluxTransformer2DModel"
    card_tags = ("flux",)
    encoder_names = ("text_encoder", "text_encoder_2")
    script_sampling = flow.FLUX_SCRIPT_SAMPLING
    script_sequence_length = 512  # train_dreambooth_lora_flux.py --max_sequence_length

    def matches(self, index: dict) -> bool:
        return index.get("_class_name") == self.pipeline_class_name

    def encode_prompts(self, parts, captions: list[str], device) -> PromptEmbeds:
        # T5's hidden states and CLIP's pooled output
        hidden, pooled, _ = self.text_pipeline(parts).encode_prompt(
            captions, None, device=device, max_sequence_length=parts.noise_scheduler.max_sequence_length)
        return PromptEmbeds(hidden, pooled)  # (N, L, D_T5), (N, P)

    def to_model(self, step: Noised, training: FlowTraining) -> Noised:
        batch, _, height, width = step.noisy.shape
        step.extra["img_ids"] = flow.flux_latent_image_ids(batch, height, width, step.noisy.device,
                                                           step.model_input.dtype)
        step.extra["guidance"] = None if training.guidance is None else \
            torch.full((batch,), float(training.guidance), device=step.noisy.device)
        step.model_input = flow.pack_flux_latents(step.model_input)  # (n*B, hw/4, 4C)
        step.timestep = step.timestep / 1000  # the FLUX script feeds sigma; the transformer multiplies by 1000
        return step

    def from_model(self, pred: Tensor, step: Noised) -> Tensor:
        return flow.unpack_flux_latents(pred, *step.noisy.shape[-2:])

    def conditioning(self, prompt: PromptEmbeds, time_ids, dtype, step: Noised | None = None) -> dict:
        extra = {} if step is None else step.extra
        txt_ids = torch.zeros(prompt.hidden.shape[1], 3, device=prompt.hidden.device, dtype=dtype)
        return {"encoder_hidden_states": prompt.hidden.to(dtype), "pooled_projections": prompt.pooled.to(dtype),
                "txt_ids": txt_ids, **extra}

    def latents_from_pipeline(self, latents: Tensor, latent_size: tuple[int, int]) -> Tensor:
        return flow.unpack_flux_latents(latents, *latent_size) if latents.ndim == 3 else latents


SD3, FLUX = SD3Family(), FluxFamily()
