"""SPIN's opponent theta_k: a frozen second LoRA adapter, named "opponent", on the *same* UNet.

Memory is one more LoRA, not a second UNet. Its forward switches the active adapter (`unet.set_adapter("opponent")`)
under `torch.no_grad()` and back; its weights never receive gradients and never reach the optimizer. `k = 0` uses the
reference path (adapters disabled = the base model). `OpponentAsReference` lets `full.trainers.denoise.denoise` run
either one as "the reference". Each iteration's trained LoRA is saved to `<output_dir>/iteration-k/` and becomes
the next opponent.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from full.models import lora
from full.models.pipeline import pipeline_class

OPPONENT = "opponent"  # the peft adapter name of the frozen snapshot theta_k



def add_opponent_adapter(unet) -> None:
    """A second LoRA with the trained one's config; frozen, fp32 (so that at the start of an iteration the opponent
    computes exactly what the policy computes). The trained adapter "default" stays the active one."""
    from peft import LoraConfig

    config = unet.peft_config["default"]
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                                    init_lora_weights=config.init_lora_weights), adapter_name=OPPONENT)
    unet.set_adapter("default")  # peft makes the newly added adapter active and trainable; undo that
    for name, param in unet.named_parameters():
        if f".{OPPONENT}." in name:
            param.data = param.data.float()
            param.requires_grad_(False)


def load_opponent(family: str, unet, lora_dir) -> None:
    """Read a LoRA saved by `lora.save_lora` into the "opponent" adapter (`lora.load_lora_into` for "default")."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state = pipeline_class(family).lora_state_dict(str(lora_dir))[0]
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name=OPPONENT)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA in {lora_dir} does not match the UNet: unexpected keys {result.unexpected_keys[:5]}")


def opponent_state(unet) -> dict[str, Tensor]:
    """The opponent adapter's weights under peft's names (`get_peft_model_state_dict` of "default" for the policy)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=OPPONENT)


@contextmanager
def playing_opponent(unet, iteration: int):
    """Run `unet` as theta_k: the base model for k = 0, the frozen snapshot adapter afterwards."""
    if iteration == 0:
        with lora.adapters_disabled(unet):
            yield unet
        return
    unet.set_adapter(OPPONENT)
    try:
        yield unet
    finally:
        unet.set_adapter("default")  # also re-freezes the opponent and re-enables gradients of the LoRA


class OpponentAsReference:
    """`full.trainers.denoise.denoise` gets its reference from `lora.reference_forward`, which runs the UNet with its LoRA
    "disabled" under `torch.no_grad()`. In SPIN the reference is the opponent: this view makes "disabled" mean
    "switched to theta_k" (for k = 0 that is exactly disabling the LoRA)."""

    def __init__(self, unet, iteration: int):
        self.unet, self.iteration, self._context = unet, iteration, None

    def disable_adapters(self) -> None:
        self._context = playing_opponent(self.unet, self.iteration)
        self._context.__enter__()

    def enable_adapters(self) -> None:
        self._context.__exit__(None, None, None)
        self._context = None

    def __call__(self, *args, **kwargs):
        return self.unet(*args, **kwargs)



def save_iteration_lora(family: str, unet, output_dir: Path, iteration: int, accelerator) -> Path:
    """`<output_dir>/iteration-k/`: the next opponent, written to a temporary directory and renamed."""
    final, tmp = output_dir / f"iteration-{iteration}", output_dir / f".iteration-{iteration}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        lora.save_lora(family, unet, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final

