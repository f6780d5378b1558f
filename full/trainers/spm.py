"""Train the step-aware preference model (SPM) of SPO on Pick-a-Pic-schema preference pairs.

Paper 003, "Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference
Optimization", Sec. 4.2: "for each pair of images and their human-labeled preference, we randomly sample a timestep
t and add the same noise to both images ... feed the noisy intermediate pair and timestep to SPM and train the model
to correctly predict the preference", with PickScore's loss, starting from PickScore. "To alleviate the domain gap
between the noised image at the t-th timestep and images used to train the PickScore model, we estimate x0 from the
noisy sample directly, following DDIM."

What the SPM sees, per pair (winner w, loser l), with ``--x0_estimate model`` (the default, the authors' code):

    z_w, z_l  = VAE(w), VAE(l)                         latents, scaled by the VAE's scaling factor
    t ~ U{0..T-1},  eps ~ N(0, I)                      ONE t and ONE eps for both images
    z_t^y     = sqrt(abar_t) z_y + sqrt(1 - abar_t) eps
    x0_hat^y  = VAE^-1( DDIM_x0( z_t^y, eps_theta^cfg(z_t^y, t, c) ) )   frozen diffusion model, CFG 5
    loss      = PickScore CE of softmax([s(x0_hat^w, c, t), s(x0_hat^l, c, t)]) towards w

This is the same input SPO gives the SPM while sampling (each candidate's own DDIM x0 prediction, decoded), so
training and use match. ``--x0_estimate noisy`` feeds the noisy sample itself (decoded ``z_t``, or the noisy pixels
with ``--pixel_space``, which needs no diffusion model at all): cheaper, and what a literal reading of "feed the noisy
intermediate pair" would do, but a domain gap to PickScore that the paper avoids.

Paper hyperparameters (Sec. 5.1): learning rate 3e-6 (SD1.5) / 1e-6 (SDXL), the whole CLIP model trained, Pick-a-Pic
v1; the authors' evaluation timesteps are 0, 251, 501, 701, 951 (our ``--validation_timesteps``).

    python -m full.train_spm --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --dataset_name yuvalkirstain/pickapic_v1 --output_dir runs/spm_sd15 --learning_rate 3e-6 \\
        --processor_name_or_path laion/CLIP-ViT-H-14-laion2B-s32B-b79K

The run loop is `full/run/loop.py` (checkpoints, ``--resume_from_checkpoint``, ``--report_to``, NaN stop), with
the whole scorer as what is trained. Writes the SPM to ``--output_dir`` (load it with ``full.online.spm.load_spm``)
and ``metrics.json`` (train metrics, and the validation loss / accuracy per timestep before and after training).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from full import cli
from full.data.images import PairDataset, collate_skip_none
from full.data.samplers import EpochShuffleSampler
from full.data.config import DataConfig
from full.data.sources import load_pair_rows
from full.online.preference import decode_latents, pair_preference_loss, predicted_x0
from full.online.spm import PICKSCORE_MODEL, SPM_CONFIG_NAME, StepAwarePreferenceModel
from full.run.loop import TrainingRun, run_and_reset, start_accelerator
from minipref import LossOutput

logger = logging.getLogger(__name__)
AUTHORS_EVAL_TIMESTEPS = "0,251,501,701,951"


def parse_args(argv=None) -> argparse.Namespace:
    argv = cli.cli_argv(argv)
    p = cli.Parser(prog="full.train_spm", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument_group("preference model").add_argument
    a("--spm_model_name_or_path", default=PICKSCORE_MODEL, help="CLIP checkpoint to start from")
    a("--processor_name_or_path", default=None, help="CLIP processor (default: the model's; "
      "laion/CLIP-ViT-H-14-laion2B-s32B-b79K for PickScore)")
    a("--no_time_conditioning", action="store_true", help="plain scorer: the 'SPM w/o step' ablation")
    a("--pretrained_model_name_or_path", default=None, help="diffusers SD1.5/SDXL pipeline (VAE, UNet, text "
      "encoders, scheduler); not needed with --pixel_space")
    a("--x0_estimate", choices=("model", "noisy"), default="model",
      help="model: DDIM x0 prediction of the frozen diffusion model (paper); noisy: the noisy sample")
    a("--pixel_space", action="store_true", help="noise the pixels instead of VAE latents (requires --x0_estimate "
      "noisy)")
    a("--guidance_scale", type=float, default=5.0, help="CFG of the x0 prediction (authors: 5)")
    a("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    a = p.add_argument_group("data").add_argument
    a("--dataset_name", required=True, help="parquet file/dir or hub dataset, Pick-a-Pic schema")
    a("--split", "--dataset_split_name", dest="split", default="train",
      help="the split to train on (--dataset_split_name, as the other trainers and the data errors call it)")
    a("--validation_split", default=None, help="split for validation (default: the first --num_validation_pairs "
      "training pairs)")
    a("--num_validation_pairs", type=int, default=64)
    a("--validation_timesteps", default=AUTHORS_EVAL_TIMESTEPS)
    a("--max_train_samples", type=int, default=None, help="rows read from the source")
    a("--keep_ties", action="store_true", help="train on ties with a 0.5 / 0.5 target")
    a("--resolution", type=int, default=None, help="image side for the diffusion model (default: the UNet's native "
      "size; with --pixel_space the CLIP crop size)")
    a("--dataloader_num_workers", type=int, default=0)
    cli.add_column_arguments(p.add_argument_group("columns of --dataset_name (full/data/columns.py)"))
    cli.add_training_arguments(p)  # the run loop's flags, with the paper's SPM settings as defaults
    p.set_defaults(method="spm", learning_rate=3e-6, lr_warmup_steps=0, adam_weight_decay=0.0, max_train_steps=1000,
                   mixed_precision="no", validation_prompts=None)
    args = p.parse_args(argv)
    if args.pixel_space and args.x0_estimate == "model":
        p.error("--pixel_space has no diffusion model to predict x0 with: add --x0_estimate noisy")
    if not args.pixel_space and not args.pretrained_model_name_or_path:
        p.error("--pretrained_model_name_or_path is required (latent space), or pass --pixel_space")
    cli.check_training_arguments(p, args, argv)
    cli.check_positive(p, args, ("num_validation_pairs", "max_train_samples"))
    cli.check_resolution(p, args)
    if args.guidance_scale < 0:
        p.error(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    try:
        args.validation_timesteps = [int(t) for t in args.validation_timesteps.split(",") if t.strip()]
    except ValueError:
        p.error(f"--validation_timesteps must be comma-separated integers, got {args.validation_timesteps!r}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# From a clean pair to what the SPM sees
# ----------------------------------------------------------------------------------------------------------------


class NoisyPairImages:
    """Noise both images of each pair with the same ``t`` and ``eps``, then estimate x0 (module docstring)."""

    def __init__(self, args, device, weight_dtype):
        from diffusers import DDPMScheduler

        from full.models.families import get_family
        from full.models.pipeline import detect_family, load_components, place_components

        self.args, self.device, self.weight_dtype, self.parts = args, device, weight_dtype, None
        if args.pixel_space:
            # Stable Diffusion's betas unless a pipeline's scheduler is given.
            self.scheduler = (DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
                              if args.pretrained_model_name_or_path else
                              DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
        else:
            # SPO's noising and step scores are DDPM's: a flow model is refused in one line before it loads
            get_family(detect_family(args.pretrained_model_name_or_path)).refuse("spo")
            self.parts = load_components(args.pretrained_model_name_or_path,
                                         with_text_encoders=args.x0_estimate == "model")
            place_components(self.parts, device, weight_dtype, fixed_vae=False)
            self.scheduler = self.parts.noise_scheduler
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    def native_resolution(self) -> int | None:
        if self.parts is None:
            return None
        return self.parts.unet.config.sample_size * 2 ** (len(self.parts.vae.config.block_out_channels) - 1)

    def _model_eps(self, z_t, t, batch, resolution: int) -> torch.Tensor:
        """The frozen UNet's output (epsilon or v) at ``z_t`` with classifier-free guidance, as the authors' code."""
        from full.models.families import get_family
        from full.models.pipeline import PromptEmbeds, encode_prompts, unet_conditioning

        parts = self.parts
        family = get_family(parts.family)
        prompt = encode_prompts(parts, batch["captions"] * 2, self.device)  # (2B, L, D): winners then losers
        time_ids = None
        if family.uses_time_ids:
            sizes, crops = batch["original_sizes"], batch["crop_top_lefts"]  # (B, 2, 2): pair axis second
            time_ids = family.time_ids(torch.cat([sizes[:, 0], sizes[:, 1]]), torch.cat([crops[:, 0], crops[:, 1]]),
                                       resolution).to(self.device)
        z_in, t_in = z_t, t
        guided = self.args.guidance_scale > 1
        if guided:
            # The unconditional branch: the empty prompt's embedding for SD1.5, zeros for SDXL (its pipelines'
            # force_zeros_for_empty_prompt default). One forward over [uncond; cond].
            if family.zeros_for_empty_prompt:
                empty = PromptEmbeds(torch.zeros_like(prompt.hidden), torch.zeros_like(prompt.pooled))
            else:
                empty = PromptEmbeds(encode_prompts(parts, [""], self.device).hidden.expand_as(prompt.hidden))
            prompt = PromptEmbeds(torch.cat([empty.hidden, prompt.hidden]),
                                  None if prompt.pooled is None else torch.cat([empty.pooled, prompt.pooled]))
            time_ids = None if time_ids is None else torch.cat([time_ids, time_ids])
            z_in, t_in = torch.cat([z_t, z_t]), torch.cat([t, t])
        conditioning = unet_conditioning(parts.family, prompt, time_ids, self.weight_dtype)
        out = parts.unet(z_in.to(self.weight_dtype), t_in, **conditioning).sample.float()
        if guided:
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + self.args.guidance_scale * (cond_out - uncond_out)
        return out

    @torch.no_grad()
    def __call__(self, batch: dict, timesteps: torch.Tensor, generator: torch.Generator | None = None):
        """``batch["pixel_values"]`` (B, 2, 3, R, R), winner first -> images (2B, 3, R', R') in [-1, 1], winners
        first, and the timesteps (2B,) they were noised at."""
        from full.models.pipeline import encode_images

        pixels = batch["pixel_values"].to(self.device)
        b = pixels.shape[0]
        pixels = torch.cat([pixels[:, 0], pixels[:, 1]])  # (2B, 3, R, R)
        clean = pixels if self.parts is None else encode_images(self.parts, pixels, generator).float()
        noise = torch.randn(clean[:b].shape, generator=generator, device=self.device)
        noise = torch.cat([noise, noise])  # the SAME eps for winner and loser
        t = torch.cat([timesteps, timesteps])
        noisy = self.scheduler.add_noise(clean, noise, t)
        estimate = noisy if self.args.x0_estimate == "noisy" else predicted_x0(
            noisy, self._model_eps(noisy, t, batch, pixels.shape[-1]), t, self.scheduler)
        images = estimate if self.parts is None else decode_latents(self.parts.vae, estimate.to(self.parts.vae_dtype))
        return images.float(), t


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _pair_loss(spm, unwrapped, images, t, batch, tie_of):
    b = len(batch["captions"])
    tokens = unwrapped.tokenize(batch["captions"] * 2)
    scores = spm(unwrapped.preprocess(images), t, tokens["input_ids"], tokens["attention_mask"])  # (2B,)
    label_w = torch.tensor([0.5 if tie_of[r] else 1.0 for r in batch["row_ids"]], device=scores.device)
    return pair_preference_loss(scores[:b], scores[b:], label_w)


@torch.no_grad()
def evaluate(spm, unwrapped, noiser, batches, timesteps, seed, tie_of) -> dict:
    """Loss and accuracy per fixed timestep, with a fixed generator so before/after see identical inputs."""
    was_training = spm.training
    spm.eval()
    result = {}
    for t_value in timesteps:
        generator = torch.Generator(noiser.device).manual_seed(seed)
        losses, correct, count = [], 0.0, 0
        for batch in batches:
            t = torch.full((len(batch["captions"]),), t_value, device=noiser.device, dtype=torch.long)
            images, t2 = noiser(batch, t, generator)
            out = _pair_loss(spm, unwrapped, images, t2, batch, tie_of)
            losses.append(out.metrics["loss"] * len(batch["captions"]))
            if not math.isnan(out.metrics["accuracy"]):
                decided = sum(not tie_of[r] for r in batch["row_ids"])
                correct, count = correct + out.metrics["accuracy"] * decided, count + decided
        pairs = sum(len(b["captions"]) for b in batches)
        result[str(t_value)] = {"loss": sum(losses) / pairs, "accuracy": correct / count if count else float("nan")}
    result["mean_loss"] = sum(v["loss"] for v in result.values()) / len(timesteps)
    spm.train(was_training)
    return result


class SpmWeights:
    """What this run trains and saves: the whole scorer (CLIP + time modulation) in `save_pretrained` format;
    checkpoints hold its full state (accelerate's default)."""

    weight_name = SPM_CONFIG_NAME

    def __init__(self, spm, args):
        self.module = spm
        self.card = {"base": args.spm_model_name_or_path, "what": "step-aware preference model",
                     "usage": ["from full.online.spm import load_spm", "", f'spm = load_spm("{args.output_dir}")']}

    def parameters(self):
        return self.module.parameters()

    def register(self, accelerator) -> None:
        pass

    def after_load(self, prepared) -> None:
        pass

    def after_step(self, model) -> None:
        pass

    def gathered_state(self, accelerator, prepared) -> None:
        return None

    def save(self, model, output_dir, state=None) -> str:
        return model.save_pretrained(output_dir)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_and_reset(lambda: train(args))


def train(args) -> dict:
    from accelerate.utils import set_seed

    accelerator, weight_dtype = start_accelerator(cli.run_config(args), None)  # weight_dtype: the frozen diffusion model's
    set_seed(args.seed)
    noiser = NoisyPairImages(args, accelerator.device, weight_dtype)
    spm = StepAwarePreferenceModel.from_pretrained(args.spm_model_name_or_path, args.processor_name_or_path,
                                                   time_conditioned=not args.no_time_conditioning,
                                                   num_train_timesteps=noiser.num_train_timesteps)
    crop = spm.processor.image_processor.crop_size
    resolution = args.resolution or noiser.native_resolution() or crop["height"]

    columns = cli.config(DataConfig, args).columns("pairs")
    rows = load_pair_rows(args.dataset_name, args.split, keep_ties=args.keep_ties, max_rows=args.max_train_samples,
                          columns=columns)
    val_rows = (load_pair_rows(args.dataset_name, args.validation_split, keep_ties=args.keep_ties, columns=columns)
                if args.validation_split else rows)[: args.num_validation_pairs]
    # row ids restart per split, so train and validation keep separate lookups
    tie_of, val_tie_of = (dict(zip(rs.row_ids.tolist(), rs.column("tie").tolist())) for rs in (rows, val_rows))
    dataset = PairDataset(rows, resolution, center_crop=True, random_flip=False, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_skip_none,
                                         sampler=EpochShuffleSampler(len(dataset), args.seed),
                                         num_workers=args.dataloader_num_workers)
    val_loader = torch.utils.data.DataLoader(PairDataset(val_rows, resolution, seed=args.seed),
                                             batch_size=args.train_batch_size, collate_fn=collate_skip_none)
    val_batches = [b for b in val_loader if b is not None]

    run = TrainingRun(cli.run_config(args), accelerator, None, None, weight_dtype, loader=loader, desc="SPM",
                      trained=SpmWeights(spm, args))
    unwrapped = run.model
    metrics = {"args": {k: v for k, v in vars(args).items()}, "resolution": resolution, "train": run.history}
    metrics["validation_before"] = evaluate(run.unet, unwrapped, noiser, val_batches, args.validation_timesteps,
                                            args.seed, val_tie_of)
    logger.info("validation before: %s", metrics["validation_before"])

    def step_loss(batch: dict, generator) -> LossOutput:
        # one t and one eps per pair, from the micro-batch's own stream (the same after a resume)
        t = torch.randint(0, noiser.num_train_timesteps, (len(batch["captions"]),), generator=generator,
                          device=accelerator.device)
        images, noised_t = noiser(batch, t, generator)
        return _pair_loss(run.unet, unwrapped, images, noised_t, batch, tie_of)

    run.unet.train()
    run.train_until(args.max_train_steps, step_loss)
    metrics["validation_after"] = evaluate(run.unet, unwrapped, noiser, val_batches, args.validation_timesteps,
                                           args.seed, val_tie_of)
    logger.info("validation after: %s", metrics["validation_after"])
    run.finish()
    if accelerator.is_main_process:
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    return metrics
