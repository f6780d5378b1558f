"""SPIN's opponent theta_k: a frozen second LoRA adapter, named "opponent", on the *same* UNet.

Memory is one more LoRA, not a second UNet. Its forward switches the active adapter (`unet.set_adapter("opponent")`)
under `torch.no_grad()` and back; its weights never receive gradients and never reach the optimizer. `k = 0` uses the
reference path (adapters disabled = the base model). With --train_mode full the opponent is a frozen copy of the whole
UNet instead (`FullOpponent`). Either way ``playing(k)`` yields the network theta_k, which samples the losers and is
the reference of the step; each iteration's trained weights are saved to `<output_dir>/iteration-k/` and become the
next opponent.
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from full.models import lora

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
    """Read a LoRA saved by `lora.save_lora` into the "opponent" adapter (any family's denoiser)."""
    lora.load_lora_into(family, unet, lora_dir, adapter_name=OPPONENT)


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


def save_atomically(output_dir: Path, iteration: int, accelerator, write) -> Path:
    """`<output_dir>/iteration-k/` (``write(folder)`` fills it on the main process): the next opponent, written to
    a temporary directory and renamed, so an interrupted save leaves no half snapshot."""
    final, tmp = output_dir / f"iteration-{iteration}", output_dir / f".iteration-{iteration}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


class LoraOpponent:
    """theta_k of a LoRA run: the "opponent" adapter on the training UNet (base model at k = 0)."""

    weight_file = lora.LORA_WEIGHT_NAME  # of iteration-k/: what must be there for the snapshot to count

    def __init__(self, family: str, unet):
        self.family, self.unet = family, unet
        add_opponent_adapter(unet)

    def load(self, snapshot: Path) -> None:
        load_opponent(self.family, self.unet, snapshot)

    def playing(self, iteration: int):
        """A context manager that yields the network theta_k samples and scores with."""
        return playing_opponent(self.unet, iteration)

    def save_iteration(self, training, output_dir: Path, iteration: int) -> Path:
        return save_atomically(output_dir, iteration, training.accelerator,
                               lambda folder: lora.save_lora(self.family, training.model, folder))


class FullOpponent:
    """theta_k of a full fine-tuning run: a frozen copy of the whole UNet in the weight dtype, outside the wrapped
    model and the optimizer. It starts as the base model (the run's reference copy) and is overwritten with each
    snapshot; memory is one more UNet, as the reference of an offline full run."""

    weight_file = "unet/config.json"  # of iteration-k/ (the weights beside it may be sharded)

    def __init__(self, module):
        self.module = module

    def load(self, snapshot: Path) -> None:
        saved = type(self.module).from_pretrained(snapshot, subfolder="unet")
        self.module.load_state_dict(saved.state_dict())  # copied into the module's dtype and device

    @contextmanager
    def playing(self, iteration: int):
        yield self.module

    def save_iteration(self, training, output_dir: Path, iteration: int) -> Path:
        state = training.accelerator.get_state_dict(training.unet)  # every process: a collective under sharding
        return save_atomically(output_dir, iteration, training.accelerator,
                               lambda folder: training.model.save_pretrained(folder / "unet", state_dict=state,
                                                                             safe_serialization=True))


def opponent_for(train_mode: str, family: str, parts):
    """The opponent of ``--train_mode``: call before the run wraps the UNet (the LoRA opponent adds an adapter)."""
    return LoraOpponent(family, parts.unet) if train_mode == "lora" else FullOpponent(parts.reference_unet)
