"""The Accelerator of a run, its trackers, and the optimizer with its learning-rate schedule."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from full.run.config import RunConfig

# --report_to value -> the package its accelerate tracker imports
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def check_report_to(value: str) -> str | None:
    """A `--report_to` message when its tracker cannot run here (else None): checked before any model loads, so a
    missing wandb does not mean a silent run with no logging."""
    if value in ("none", "all"):
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACKER_PACKAGES]
    if unknown:
        return f"--report_to {value}: unknown tracker {unknown[0]!r}; choose from none, all, {', '.join(TRACKER_PACKAGES)}"
    missing = [name for name in names if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        extra = "wandb" if missing[0] == "wandb" else None
        how = f'pip install "minipref[{extra}]"' if extra else f"pip install {TRACKER_PACKAGES[missing[0]]}"
        return f"--report_to {value}: {missing[0]} is not installed ({how}), or pass --report_to none"
    return None


def make_accelerator(config: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from full.processes import (check_all_ranks, check_sharding_engine_has_gpus, cpu_ranks_needed,
                                launched_processes, single_process_of_a_multi_process_launch)

    launched = launched_processes()
    check_sharding_engine_has_gpus(launched)
    report_to = None if config.report_to == "none" else config.report_to
    accelerator = Accelerator(
        # Several processes (torchrun, `accelerate launch --multi_gpu`) on a machine without CUDA: DDP over gloo on
        # the CPU, instead of N unaware single-process runs writing to one directory.
        cpu=cpu_ranks_needed(launched),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=report_to.split(",") if report_to and report_to != "all" else report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=str(Path(config.output_dir) / config.logging_dir)),
    )
    check_all_ranks(launched, accelerator.num_processes)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warning = single_process_of_a_multi_process_launch()
    if warning:
        logging.getLogger(__name__).warning(warning)
    return accelerator


def make_optimizer(config: RunConfig, params, accelerator):
    """The optimizer on the trained parameters and its learning-rate schedule.

    `--optimizer adamw` (torch), `adamw_8bit` (bitsandbytes), or `adafactor` (transformers', with the settings of
    Diffusion-DPO's SDXL training script: a fixed learning rate, no relative step or parameter scaling, update
    clipping at 1). `--scale_lr` multiplies the rate by the global batch (processes x micro-batch x accumulation),
    as the Diffusion-DPO launchers use it. The schedule is diffusers' `get_scheduler`, or transformers'
    `inverse_sqrt` (linear warm-up, then lr x sqrt(warmup / step): DSPO's schedule)."""
    from diffusers.optimization import SchedulerType, get_scheduler

    scale = config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes \
        if config.scale_lr else 1
    lr = config.learning_rate * scale
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, lr=lr, weight_decay=config.adam_weight_decay, clip_threshold=1.0,
                              scale_parameter=False, relative_step=False, warmup_init=False)
    else:
        adamw = torch.optim.AdamW
        if config.optimizer == "adamw_8bit":
            import bitsandbytes  # checked at parse time (full.cli.check_importable)

            adamw = bitsandbytes.optim.AdamW8bit
        optimizer = adamw(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                          weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    # accelerate steps the schedule once per process and optimizer step: its step counts are in those units
    warmup = config.lr_warmup_steps * accelerator.num_processes
    total = max(config.max_train_steps or 1, 1) * accelerator.num_processes
    if config.lr_scheduler in {s.value for s in SchedulerType}:
        return optimizer, get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                                        num_training_steps=total)
    from transformers import get_scheduler as transformers_scheduler

    return optimizer, transformers_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                                             num_training_steps=total)


def step_generator(seed: int, micro_step: int, process_index: int, device) -> torch.Generator:
    """Noise, timesteps and VAE samples of a micro-batch depend only on (seed, micro-step, process): a resumed
    run draws exactly what the uninterrupted run drew."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + micro_step) * 1_009 + process_index)


def sample_generators(seed: int, micro_step: int, first_index: int, count: int, device) -> list[torch.Generator]:
    """One generator per item of a micro-batch, from (seed, micro-step, the item's index in the global batch).

    The global index of item ``i`` on process ``p`` with micro-batch ``b`` is ``p * b + i``: the same item of the
    same step draws the same VAE sample, noise and timestep whether 1 process holds a batch of ``P * b`` or ``P``
    processes hold ``b`` each (accelerate deals batch ``k`` of the sampler to process ``k mod P``), and after a
    resume (the micro-step is restored).
    """
    return [torch.Generator(device).manual_seed(((seed * 1_000_003 + micro_step) * 1_000_033 + first_index + i)
                                                * 1_009 + 7) for i in range(count)]
