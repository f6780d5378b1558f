"""`TrainingRun`: the one training loop of every trainer (offline methods, SPIN, SPO, and the SPM of SPO).

A trainer builds its model parts and its data, then hands the run a function that computes the loss of one
micro-batch; the run owns everything else, in this order per micro-batch::

    with accelerator.accumulate(unet):
        out = compute_loss()              # the trainer's part: forwards and one minipref objective
        stop if out.loss is NaN/Inf       # on any process, before the weights change
        backward, clip, optimizer step    # accelerate skips the step until the last micro-batch of accumulation
    on the optimizer step: metrics averaged over micro-batches and processes -> trackers and the progress bar,
    a checkpoint every --checkpointing_steps, a validation grid every --validation_steps

`epoch_batches` is the resumable data loop of the trainers that read a DataLoader; `train_until` is that loop and
the step together. At the end `finish` saves what was trained (the LoRA, or the SPM), runs a last validation from
the saved LoRA and writes the model card and `args.json`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import minipref
from full.models.pipeline import WEIGHT_DTYPES, save_pipeline
from full.run import checkpoints, outputs
from full.run.config import RunConfig
from full.run.accelerator import make_accelerator, make_optimizer, sample_generators, step_generator
from full.run.output_dir import claim_output_dir
from full.run.validation import log_validation
from full.run.weights import LoraWeights, zero3_or_fsdp

logger = logging.getLogger(__name__)
POSTFIX_KEYS = ("loss", "implicit_acc", "accuracy", "clip_frac", "iteration")


def run_and_reset(run: Callable[[], dict]) -> dict:
    """``run()`` (a trainer), then reset accelerate's global state so a trainer's ``main`` can run again in the
    same process (tests, notebooks)."""
    try:
        return run()
    finally:
        from accelerate.state import AcceleratorState, GradientState

        if TrainingRun.current is not None:  # a run stopped by an error: end its progress line before the message
            TrainingRun.current.bar.close()
            TrainingRun.current = None

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def start_accelerator(config: RunConfig, family: str | None):
    """The Accelerator and the dtype of the frozen weights under its mixed precision; `--output_dir` claimed for
    this run and `--resume_from_checkpoint` checked against it (full/run/output_dir.py), before any model loads."""
    accelerator = make_accelerator(config)
    claim_output_dir(config, family, accelerator)
    if accelerator.is_main_process:
        outputs.check_hub_push(config)
    return accelerator, WEIGHT_DTYPES[accelerator.mixed_precision]


def steps_for_epochs(epochs: int, batches_per_epoch: int, num_processes: int, accumulation: int) -> int:
    """`--num_train_epochs` as optimizer steps: each process sees 1/P of the batches, accumulation groups them."""
    per_process = -(-batches_per_epoch // num_processes)
    return max(1, -(-per_process // accumulation)) * epochs


class TrainingRun:
    """One run: the prepared model, optimizer, schedule (and loader), the progress counters, trackers and bar.

    `trained` says what is trained and saved (full/run/weights.py): by default the LoRA on `parts.unet`
    (`LoraWeights`); `FullWeights` for --train_mode full; the SPM trainer passes its whole model. `parts` (the pipeline) is what validation samples with; None for a run without one."""

    current: "TrainingRun | None" = None  # the run in progress in this process (closed by `run_and_reset`)

    def __init__(self, config: RunConfig, accelerator, parts, family: str | None, weight_dtype, *, loader=None, desc: str = "",
                 trained=None):
        from full.progress import progress_bar

        self.config, self.accelerator, self.parts, self.family = config, accelerator, parts, family
        self.weight_dtype, self.output_dir = weight_dtype, Path(config.output_dir)
        self.trained = trained or LoraWeights(parts.unet, family)
        if getattr(self.trained, "ema", None) is not None and zero3_or_fsdp(accelerator):
            raise ValueError("--use_ema with ZeRO-3 or FSDP: the EMA would average sharded weights; use DDP or "
                             "ZeRO-2, or drop --use_ema")
        self.params = list(self.trained.parameters())
        optimizer, lr_scheduler = make_optimizer(config, self.params, accelerator)
        if loader is None or getattr(loader, "shards_itself", False):  # a stream is already this process's share
            self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(self.trained.module, optimizer,
                                                                               lr_scheduler)
            self.loader = loader
        else:
            self.unet, self.optimizer, self.loader, self.lr_scheduler = accelerator.prepare(
                self.trained.module, optimizer, loader, lr_scheduler)
        self.model = accelerator.unwrap_model(self.unet)  # the same weights: the reference, sampling, saving

        # What a checkpoint holds, then the trackers, then (with --resume_from_checkpoint) the state.
        self.progress = checkpoints.TrainingProgress()
        accelerator.register_for_checkpointing(self.progress)  # first (custom_checkpoint_0), before load_state
        if getattr(self.loader, "shards_itself", False):  # a stream's place in its pass (custom_checkpoint_1)
            accelerator.register_for_checkpointing(self.loader)
        self.trained.register(accelerator)
        if accelerator.is_main_process and accelerator.log_with:
            flags = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.flags.items()}
            accelerator.init_trackers(config.tracker_project_name, config=flags)
        checkpoint = checkpoints.resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
        if checkpoint is not None:
            try:
                accelerator.load_state(str(checkpoint), **checkpoints.engine_state_kwargs(accelerator, saving=False))
            except (RuntimeError, OSError, EOFError, KeyError, IndexError, pickle.UnpicklingError) as error:
                raise ValueError(f"--resume_from_checkpoint {checkpoint} could not be loaded: "
                                 f"{outputs.first_line(error)}") from error
            self.trained.after_load(self.unet)
            logger.info("resumed from %s at step %d", checkpoint, self.progress.global_step)
        elif config.resume_from_checkpoint:
            logger.info("no checkpoint in %s yet: starting from step 0", self.output_dir)
        self.undecodable = 0  # items of this process dropped because an image would not decode (this session)
        self.window: list[dict] = []  # metrics of the micro-batches of the current optimizer step
        self.logs: dict[str, float] = {}
        self.history: list[dict] = []
        self.bar = progress_bar(total=config.max_train_steps or None, initial=self.progress.global_step,
                                desc=desc or f"{config.method} ({family})", main_process=accelerator.is_main_process)
        TrainingRun.current = self

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    def generator(self) -> torch.Generator:
        """The micro-batch's random stream (noise, timesteps, VAE samples): the same after a resume."""
        return step_generator(self.config.seed, self.progress.micro_step, self.accelerator.process_index,
                              self.accelerator.device)

    def sample_generators(self, count: int) -> list[torch.Generator]:
        """One generator per item of this process's micro-batch, keyed by the item's index in the global batch
        (`full.run.accelerator.sample_generators`): what makes P processes equal one process of P times the batch."""
        first = self.accelerator.process_index * self.config.train_batch_size
        return sample_generators(self.config.seed, self.progress.micro_step, first, count, self.accelerator.device)

    # ---- data

    def epoch_batches(self) -> Iterator[dict]:
        """The rest of the current epoch, resumably: skips the batches a resumed run already saw, counts each
        micro-batch in ``progress``, and skips a batch with no decodable image on *any* process (all together: a
        lone skip would deadlock the gradient all-reduce). When the epoch is exhausted, ``progress`` moves to the
        next one; a caller that breaks out early stays in this epoch. A stream (`full.data.streaming`) skips ahead
        itself, and its epoch ends for every process when one process's share runs out."""
        accelerator, progress, loader = self.accelerator, self.progress, self.loader
        loader.set_epoch(progress.epoch)
        resumed, usable = progress.batch_in_epoch, 0
        if not resumed:
            batches = iter(loader)
        else:
            batches = iter(loader.skip_batches(resumed) if getattr(loader, "shards_itself", False)
                           else accelerator.skip_first_batches(loader, resumed))
        while True:
            batch = next(batches, StopIteration)
            # one gather per micro-batch: 0 a batch, 1 no decodable image in it (None), 2 this process has no more
            state = 2 if batch is StopIteration else int(batch is None)
            states = accelerator.gather(torch.tensor([state], device=accelerator.device))
            if bool((states == 2).any()):
                break
            progress.batch_in_epoch += 1
            progress.micro_step += 1
            # undecodable images: an item lost from a batch, or a whole batch (None); totalled in `finish`
            self.undecodable += self.config.train_batch_size if batch is None else batch.get("n_undecodable", 0)
            if bool((states == 1).any()):
                logger.warning("micro-batch %d: no decodable image on some process; skipped", progress.micro_step)
                continue
            usable += 1
            yield batch
        if not usable and not resumed:  # else the caller would loop over empty epochs forever
            raise ValueError(f"a whole pass over --dataset_name {self.config.flag('dataset_name')} gave no usable batch: "
                             "every image failed to decode")
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0

    # ---- the step

    def micro_step(self, compute_loss: Callable[[], minipref.LossOutput], extra_logs: dict | None = None
                   ) -> dict | None:
        """Loss, NaN/Inf stop, backward and (on the last micro-batch of accumulation) the optimizer step. Returns
        the step's metrics when an optimizer step happened, else None."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.unet):
            out = compute_loss()
            self.check_finite(out)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and self.config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.window.append(out.metrics)
        if not accelerator.sync_gradients:
            return None
        self.trained.after_step(self.model)  # e.g. the EMA of full fine-tuning
        self.progress.global_step += 1
        self.logs = self.mean_metrics() | {"lr": self.lr_scheduler.get_last_lr()[0]} | (extra_logs or {})
        self.window = []
        self.history.append(self.logs)
        accelerator.log({f"train/{k}": v for k, v in self.logs.items()}, step=self.global_step)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{self.logs[k]:.4g}" for k in POSTFIX_KEYS if k in self.logs})
        return self.logs

    def check_finite(self, out: minipref.LossOutput) -> None:
        """Stop before a NaN/Inf reaches the weights; the last good checkpoint stays as it is."""
        finite = torch.isfinite(out.loss.detach()).reshape(1)
        if bool(self.accelerator.gather(finite).all()):
            return
        found = checkpoints.list_checkpoints(self.output_dir)
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        raise SystemExit(f"non-finite loss ({out.loss.item()}) at step {self.global_step + 1} of --method "
                         f"{self.config.method}; stopping without updating the weights: {last}. Lower "
                         "--learning_rate or --beta, or try --mixed_precision bf16 / a fp16-safe VAE, then "
                         "--resume_from_checkpoint latest.")

    def mean_metrics(self) -> dict[str, float]:
        """Metrics averaged over the micro-batches of a step and over processes."""
        keys = list(self.window[0])
        local = torch.tensor([[m.get(k, float("nan")) for k in keys] for m in self.window],
                             dtype=torch.float64).nanmean(0)
        values = self.accelerator.reduce(local.to(self.accelerator.device), reduction="mean")
        return dict(zip(keys, values.tolist()))

    # ---- after an optimizer step

    def save_checkpoint(self) -> Path:
        return checkpoints.save_checkpoint(self.accelerator, self.output_dir, self.global_step,
                                           self.config.checkpoints_total_limit)

    def validate_if_due(self) -> None:
        config = self.config
        if self.parts is not None and config.validation_prompts and self.global_step % config.validation_steps == 0:
            log_validation(self.accelerator, self.parts, config, self.global_step, self.weight_dtype,
                           unet=self.model)

    def train_until(self, end: int, step_loss: Callable[[dict, torch.Generator], minipref.LossOutput], *,
                    extra_logs: dict | None = None, before_checkpoint: Callable[[int], None] | None = None) -> None:
        """Epochs of the loader until ``global_step == end``: one loss per micro-batch, a checkpoint every
        ``--checkpointing_steps`` and at ``end`` (``before_checkpoint(step)`` runs first), validation when due."""
        while self.global_step < end:
            for batch in self.epoch_batches():
                generator = self.generator()
                if self.micro_step(lambda: step_loss(batch, generator), extra_logs) is None:
                    continue
                if self.global_step % self.config.checkpointing_steps == 0 or self.global_step == end:
                    if before_checkpoint is not None:
                        before_checkpoint(self.global_step)
                    self.save_checkpoint()
                self.validate_if_due()
                if self.global_step >= end:
                    break

    # ---- the end

    def finish(self, **summary) -> dict:
        """Save the final LoRA in diffusers format, a last validation grid from it, args.json, the model card (and
        the Hub push); close the trackers. Returns the run's summary."""
        self.bar.close()
        accelerator, config = self.accelerator, self.config
        undecodable = self.report_undecodable()
        accelerator.wait_for_everyone()
        lora_path = self.output_dir / self.trained.weight_name
        state = self.trained.gathered_state(accelerator, self.unet)  # every process: a collective under sharding
        if accelerator.is_main_process:
            self.trained.save(self.model, config.output_dir, state)
            logger.info("saved %s", lora_path)
            if config.model.save_pipeline:  # --train_mode full: the base pipeline around the saved unet/
                save_pipeline(self.family, config.model, config.output_dir)
            if config.validation_prompts and self.parts is not None:
                log_validation(accelerator, self.parts, config, self.global_step, self.weight_dtype,
                               **self.trained.validation_source(config.output_dir))
            layout = {"num_processes": accelerator.num_processes, "train_batch_size": config.train_batch_size,
                      "gradient_accumulation_steps": config.gradient_accumulation_steps}
            outputs.write_run_outputs(config, self.family, self.global_step, self.history, layout=layout,
                                      **getattr(self.trained, "card", {}))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return {"family": self.family, "global_step": self.global_step, "lora_path": str(lora_path),
                "metrics": self.logs, "history": self.history, "undecodable": undecodable, **summary,
                "unet": self.model}

    def report_undecodable(self) -> int:
        """The items skipped over the run (all processes) because an image would not decode, said once at the end
        (each was warned about with its row id when it was read). A batch with nothing decodable counts in full."""
        total = int(self.accelerator.reduce(torch.tensor([self.undecodable], device=self.accelerator.device),
                                            reduction="sum").item())
        if total:
            logger.warning("%d training item(s) were skipped because an image could not be decoded (row ids in "
                           "the warnings above); fix or drop those rows in --dataset_name", total)
        return total
