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
