"""The diffusers / peft side: a pipeline's parts (`pipeline.py`), the LoRA on its denoiser (`lora.py`), and the model
families (`families.py`: **sd15**, **sdxl**; `flow_families.py`: **sd3**, **flux**), one object each that the
trainers ask instead of comparing names. The names below are the public API; modules inside `full/` import from the
files directly.
"""

from full.models.lora import (LORA_TARGET_MODULES, LORA_WEIGHT_NAME, adapters_disabled, add_lora, load_lora_into,
                              lora_parameters, lora_state_dict, reference_forward, save_lora)
from full.models.families import Family, get_family
from full.models.pipeline import (FAMILIES, WEIGHT_DTYPES, Components, PromptEmbeds, detect_family, encode_images,
                                  encode_prompts, load_components, pipeline_class, place_components, sample_images,
                                  sdxl_time_ids, training_target, unet_conditioning)

__all__ = ["Family", "get_family", "LORA_TARGET_MODULES", "LORA_WEIGHT_NAME", "adapters_disabled", "add_lora", "load_lora_into",
           "lora_parameters", "lora_state_dict", "reference_forward", "save_lora", "FAMILIES", "WEIGHT_DTYPES",
           "Components", "PromptEmbeds", "detect_family", "encode_images", "encode_prompts", "load_components",
           "pipeline_class", "place_components", "sample_images", "sdxl_time_ids", "training_target",
           "unet_conditioning"]
