"""Checkpoints: the LoRA (diffusers format), the optimizer, the lr schedule and the data position, via accelerate's
`save_state`. Each is written to `.checkpoint-N.tmp` and renamed, so a crash mid-save leaves the previous one
intact; `--resume_from_checkpoint latest` picks the newest complete one."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from full.models import lora

logger = logging.getLogger(__name__)

RECORD_NAME = "minipref_run.json"  # the run's identity (full/run/output_dir.py), copied into every checkpoint
PROGRESS_NAME = "custom_checkpoint_0.pkl"  # accelerate's file for the first registered object: TrainingProgress
STREAM_NAME = "custom_checkpoint_1.pkl"  # the next one, with --streaming: the stream's place (full/run/loop.py)


class TrainingProgress:
    """Where training is; registered with accelerate so that `save_state` / `load_state` carry it."""

    def __init__(self):
        self.global_step, self.epoch, self.batch_in_epoch, self.micro_step = 0, 0, 0, 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def list_checkpoints(output_dir) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(value: str | None, output_dir) -> Path | None:
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value) if Path(value).is_dir() else Path(output_dir) / value
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint directory (nor {path}); "
                         '"latest" resumes the newest checkpoint in --output_dir')
    return path


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None) -> Path:
    """`save_state` into `.checkpoint-N.tmp`, then one rename to `checkpoint-N`; old ones pruned afterwards."""
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **engine_state_kwargs(accelerator, saving=True))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if (output_dir / RECORD_NAME).is_file():
            shutil.copyfile(output_dir / RECORD_NAME, tmp / RECORD_NAME)
        if final.exists():  # the same step reached again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[: -total_limit] if total_limit else []:
            shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def engine_state_kwargs(accelerator, *, saving: bool) -> dict:
    """What `save_state` / `load_state` pass to the engine. Under DeepSpeed (ZeRO-2) accelerate hands the model to
    DeepSpeed's `save_checkpoint`, which by default writes every parameter, the frozen UNet included (up to
    3.4 GB per checkpoint for SD1.5's 860M parameters): `exclude_frozen_parameters` keeps only the LoRA and its optimizer shards, and
    loading such a checkpoint then needs `load_module_strict=False` (the frozen weights come from the pipeline).
    DDP and a single process: nothing to pass (the save hook below already stores only the LoRA)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {}
    return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}


def register_lora_hooks(accelerator, family: str) -> None:
    """Make `save_state` / `load_state` store the LoRA in diffusers format instead of the whole UNet."""

    def save_hook(models_, weights, output_dir):
        if accelerator.is_main_process:
            for model in models_:
                lora.save_lora(family, accelerator.unwrap_model(model), output_dir)
        weights.clear()  # nothing else: the frozen base weights come from the pretrained pipeline

    def load_hook(models_, input_dir):
        while models_:
            lora.load_lora_into(family, accelerator.unwrap_model(models_.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
