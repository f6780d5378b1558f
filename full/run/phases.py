"""Collect-then-train: the run loop of a trainer that makes its own training data as it goes (SPO).

Each *phase* takes the next slice of prompts, lets the current policy make micro-batches from them (no gradients),
then trains one pass over those micro-batches. The run's `TrainingProgress` keeps the epoch and the phase within
it, so a resumed run starts at the next phase with the same random stream (`step_generator` of the phase index):

    for epoch until --num_epochs (or --max_train_steps optimizer steps):
        one permutation of the prompts (the same on every process); per phase P x per_process prompts
        micro_batches = collect(this process's prompt indices, the phase's generator)
        one micro-step per micro-batch (accumulation, NaN stop and validation as in `TrainingRun`)
        a checkpoint when a --checkpointing_steps boundary was crossed in the phase (and at the end)

The number of micro-batches a phase yields is only known after it collected (SPO keeps the pairs whose preference
gap passes a threshold), so checkpoints fall on phase boundaries, not on exact multiples of the step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

import minipref
from full.run.accelerator import step_generator
from full.run.loop import TrainingRun


def collect_then_train(run: TrainingRun, sampler, per_process: int, num_epochs: int,
                       collect: Callable[[list[int], torch.Generator], Sequence],
                       micro_batch_loss: Callable[[object], minipref.LossOutput]) -> None:
    """Phases until ``num_epochs`` passes over ``sampler``'s items or ``max_train_steps`` optimizer steps.
    ``sampler``: the epoch's order (`set_epoch`, iteration), the same on every process; ``collect`` returns the
    phase's micro-batches (maybe none), ``micro_batch_loss`` the loss of one of them."""
    config, progress, accelerator = run.config, run.progress, run.accelerator
    per_step = per_process * accelerator.num_processes
    phases_per_epoch = math.ceil(len(sampler) / per_step)
    last_saved = progress.global_step

    def done() -> bool:
        return (config.max_train_steps is not None and progress.global_step >= config.max_train_steps) \
            or progress.epoch >= num_epochs

    while not done():
        sampler.set_epoch(progress.epoch)
        order = list(sampler)
        while progress.batch_in_epoch < phases_per_epoch and not done():
            start = progress.batch_in_epoch * per_step + accelerator.process_index * per_process
            indices = order[start:start + per_process]  # empty when this process ran out in the last phase
            progress.batch_in_epoch += 1
            phase = progress.epoch * phases_per_epoch + progress.batch_in_epoch  # the same after a resume
            generator = step_generator(config.seed, phase, accelerator.process_index, accelerator.device)
            for micro_batch in collect(indices, generator):
                progress.micro_step += 1
                if run.micro_step(lambda: micro_batch_loss(micro_batch)) is None:
                    continue
                run.validate_if_due()
                if done():
                    break
            if progress.global_step // config.checkpointing_steps > last_saved // config.checkpointing_steps:
                run.save_checkpoint()  # a resumed run restarts with the next phase
                last_saved = progress.global_step
        if progress.batch_in_epoch >= phases_per_epoch:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    if progress.global_step > last_saved:
        run.save_checkpoint()
