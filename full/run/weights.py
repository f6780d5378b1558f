"""What a run trains and saves (`--train_mode lora|full`): the one place the two modes differ.

|                | `lora` (default)                               | `full`                                          |
|----------------|------------------------------------------------|-------------------------------------------------|
| trained        | peft adapters on the UNet's attention, fp32    | every UNet weight, fp32 master weights (mixed   |
|                |                                                | precision casts the forward, as the diffusers   |
|                |                                                | full fine-tuning scripts do)                    |
| reference      | the same UNet with its adapters disabled       | a frozen copy of the starting UNet in the weight|
|                | (no second copy of the weights)                | dtype, outside DDP/ZeRO/FSDP and the optimizer  |
| checkpoint     | the adapters, optimizer, position              | the UNet, optimizer, position, EMA; never the   |
|                |                                                | reference (it is the base pipeline's UNet)      |
| final output   | `pytorch_lora_weights.safetensors`             | `unet/` (diffusers folder; the EMA weights with |
|                | (`pipe.load_lora_weights`)                     | --use_ema), with --save_pipeline a pipeline     |

The reference of every objective is the frozen starting point (docs/conventions.md §4): ``as_reference(model)`` is
that network in either mode, and `reference_forward` what a denoising step calls for it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager

import torch

from full.models import lora
from full.run import checkpoints

UNET_FOLDER = "unet"  # the UNet families' folder; a flow family's is "transformer" (`Family.denoiser`)


def zero3_or_fsdp(accelerator) -> bool:
    """The engine shards the weights themselves (DeepSpeed ZeRO-3 or FSDP), not only optimizer state/gradients."""
    state = accelerator.state
    if state.distributed_type.value == "FSDP":
        return True
    plugin = getattr(state, "deepspeed_plugin", None)
    return state.distributed_type.value == "DEEPSPEED" and plugin is not None and plugin.zero_stage == 3


class LoraWeights:
    """A LoRA run: the UNet's adapter, saved in diffusers format (checkpoints hold only it).

    What `TrainingRun` asks of a ``trained`` object (this, `FullWeights`, the SPM trainer's `SpmWeights`):
    ``module``, ``weight_name``, ``parameters()``, ``register(accelerator)``, ``after_load(prepared)``,
    ``after_step(model)``, ``gathered_state(accelerator, prepared)``, ``save(model, output_dir, state)``,
    ``validation_source(output_dir)``; optionally ``card`` and ``ema``."""

    def __init__(self, unet, family: str):
        self.module, self.family, self.weight_name = unet, family, lora.LORA_WEIGHT_NAME

    def parameters(self) -> list:
        return lora.lora_parameters(self.module)

    def register(self, accelerator) -> None:
        checkpoints.register_lora_hooks(accelerator, self.family)

    def after_load(self, prepared) -> None:
        from diffusers.training_utils import cast_training_params

        cast_training_params(prepared, dtype=torch.float32)

    def after_step(self, model) -> None:
        """Called after each optimizer step (nothing for LoRA)."""

    def as_reference(self, model):
        """The reference network: the same UNet with its LoRA switched off (a context manager)."""
        return lora.adapters_disabled(model)

    def gathered_state(self, accelerator, prepared) -> None:
        """Nothing to gather: the adapter is small and whole on every process."""

    def save(self, model, output_dir, state=None) -> Path:
        return lora.save_lora(self.family, model, output_dir)

    def validation_source(self, output_dir) -> dict:
        """How the final validation grid loads what was saved, as a user would: `pipe.load_lora_weights`."""
        return {"lora_dir": output_dir}


class FullWeights:
    """A full fine-tuning run: every UNet weight trains in fp32; the reference is a frozen copy of the start.

    ``ema_decay`` (``--use_ema``): diffusers' `EMAModel` of the trained weights, updated after every optimizer step,
    saved in each checkpoint and restored on resume; the final `unet/` holds the EMA weights."""


    def __init__(self, unet, family: str, reference, *, ema_decay: float | None = None):
        from full.models.families import get_family

        self.denoiser = get_family(family)
        self.module, self.family, self.reference = unet, family, reference
        self.weight_name = self.denoiser.denoiser  # "unet", or a flow family's "transformer"
        self.ema = None
        if ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(unet.parameters(), decay=ema_decay, model_cls=type(unet), model_config=unet.config)

    def parameters(self) -> list:
        return [p for p in self.module.parameters() if p.requires_grad]

    def register(self, accelerator) -> None:
        """The EMA weights travel with each checkpoint (accelerate saves the UNet and optimizer itself)."""
        if self.ema is not None:
            self.ema.to(accelerator.device)
            accelerator.register_for_checkpointing(self.ema)

    def after_load(self, prepared) -> None:
        """Nothing to cast: the checkpoint holds the fp32 master weights."""

    def after_step(self, model) -> None:
        if self.ema is not None:
            self.ema.step(model.parameters())

    @contextmanager
    def as_reference(self, model):
        """The reference network: the frozen copy of the starting UNet."""
        yield self.reference

    def gathered_state(self, accelerator, prepared) -> dict:
        """The whole UNet's state on the main process; every process calls it (under ZeRO-3 or FSDP the weights
        are sharded and the gather is a collective). Under DDP or one process it is the model's state dict."""
        state = accelerator.get_state_dict(prepared)
        # DeepSpeed hands back its bf16/fp16 module weights: the saved UNet keeps the fp32 master precision
        return None if state is None else {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def validation_source(self, output_dir) -> dict:
        """The final validation grid samples with the saved `unet/`, loaded the way a user loads it."""
        return {"unet_dir": Path(output_dir) / self.weight_name}

    @property
    def card(self) -> dict:
        if self.weight_name == UNET_FOLDER:
            return {"what": "UNet", "usage": None}
        return {"what": self.weight_name, "usage": None, "denoiser_class": self.denoiser.denoiser_class_name}

    def save(self, model, output_dir, state=None) -> Path:
        """`<output_dir>/unet/` as diffusers writes it (safetensors): `UNet2DConditionModel.from_pretrained(output_dir,
        subfolder="unet")`, or a pipeline's `unet=` argument. With EMA, the averaged weights."""
        folder = Path(output_dir) / self.weight_name
        if self.ema is None:
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)
            return folder
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())  # EMA with ZeRO-3 / FSDP is refused at start: the weights here are whole
        try:
            model.save_pretrained(folder, safe_serialization=True)
        finally:
            self.ema.restore(model.parameters())
        return folder


def weights_for(train_mode: str, parts, family: str, *, ema_decay: float | None = None):
    """The `TrainingRun`'s ``trained`` for ``--train_mode`` (`full.models.lora.trainable_unet_parts` made the parts:
    with a LoRA on the UNet, or a fp32 UNet and its frozen copy ``parts.reference_unet``)."""
    if train_mode == "lora":
        return LoraWeights(parts.unet, family)
    return FullWeights(parts.unet, family, parts.reference_unet, ema_decay=ema_decay)


def reference_forward(as_reference: Callable[[], ContextManager]):
    """`eps_ref(x_t, t, c)` (a flow model's `v_ref`) without a graph, for `full.trainers.denoise.denoise`;
    ``as_reference()`` yields the reference network: ``lambda: trained.as_reference(model)`` (`LoraWeights`,
    `FullWeights`), or SPIN's opponent theta_k."""
    from full.models.families import call_denoiser

    def forward(noisy, timesteps, conditioning):
        with torch.no_grad(), as_reference() as reference:
            return call_denoiser(reference, noisy, timesteps, conditioning)

    return forward
