"""SPIN-Diffusion: LoRA self-play, the model against its own frozen earlier iterate, on SD1.5 / SDXL / SD3 / FLUX.1.

    accelerate launch -m full.spin --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name yuvalkirstain/pickapic_v2 --max_train_samples 4000 --num_iterations 2 \
        --max_train_steps 10000 --output_dir runs/spin-sd15

Paper 000 ("Aligning T2I Diffusion Models using RL from Human Utility"), Sec. 3.2 (iii), after Yuan et al.,
"Self-Play Fine-Tuning of Diffusion Models for Text-to-Image Generation". Iteration `k = 0 .. K-1`:

1. **Opponent** `theta_k`: a frozen snapshot of the LoRA at the end of iteration `k - 1`; for `k = 0` the base model.
2. **Generate**: for every training prompt the opponent samples the *loser* (the configurable diffusers pipeline
   scheduler, `--generation_steps`, `--generation_guidance_scale`, latents only). The latents are cached on disk,
   one safetensors shard per prompt batch, each written atomically: an interrupted iteration resumes from the
   shards it already has and regenerates nothing else.
3. **Train** `max_train_steps / K` steps of `minipref.spin_loss`: Diffusion-DPO with the winner = the *real* image
   of the prompt, the loser = the opponent's sample, and the reference = the opponent. Real and generated latents
   share `t` and `eps` (one forward over the `2B` batch, `full/trainers/denoise.py`). At the first step of an iteration
   the policy *is* the opponent, so the loss starts at log 2 and grows apart only as the policy learns to tell its
   opponent's samples from real data.
4. The trained LoRA is saved to `<output_dir>/iteration-k/` (loadable with `pipe.load_lora_weights`) and becomes
   the next opponent.

Design choices:

* **Opponent storage.** A second peft adapter, named "opponent", on the *same* UNet, holding the snapshot read back
  from `iteration-(k-1)/`: memory is one more LoRA, not a second UNet. Its forward switches the active adapter
  (`unet.set_adapter("opponent")`) under `torch.no_grad()` and back; its weights never receive gradients and never
  reach the optimizer. `k = 0` uses the existing reference path (adapters disabled = the base model).
  (`full/online/opponent.py`; the samples: `full/online/generation.py`.)
* **Real images.** Winners of Pick-a-Pic-schema rows (`jpg_0, jpg_1, label_0, caption`, ties dropped), or the
  desirable images of a binary-feedback dataset (`image, caption, label`). Each row gets its own opponent sample.
* **Schedule.** One optimizer and one learning-rate schedule over all iterations (warm-up once); checkpoints are
  the run loop's (`full/run/`: LoRA + optimizer + position, atomic); the iteration is
  `global_step // steps_per_iteration`,
  so `--resume_from_checkpoint latest` lands in the right iteration with the right opponent.

Paper 000 gives neither K nor the generation settings; the defaults here are K = 2 (the 10k steps of the paper's
recipe split in two) and the diffusers pipeline defaults (its scheduler, 50 steps, guidance 7.5).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

import minipref
from minipref.methods import StepErrors, get_method
from full import cli
from full.data.config import DataConfig
from full.data.images import FeedbackDataset, collate_skip_none
from full.data.rows import real_image_rows
from full.data.samplers import EpochShuffleSampler
from full.models import pipeline as models
from full.models.families import get_family
from full.models.config import ModelConfig
from full.models.lora import trainable_unet_parts
from full.online.generation import (GeneratedLatents, GenerationConfig, generate_iteration, generation_pipeline,
                                    generation_scheduler_class)
from full.online.opponent import opponent_for
from full.run.loop import TrainingRun, run_and_reset, start_accelerator, steps_for_epochs
from full.run.weights import reference_forward, weights_for
from full.trainers.denoise import StepInputs, denoise, inputs_from_images

logger = logging.getLogger(__name__)
SELF_PLAY = tuple(name for name, method in minipref.METHODS.items() if method.data == "self_play")


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> cli.Parser:
    p = cli.Parser(prog="full.spin", description=__doc__.split("\n\n")[0])
    a = cli.add_model_arguments(p)
    a("--preset", default=None, help="full/presets name (e.g. sd15-spin) or .json: defaults for the flags")
    a("--method", default=SELF_PLAY[0], choices=SELF_PLAY, help="this entry point trains the self-play methods")
    cli.add_training_arguments(p)
    a = p.add_argument_group("self-play").add_argument
    a("--beta", type=float, default=5000.0, help="spin_loss beta (minipref convention, = Diffusion-DPO's 5000)")
    a("--num_iterations", type=int, default=2, help="K: opponents theta_0 (base) .. theta_{K-1}")
    a("--generation_scheduler", default=None,
      help="a diffusers scheduler class for the opponent's samples (e.g. DDIMScheduler); default: the pipeline's")
    a("--generation_steps", type=int, default=50)
    a("--generation_guidance_scale", type=float, default=7.5)
    a("--generation_batch_size", type=int, default=8, help="prompts per cached shard")
    cli.add_image_data_arguments(p)
    p.set_defaults(dataset_name=None)
    return p


def parse_args(argv=None):
    argv = cli.cli_argv(argv)
    parser = build_parser()
    cli.apply_preset(parser, argv, None)
    args = parser.parse_args(argv)
    if args.dataset_name is None:
        parser.error("--dataset_name is required: pairs (winners are the real images) or binary feedback")
    cli.check_training_arguments(parser, args, argv)
    cli.check_image_data_arguments(parser, args)
    cli.check_positive(parser, args, ("beta", "num_iterations", "generation_steps", "generation_batch_size",
                                      "generation_guidance_scale"))
    if args.num_train_epochs is None and args.max_train_steps % args.num_iterations:
        parser.error(f"--max_train_steps {args.max_train_steps} must split evenly into --num_iterations "
                     f"{args.num_iterations} (each iteration trains max_train_steps / num_iterations steps)")
    args.steps_per_iteration = args.max_train_steps // args.num_iterations  # with --num_train_epochs: set in run
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data: a real image and the opponent's sample of the same row
# ---------------------------------------------------------------------------------------------------------------


class SpinDataset(torch.utils.data.Dataset):
    """A real image (decoded as `FeedbackDataset` does) and the opponent's latents for the same row."""

    def __init__(self, real: FeedbackDataset):
        self.real, self.generated = real, None

    def set_epoch(self, epoch: int) -> None:
        self.real.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.real)

    def __getitem__(self, index: int) -> dict | None:
        item = self.real[index]
        if item is not None:
            item["generated"] = self.generated.latents(item["row_id"])  # (4, h, w)
        return item


def collate_spin(items) -> dict | None:
    batch = collate_skip_none(items)
    if batch is not None:
        batch["generated"] = torch.stack([item["generated"] for item in items if item is not None])  # (B, 4, h, w)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# One step: real and generated latents share t and eps; the opponent is the reference
# ---------------------------------------------------------------------------------------------------------------


def spin_inputs(batch: dict, parts: models.Components, model: ModelConfig, device, generator) -> StepInputs:
    """`StepInputs` with n = 2: the B real images (winners) first, then the B opponent samples (losers)."""
    family = get_family(parts.family)
    real = inputs_from_images(batch, parts, model, device, generator)  # n = 1: latents (B, C, h, w)
    resolution = batch["pixel_values"].shape[-1]
    generated = batch["generated"].to(device=device, dtype=real.latents.dtype)  # (B, C, h, w); FLUX: packed
    generated = family.latents_from_pipeline(generated, tuple(real.latents.shape[-2:]))  # (B, C, h, w)
    b = generated.shape[0]
    pooled = None if real.prompt.pooled is None else real.prompt.pooled.repeat(2, 1)
    prompt = models.PromptEmbeds(real.prompt.hidden.repeat(2, 1, 1), pooled)  # (2B, L, D): a pair shares c
    time_ids = None
    size = torch.full((b, 2), resolution)  # SDXL: the samples were made at (R, R), uncropped: the pipeline's own
    generated_ids = family.time_ids(size, torch.zeros_like(size), resolution)  # add_time_ids; None for the others
    if generated_ids is not None:
        time_ids = torch.cat([real.time_ids, generated_ids.to(device)])  # (2B, 6)
    return StepInputs(torch.cat([real.latents, generated]), prompt, time_ids, 2)


def spin_step_loss(method: str, beta: float, pred: Tensor, opp_pred: Tensor, target: Tensor) -> minipref.LossOutput:
    """The row's loss (minipref/methods.py): the real images are the winners (first half), the opponent's samples
    the losers, and the opponent is the reference."""
    errors = StepErrors(minipref.per_sample_mse(pred, target), minipref.per_sample_mse(opp_pred, target), 2)
    return get_method(method).loss(errors, {}, beta, None)



# ---------------------------------------------------------------------------------------------------------------
# The run: K iterations of generate, then train max_train_steps / K steps
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_and_reset(lambda: run(args))


def run(args) -> dict:
    from accelerate.utils import set_seed

    family = models.detect_family(args.pretrained_model_name_or_path, args.revision)
    cli.check_model_family(args, family)
    fam = get_family(family)
    fam.check_model_options(cli.config(ModelConfig, args).family_options())
    if args.train_mode == "full":
        fam.refuse("spin_full")
    args.resolution = args.resolution or fam.default_resolution
    data, model, generation = (cli.config(DataConfig, args), cli.config(ModelConfig, args),
                               cli.config(GenerationConfig, args))
    generation_scheduler_class(generation)  # a bad flag or bad data fails before the models load
    rows = real_image_rows(data)
    accelerator, weight_dtype = start_accelerator(cli.run_config(args), family)
    device, output_dir = accelerator.device, Path(args.output_dir)
    set_seed(args.seed)
    parts = trainable_unet_parts(model, device, weight_dtype)  # full: + a frozen copy, theta_0 then each snapshot
    opponent = opponent_for(model.train_mode, family, parts)  # before the run wraps the UNet

    dataset = SpinDataset(FeedbackDataset(rows, args.resolution, center_crop=not args.random_crop,
                                          random_flip=args.random_flip, caption_dropout=args.caption_dropout,
                                          seed=args.seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_spin,
                                         sampler=EpochShuffleSampler(len(dataset), args.seed),
                                         num_workers=args.dataloader_num_workers)
    if args.num_train_epochs:  # epochs of the real images per iteration
        args.max_train_steps = args.num_iterations * steps_for_epochs(
            args.num_train_epochs, len(loader), accelerator.num_processes, args.gradient_accumulation_steps)
        args.steps_per_iteration = args.max_train_steps // args.num_iterations
    training = TrainingRun(cli.run_config(args), accelerator, parts, family, weight_dtype, loader=loader,
                           desc=f"spin ({family})", trained=weights_for(model.train_mode, parts, family,
                                                                        ema_decay=model.ema_decay))
    pipe = generation_pipeline(parts, training.model, generation)
    iterations = []
    while training.global_step < args.max_train_steps:
        iteration = training.global_step // args.steps_per_iteration
        if iteration > 0:
            snapshot = output_dir / f"iteration-{iteration - 1}"
            if not (snapshot / opponent.weight_file).is_file():
                raise ValueError(f"iteration {iteration} plays against {snapshot}, which does not exist; "
                                 "resume from a checkpoint of that run's output_dir")
            opponent.load(snapshot)
        generated = generate_iteration(pipe, rows, iteration, generation, accelerator, output_dir, weight_dtype,
                                       opponent, denoiser=fam.denoiser)
        dataset.generated = GeneratedLatents(generated["directory"])
        reference = reference_forward(lambda k=iteration: opponent.playing(k))  # the reference is theta_k
        end, first = (iteration + 1) * args.steps_per_iteration, len(training.history)

        def step_loss(batch: dict, generator) -> minipref.LossOutput:
            inputs = spin_inputs(batch, parts, model, device, generator)
            pred, opp_pred, target = denoise(training.unet, reference, parts.noise_scheduler, family, inputs,
                                             with_reference=True, generator=generator, weight_dtype=weight_dtype)
            return spin_step_loss(args.method, args.beta, pred, opp_pred, target)

        def save_next_opponent(step: int) -> None:  # the next opponent first, then the checkpoint that needs it
            if step == end:
                opponent.save_iteration(training, output_dir, iteration)

        training.train_until(end, step_loss, extra_logs={"iteration": iteration}, before_checkpoint=save_next_opponent)
        steps = training.history[first:]
        summary = {key: sum(s[key] for s in steps) / len(steps) for key in steps[0] if key != "iteration"} \
            if steps else {}
        accelerator.log({f"iteration/{k}": v for k, v in summary.items()}, step=training.global_step)
        logger.info("iteration %d done at step %d: %s", iteration, training.global_step,
                    ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        iterations.append({"iteration": iteration, **generated, "metrics": summary})
    return training.finish(history=training.history, iterations=iterations)
