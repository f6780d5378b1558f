"""LoRA with peft on the denoiser's attention projections (the UNet's, or SD3's / FLUX's transformer's: the family's
`lora_targets`): add, run with and without (the reference), save, load.

The reference model of every objective is the frozen starting point (docs/conventions.md §4): with LoRA it is the
*same* UNet with its adapters disabled, run under `torch.no_grad()` -- no second copy of the weights. Saved LoRAs
are in diffusers format: `pipe.load_lora_weights(directory)`.
"""

from __future__ import annotations

import os

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from full.models.config import ModelConfig
from full.models.families import Family, get_family

LORA_TARGET_MODULES = list(Family.lora_targets)  # the UNet families' attention projections (paper 000, Sec. 4)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(dir)` looks for



def add_lora(unet, rank: int = 8, *, alpha: float | None = None, init: str | bool = "gaussian",
             target_modules=None) -> None:
    """peft LoRA on the attention projections (``target_modules``, default the UNet's); `init="gaussian"`:
    A ~ N(0, 1/r), B = 0, so the model starts exactly at the reference (paper 000 trains rank 8 this way)."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"--rank must be positive, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=init,
                        target_modules=list(target_modules or LORA_TARGET_MODULES))
    unet.add_adapter(config)


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def adapters_disabled(unet):
    """The reference network: the same UNet with its LoRA switched off (pass the *unwrapped* model)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def reference_forward(unet, noisy_latents: Tensor, timesteps: Tensor, conditioning: dict) -> Tensor:
    """`eps_ref(x_t, t, c)`: the frozen starting point, no graph kept."""
    with torch.no_grad(), adapters_disabled(unet):
        return unet(noisy_latents, timesteps, **conditioning, return_dict=False)[0]


def lora_state_dict(unet, family: str = "sd15") -> dict[str, Tensor]:
    """The adapter weights only, with the key names the family's `save_lora_weights` expects (diffusers' for the
    UNet, as the UNet scripts convert them; peft's for the transformers, as the SD3 / FLUX scripts save them)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    return convert_state_dict_to_diffusers(state) if get_family(family).lora_state_converter else state


def save_lora(family: str, unet, directory, *, is_main_process: bool = True) -> Path:
    """`<directory>/pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(directory)` of the
    family's pipeline (`unet_lora_layers` or `transformer_lora_layers`)."""
    fam = get_family(family)
    config = unet.peft_config["default"]
    metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    fam.pipeline_class().save_lora_weights(
        save_directory=str(directory),
        is_main_process=is_main_process,
        safe_serialization=True,
        **{f"{fam.denoiser}_lora_layers": lora_state_dict(unet, family),
           f"{fam.denoiser}_lora_adapter_metadata": metadata},
    )
    path = Path(directory) / LORA_WEIGHT_NAME
    if is_main_process:
        readable_by_all(path)
    return path


def readable_by_all(path: Path) -> None:
    """The pinned safetensors' `save_file` creates its file with mode 0600 (owner only); give it the mode any other
    new file gets here (0644 under the usual umask 022), so the LoRA can be shared, served or copied by others."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_lora_into(family: str, unet, directory, adapter_name: str = "default") -> None:
    """Load a LoRA saved by `save_lora` into the existing adapter ``adapter_name`` of `unet` (resuming; SPIN's
    opponent), as the diffusers scripts' load hooks do."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    fam = get_family(family)
    state = fam.pipeline_class().lora_state_dict(str(directory))
    state = state[0] if isinstance(state, tuple) else state  # the UNet pipelines also return the network alphas
    prefix = f"{fam.denoiser}."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"LoRA in {directory} has no {fam.denoiser} weights (keys {list(state)[:3]})")
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(own), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA in {directory} does not match the {fam.denoiser}: unexpected keys {unexpected[:5]}")


def trainable_unet_parts(model: ModelConfig, device, weight_dtype, *, cached: bool = False,
                         with_reference: bool = True):
    """The pipeline's parts ready to train, the frozen ones in `weight_dtype` (the VAE and text encoders are skipped
    when training from a cache). ``--train_mode lora``: a LoRA on the UNet, in fp32. ``full``: the whole UNet in
    fp32 master weights and, when the objective needs it (``with_reference``), ``parts.reference_unet``: a frozen
    copy of the starting UNet in `weight_dtype`, never trained, never wrapped by DDP/ZeRO/FSDP."""
    import copy

    from diffusers.training_utils import cast_training_params

    from full.models.pipeline import load_components, place_components

    parts = load_components(model.pretrained_model_name_or_path, revision=model.revision, variant=model.variant,
                            vae_path=model.pretrained_vae_model_name_or_path, with_vae=not cached,
                            with_text_encoders=not cached, options=model.family_options())
    full = model.train_mode == "full"
    if full:
        parts.reference_unet = copy.deepcopy(parts.unet) if with_reference else None  # frozen, as loaded
        parts.unet.requires_grad_(True)
    else:
        add_lora(parts.unet, model.rank, alpha=model.lora_alpha, target_modules=get_family(parts.family).lora_targets)
    place_components(parts, device, weight_dtype, fixed_vae=bool(model.pretrained_vae_model_name_or_path),
                     unet_dtype=torch.float32 if full else None)
    if not full:
        cast_training_params(parts.unet, dtype=torch.float32)
    if model.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    if model.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    parts.unet.train()
    return parts
