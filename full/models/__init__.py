"""The diffusers / peft side: a Stable Diffusion pipeline's parts (`pipeline.py`) and the LoRA on its UNet (`lora.py`).

Two families share everything except three small functions: **sd15** (one CLIP text encoder) and **sdxl** (two
text encoders, a pooled embedding and `add_time_ids`). The names below are the public API; modules inside `full/`
import from the two files directly.
"""

from full.models.lora import (LORA_TARGET_MODULES, LORA_WEIGHT_NAME, adapters_disabled, add_lora, load_lora_into,
                              lora_parameters, lora_state_dict, reference_forward, save_lora)
from full.models.pipeline import (FAMILIES, WEIGHT_DTYPES, Components, PromptEmbeds, detect_family, encode_images,
                                  encode_prompts, load_components, pipeline_class, place_components, sample_images,
                                  sdxl_time_ids, training_target, unet_conditioning)

__all__ = ["LORA_TARGET_MODULES", "LORA_WEIGHT_NAME", "adapters_disabled", "add_lora", "load_lora_into",
           "lora_parameters", "lora_state_dict", "reference_forward", "save_lora", "FAMILIES", "WEIGHT_DTYPES",
           "Components", "PromptEmbeds", "detect_family", "encode_images", "encode_prompts", "load_components",
           "pipeline_class", "place_components", "sample_images", "sdxl_time_ids", "training_target",
           "unet_conditioning"]
