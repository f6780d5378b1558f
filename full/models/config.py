"""`ModelConfig`: which pipeline a run starts from and how its trained part is set up (LoRA rank, memory savers).

Entry points build it from their flags (`full.cli.config(ModelConfig, args)`); `full/models` and the rooms that
load a model take it, never the parsed command line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str | None  # None: a run without a diffusion pipeline (the pixel-space SPM)
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16": which weight files of the repo to read
    pretrained_vae_model_name_or_path: str | None = None  # a VAE that is safe in half precision (SDXL)
    train_mode: str = "lora"  # lora: peft adapters; full: every UNet weight (full/run/weights.py)
    rank: int = 8  # LoRA rank
    lora_alpha: float | None = None  # None: the rank (scale 1)
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    vae_encode_batch_size: int | None = None  # images per VAE encode (None: the whole batch)
    use_ema: bool = False  # full: an EMA of the weights, saved as the final UNet
    ema_decay: float | None = None
    save_pipeline: bool = False  # full: the whole pipeline in output_dir, besides unet/
    # the rectified-flow families (sd3, flux) only; None: the diffusers SD3 / FLUX dreambooth script's default
    weighting_scheme: str | None = None  # the density of u: logit_normal (SD3's), mode, none (FLUX's: uniform)
    logit_mean: float | None = None
    logit_std: float | None = None
    mode_scale: float | None = None
    max_sequence_length: int | None = None  # T5 tokens (77 for SD3, 512 for FLUX, as the scripts)
    flux_guidance_scale: float | None = None  # FLUX.1-dev's guidance embedding while training (3.5, the script's)

    def family_options(self) -> dict:
        """The flags only some families read (`full.models.flow_families.FLOW_FLAGS`), by name."""
        from full.models.flow_families import FLOW_FLAGS

        return {name: getattr(self, name) for name in FLOW_FLAGS}
