"""Validation grids: sample `--validation_prompts` with the training UNet (or, at the end, the saved LoRA loaded the
way a user loads it), save `<output_dir>/validation/step-N.png` and send the images to every tracker."""

from __future__ import annotations

from pathlib import Path

import minipref
from minipref.methods import get_method
from full.models.pipeline import sample_images
from full.run.config import RunConfig


def log_validation(accelerator, parts, config: RunConfig, step: int, weight_dtype, *, unet=None, lora_dir=None,
                   unet_dir=None) -> Path | None:
    """A grid (prompts x images) on disk and in each tracker (TensorBoard, wandb, ...); main process only. The
    training UNet (``unet``), or what a run saved: a LoRA (``lora_dir``) or a full UNet folder (``unet_dir``)."""
    if not accelerator.is_main_process:
        return None
    import numpy as np
    from diffusers.utils import make_image_grid

    prompts = list(config.validation_prompts)
    if get_method(config.method).label_in_prompt:  # CSFT: sample with the "good image" prefix (paper 001 Sec. 5.1.2)
        prompts = minipref.csft_prompts(prompts, [True] * len(prompts))
    images = sample_images(
        parts, prompts, device=accelerator.device, dtype=weight_dtype, resolution=config.resolution,
        num_per_prompt=config.num_validation_images, steps=config.num_validation_inference_steps,
        guidance_scale=config.validation_guidance_scale, seed=config.seed, unet=unet, lora_dir=lora_dir, unet_dir=unet_dir,
        vae_path=config.model.pretrained_vae_model_name_or_path, revision=config.model.revision)
    grid = make_image_grid(images, rows=len(prompts), cols=config.num_validation_images)
    final = lora_dir is not None or unet_dir is not None
    path = Path(config.output_dir) / "validation" / f"step-{step:06d}{'-final' if final else ''}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    tag = "validation" + ("/final" if final else "")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # one (N, H, W, C) tensor
            tracker.log_images({tag: np.stack([np.asarray(im) for im in images])}, step, dataformats="NHWC")
        else:  # wandb and the others take a list of PIL images
            try:
                tracker.log_images({tag: images}, step)
            except NotImplementedError:
                pass
    return path
