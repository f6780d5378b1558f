"""SPO: step-by-step preference optimisation of SD1.5 / SDXL LoRA, pairs made online by a step-aware preference model.
(On SD3 / FLUX it is refused with one line: their Euler sampler takes no stochastic step to pair; docs/flow_matching.md.)

    accelerate launch -m full.spo --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --preset sd15-spo --spm_model_name_or_path runs/spm-sd15 --prompts_file prompts.json --output_dir runs/spo

Paper 003 ("Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference
Optimization"), Sec. 4, and docs/conventions.md §7. Training alternates two phases per batch of prompts, as the authors'
code does:

**Collect** (no gradients). Sample with the current policy: `x_T ~ N(0, I)`, 20 DDIM steps with eta = 1 (each step a
Gaussian, `minipref.ddim_step_gaussian`), classifier-free guidance 5. At every step with `t < 750` (Sec. 4.3):

1. draw `k` candidates `x_{t-1}` from the *shared* `x_t` (k = 4 for SD1.5, 2 for SDXL);
2. score each candidate with the step-aware preference model (SPM, `full/online/spm.py`) on *its own* DDIM x0
   prediction: the next step's guided UNet output at `t_prev`, `predicted_x0`, VAE decode, scored at `t_prev`
   (the authors' sampler; after the last step the candidates are clean and are scored at `t = 0`);
3. best and worst form the pair, kept only if `|softmax([s_best, s_worst])_0 - _1|` exceeds the threshold
   (0.3 SD1.5, 0.4 SDXL; `full.online.preference.best_worst_pair`);
4. continue from a *uniformly random* candidate (Sec. 4.3, Table 9: neither the winner nor the loser), reusing
   that candidate's UNet output of step 2 for its next step, so scoring costs no extra UNet forward.

MSPO (Sec. 4.5, SDXL): each candidate chain is rolled `--num_inner_steps` further steps (one sample each) before it is
scored, and, as in the authors' `multi_sample_pipeline_sdxl`, every step of the winner's and the loser's chain
becomes a training tuple (for the inner steps the two chains no longer share `x_t`, so tuples carry one `x_t` per
side); the chain then continues from a random candidate's end. `--num_inner_steps 0` is SPO.

**Train** on the kept tuples `(x_t^w, x_{t-1}^w, x_t^l, x_{t-1}^l, t, prompt)`: the policy's log-probability of
each step (with gradients), the reference's (adapters disabled, `torch.no_grad()`), then `minipref.spo_loss`
(beta 10, ratio clipped to `[0.9, 1.1]`). **CFG in the log-probabilities**: the authors' code scores a step under
the *guided* Gaussian (`train.cfg = True`: `eps_u + 5 (eps_c - eps_u)` for the policy *and* the reference), the
distribution the samples were actually drawn from; we do the same (`--no-train_cfg` scores the conditional
model alone).

The t < 750 rule is the paper's (Sec. 5.1: "only when t < 750"; docs/conventions.md §7). The authors' code starts
at step index 4 of 20, which with Stable Diffusion's `steps_offset = 1` is t = 751; pass `--max_timestep 752` to
include that step.

This file holds the flags, the prompts and the run; the sampler is `full/online/sampler.py`, the collect phase
`full/online/rollouts.py`, and resume, checkpoints, NaN stop, logging and saving are `full/run/loop.py`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import minipref
from full import cli
from full.data.samplers import EpochShuffleSampler
from full.models import pipeline as models
from full.models.config import ModelConfig
from full.models.families import get_family
from full.models.lora import trainable_unet_parts
from full.online.preference import THRESHOLD
from full.online.rollouts import SpoSettings, StepPairs, collect_stats, collect_step_pairs, share_pairs
from full.online.sampler import Guidance, ddim_scheduler, step_log_probs
from full.online.spm import StepAwarePreferenceModel, load_spm
from full.run.loop import TrainingRun, run_and_reset, start_accelerator
from full.run.phases import collect_then_train
from full.run.weights import weights_for

logger = logging.getLogger(__name__)

METHOD_SETTINGS = ("num_candidates", "threshold", "max_timestep", "num_inner_steps", "clip", "num_epochs",
                   "max_grad_norm")  # full/presets/*-spo.json `method_settings` that are flags here


class NoPairsCollected(ValueError):
    """A run in which no pair passed the threshold: the LoRA is its untrained initialisation."""


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def build_parser():
    p = cli.Parser(prog="full.spo", description=__doc__.split("\n\n")[0])
    a = cli.add_model_arguments(p)
    a("--preset", default=None, help="full/presets name (e.g. sd15-spo) or .json: defaults for the flags")
    a("--method", default="spo", choices=("spo",), help="this entry point trains spo (MSPO with --num_inner_steps)")
    cli.add_training_arguments(p)
    p.set_defaults(rank=None, learning_rate=None, train_batch_size=None, gradient_accumulation_steps=None,
                   lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=None, adam_weight_decay=1e-4)
    a = p.add_argument_group("SPO").add_argument
    a("--spm_model_name_or_path", required=True,
      help="a step-aware preference model from full.train_spm, or a plain CLIP/PickScore checkpoint (step-unaware)")
    a("--spm_processor_name_or_path", default=None, help="for a plain CLIP checkpoint without a processor")
    a("--beta", type=float, default=10.0)
    a("--clip", type=float, default=0.1, help="the ratio pi/pi_ref is clipped to [1 - clip, 1 + clip]")
    a("--num_candidates", type=int, default=None, help="k per step; default 4 (SD1.5) / 2 (SDXL)")
    a("--threshold", type=float, default=None, help="min preference gap in [0, 1); default 0.3 / 0.4")
    a("--max_timestep", type=int, default=750, help="pairs only at steps with t < this")
    a("--num_inner_steps", "--mspo_inner_steps", dest="num_inner_steps", type=int, default=None,
      help="MSPO inner steps; default 0 (SD1.5) / 3 (SDXL)")
    a("--num_inference_steps", type=int, default=20)
    a("--guidance_scale", type=float, default=5.0)
    a("--eta", type=float, default=1.0)
    a("--train_cfg", action=argparse.BooleanOptionalAction, default=True,
      help="score steps under the guided Gaussian they were sampled from (the authors' train.cfg)")
    a = p.add_argument_group("prompts").add_argument
    a("--prompts_file", default=None, help=".txt (one per line) or .json (strings or {'caption': ...} objects)")
    a("--dataset_name", default=None, help="or a parquet / Hub dataset with a caption column (Pick-a-Pic)")
    a("--dataset_split_name", default="train")
    a("--caption_column", default="caption")
    a("--max_train_samples", type=int, default=None, help="at most this many prompts")
    a("--resolution", type=int, default=None, help="default: the UNet's native size")
    a("--sample_batch_size", type=int, default=10, help="prompts per collect phase and process")
    a("--num_epochs", type=int, default=10, help="passes over the prompts (the paper: 10 over 4k prompts)")
    return p


def parse_args(argv=None):
    argv = cli.cli_argv(argv)
    parser = build_parser()
    cli.apply_preset(parser, argv, "spo", METHOD_SETTINGS)
    args = parser.parse_args(argv)
    if args.num_train_epochs is not None:  # the diffusers name of --num_epochs
        args.num_epochs = args.num_train_epochs
    cli.check_training_arguments(parser, args, argv)
    cli.check_positive(parser, args, ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rank",
                                  "checkpointing_steps", "num_inference_steps", "sample_batch_size", "num_epochs",
                                  "max_train_samples", "max_timestep", "beta", "learning_rate"))
    if (args.prompts_file is None) == (args.dataset_name is None):
        parser.error("give exactly one of --prompts_file and --dataset_name")
    if args.num_candidates is not None and args.num_candidates < 2:
        parser.error(f"--num_candidates must be at least 2 (a best and a worst), got {args.num_candidates}")
    if args.threshold is not None and not 0 <= args.threshold < 1:
        parser.error(f"--threshold must be in [0, 1) (a gap of softmax probabilities), got {args.threshold}")
    if args.num_inner_steps is not None and args.num_inner_steps < 0:
        parser.error(f"--num_inner_steps must be >= 0, got {args.num_inner_steps}")
    if not 0 < args.eta <= 1:
        parser.error(f"--eta must be in (0, 1]: SPO needs stochastic steps (eta = 1 in the paper), got {args.eta}")
    if not 0 < args.clip < 1:
        parser.error(f"--clip must be in (0, 1), got {args.clip}")
    if args.guidance_scale < 1:
        parser.error(f"--guidance_scale must be >= 1 (1 = no guidance), got {args.guidance_scale}")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.lr_scheduler not in ("constant", "constant_with_warmup") and args.max_train_steps is None:
        parser.error(f"--lr_scheduler {args.lr_scheduler} needs --max_train_steps (the number of kept pairs, hence "
                     "of steps, is only known online)")
    return args


def resolve_family_defaults(args, family: str) -> None:
    """Unset SPO settings take the paper's value for the family (full/presets/<family>-spo.json)."""
    from full.presets import preset_details

    preset = preset_details(f"{family}-spo")
    settings = {k: e["value"] for k, e in preset.get("method_settings", {}).items()}
    flags = {k: e["value"] for k, e in preset["flags"].items()}
    for name, value in (("num_candidates", settings["num_candidates"]), ("threshold", THRESHOLD[family]),
                        ("num_inner_steps", settings.get("num_inner_steps", 0)), ("rank", flags["rank"]),
                        ("learning_rate", flags["learning_rate"]), ("train_batch_size", flags["train_batch_size"]),
                        ("gradient_accumulation_steps", flags["gradient_accumulation_steps"])):
        if getattr(args, name) is None:
            setattr(args, name, value)


def load_prompts(args) -> list[str]:
    """Training prompts from a text/JSON file or from the caption column of a dataset (duplicates kept once)."""
    if args.prompts_file:
        import json

        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts_file {path} does not exist")
        if path.suffix == ".json":
            items = json.loads(path.read_text())
            prompts = [item if isinstance(item, str) else item.get(args.caption_column) for item in items]
        else:
            prompts = path.read_text().splitlines()
    else:
        from full.data.sources import iter_source

        prompts = [row[args.caption_column] for _, row in
                   iter_source(args.dataset_name, args.dataset_split_name, [args.caption_column], None)]
    prompts = list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))
    if args.max_train_samples:
        prompts = prompts[:args.max_train_samples]
    if not prompts:
        raise ValueError(f"no prompts in {args.prompts_file or args.dataset_name} (column {args.caption_column!r})")
    return prompts



# ---------------------------------------------------------------------------------------------------------------
# One step: the policy's and the reference's log-probability of each kept step, spo_loss
# ---------------------------------------------------------------------------------------------------------------


def spo_step_loss(unet, reference, scheduler, pairs: StepPairs, guide: Guidance, eta: float, train_cfg: bool,
                  beta: float, clip: float) -> minipref.LossOutput:
    """Reference first (no graph), then the policy, as `full.trainers.denoise` orders them. ``reference``: a context
    manager that yields the reference network (`full.run.weights`: the UNet with its LoRA off, or the frozen copy)."""
    with torch.no_grad(), reference as reference_unet:
        ref_w, ref_l = step_log_probs(reference_unet, scheduler, pairs, guide, eta, train_cfg).chunk(2)
    logp_w, logp_l = step_log_probs(unet, scheduler, pairs, guide, eta, train_cfg).chunk(2)
    return minipref.spo_loss(logp_w, ref_w, logp_l, ref_l, beta=beta, clip=clip)


# ---------------------------------------------------------------------------------------------------------------
# The online loop: collect with the current policy, then train on the kept tuples
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_and_reset(lambda: run(args))


def main_requiring_pairs(argv=None) -> dict:
    """`main` for the command line: a run that kept no pair is an error (exit status 2), not an untrained LoRA."""
    summary = main(argv)
    if summary["global_step"] == 0:
        raise NoPairsCollected(
            f"no SPO pair passed --threshold {summary['threshold']:g} in {summary['branch_points']:g} branch points, "
            f"so the LoRA in {summary['lora_path']} is untrained: lower --threshold or check the preference model")
    return summary


def load_preference_model(args, device, dtype) -> StepAwarePreferenceModel:
    path = Path(args.spm_model_name_or_path)
    if (path / "spm_config.json").is_file():
        return load_spm(path, device=device, dtype=dtype)
    logger.warning("%s is not a step-aware preference model (no spm_config.json): scoring with it as a plain, "
                   "step-unaware CLIP scorer; train one with full.train_spm for SPO proper", path)
    spm = StepAwarePreferenceModel.from_pretrained(args.spm_model_name_or_path, args.spm_processor_name_or_path,
                                                   time_conditioned=False)
    return spm.to(device=device, dtype=dtype).eval()


def unconditional_embeds(parts: models.Components, device) -> models.PromptEmbeds:
    """The pipelines' negative prompt: "" (SD1.5), zeros (SDXL with `force_zeros_for_empty_prompt`, its default)."""
    from diffusers import DiffusionPipeline

    empty = models.encode_prompts(parts, [""], device)
    if get_family(parts.family).zeros_for_empty_prompt and \
            DiffusionPipeline.load_config(parts.pretrained).get("force_zeros_for_empty_prompt", True):
        return models.PromptEmbeds(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))
    return empty



def run(args) -> dict:
    from accelerate.utils import set_seed

    family = models.detect_family(args.pretrained_model_name_or_path, args.revision)
    get_family(family).refuse("spo")  # the flow families: no stochastic step to pair (one line, before any load)
    cli.check_model_family(args, family)
    get_family(family).check_model_options(cli.config(ModelConfig, args).family_options())
    resolve_family_defaults(args, family)
    prompts = load_prompts(args)
    accelerator, weight_dtype = start_accelerator(cli.run_config(args), family)
    device = accelerator.device
    spm = load_preference_model(args, device, weight_dtype)  # a wrong path fails before the UNet loads
    set_seed(args.seed)  # the LoRA init: the same on every process and in every run
    model_config = cli.config(ModelConfig, args)
    parts = trainable_unet_parts(model_config, device, weight_dtype)
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    args.resolution = args.resolution or parts.unet.config.sample_size * vae_scale
    latent_shape = (parts.unet.config.in_channels, args.resolution // vae_scale, args.resolution // vae_scale)
    scheduler = ddim_scheduler(args.pretrained_model_name_or_path, args.revision, args.num_inference_steps, device)
    if not any(int(t) < args.max_timestep for t in scheduler.timesteps):
        raise ValueError(f"no denoising step has t < --max_timestep {args.max_timestep} "
                         f"(timesteps {scheduler.timesteps.tolist()})")
    settings = SpoSettings(args.num_candidates, args.threshold, args.max_timestep, args.num_inner_steps, args.eta,
                           next(spm.parameters()).dtype)
    size = torch.tensor([[args.resolution, args.resolution]])
    time_ids = get_family(family).time_ids(size, torch.zeros_like(size), args.resolution)  # SDXL's (1, 6); else None
    time_ids = None if time_ids is None else time_ids.to(device)
    guide = Guidance(family, unconditional_embeds(parts, device), time_ids, args.guidance_scale, weight_dtype)

    trained = weights_for(model_config.train_mode, parts, family, ema_decay=model_config.ema_decay)
    training = TrainingRun(cli.run_config(args), accelerator, parts, family, weight_dtype, desc=f"spo ({family})",
                           trained=trained)
    model = training.model  # the same weights: sampling, the reference, saving
    logger.info("SPO on %d prompts: k=%d, threshold %.3g, t < %d, %d inner steps, %d DDIM steps, CFG %.3g",
                len(prompts), args.num_candidates, args.threshold, args.max_timestep, args.num_inner_steps,
                args.num_inference_steps, args.guidance_scale)
    collects = []

    def collect(indices: list[int], generator: torch.Generator) -> list[StepPairs]:
        """The current policy samples, the SPM picks pairs (no gradients); the kept pairs as micro-batches."""
        batch = [prompts[j] for j in indices]
        model.eval()
        pairs, branches = StepPairs.empty(latent_shape, guide, device), []
        if batch:  # (empty when this process ran out of prompts in the epoch's last batch)
            pairs, branches = collect_step_pairs(model, scheduler, parts.vae, spm, batch,
                                                 models.encode_prompts(parts, batch, device), guide, settings,
                                                 latent_shape, generator)
        stats = collect_stats(accelerator, branches, len(pairs))
        collects.append({**stats, "branches": branches})
        accelerator.log({f"collect/{k}": v for k, v in stats.items()}, step=training.global_step)
        pairs = share_pairs(accelerator, pairs, torch.Generator().manual_seed(generator.initial_seed()))
        if len(pairs) == 0:
            logger.warning("no pair kept from %d branch points (threshold %.3g, mean gap %.3g); nothing to "
                           "train on this batch", stats["branch_points"], args.threshold, stats["mean_gap"])
        model.train()
        size = args.train_batch_size
        return [pairs.select(torch.arange(first, min(first + size, len(pairs)), device=pairs.timesteps.device))
                for first in range(0, len(pairs), size)]

    # Prompt batches: one permutation per epoch (the same on every process), each process takes its slice.
    collect_then_train(training, EpochShuffleSampler(len(prompts), args.seed), args.sample_batch_size,
                       args.num_epochs, collect,
                       lambda pairs: spo_step_loss(training.unet, trained.as_reference(model), scheduler, pairs,
                                                   guide, args.eta, args.train_cfg, args.beta, args.clip))

    branch_points = sum(c["branch_points"] for c in collects)
    if training.global_step == 0:
        logger.warning("no SPO pair passed --threshold %.3g in %d branch points: the LoRA was not updated (lower the "
                       "threshold, or check the preference model)", args.threshold, branch_points)
    logger.info("%d pairs kept in total", sum(c["kept_pairs"] for c in collects))
    return training.finish(history=training.history, collects=collects, threshold=args.threshold,
                           branch_points=branch_points)
