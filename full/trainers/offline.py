"""The offline trainer: LoRA preference fine-tuning of SD1.5 / SDXL with sft, csft, bce, dpo, kto, contrast, dspo.

    accelerate launch -m full.train --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --method dpo --dataset_name yuvalkirstain/pickapic_v2 --output_dir runs/dpo-sd15

This file holds the flags, the data, and what one step computes (`compute_loss`: the one dispatch on `--method`,
every formula in `minipref`); the noising and the forwards are `full/trainers/denoise.py`, and everything else
(resume, checkpoints, NaN stop, logging, validation, saving) is the run loop of `full/run/loop.py`.

Pairs (Pick-a-Pic `jpg_0, jpg_1, label_0, caption`) feed dpo, contrast, dspo; binary feedback (`image,
caption, label`, or pairs converted per image as Diffusion-KTO does) feeds sft, csft, bce, kto.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path

import torch
from torch import Tensor

import minipref
from minipref.dspo import SDXL_THRESHOLD
from full import cli
from full.data.cache import CachedDataset, check_cache_model, collate_cached, read_cache_meta
from full.data.embeddings import embeddings_from_column, pair_embeddings
from full.data.images import FeedbackDataset, PairDataset, collate_skip_none
from full.data.rows import data_kind_for, load_training_rows, rows_with_ids
from full.data.samplers import DesirableRatioSampler, EpochShuffleSampler
from full.data.columns import add_column_arguments
from full.data.streaming import (add_streaming_arguments, check_streaming_arguments, make_streaming_loader,
                                 report_stream_rows)
from full.models.lora import trainable_unet_parts
from full.models.pipeline import DEFAULT_RESOLUTION, detect_family
from full.run.global_batch import GlobalBatch
from full.run.loop import TrainingRun, run_and_reset, start_accelerator
from full.trainers.denoise import StepInputs, denoise, inputs_from_cache, inputs_from_images

logger = logging.getLogger(__name__)

METHODS = tuple(name for name, objective in minipref.OBJECTIVES.items() if objective.data in ("paired", "binary"))
ONLINE_SCRIPTS = {"spin": "full.spin", "spo": "full.spo"}  # they sample during training
REFERENCE_METHODS = {"dpo", "kto", "contrast", "dspo"}  # + bce with --bce_reference
CONTRAST_EMBEDDINGS = ("image_text", "image", "text")  # halves of full.data.embeddings.ClipPairEncoder's [img, txt]
# The flags only one method reads: given to another method they are an error, and unused they are None (so args.json
# and the model card list only what the run used).
METHOD_FLAGS = {
    "kto": ("utility", "reference_point", "lambda_d", "lambda_u"),
    "dpo": ("dpo_loss_type", "dpo_label_smoothing"),
    "dspo": ("dspo_variant", "dspo_gamma"),
    "contrast": ("tau", "contrast_weights_inside", "clip_model_name_or_path", "embedding_column",
                 "embedding_cache_file"),
    "bce": ("bce_reference",),
}
# contrast's default temperature per model family: paper 002 App. B (SD1.5) and the authors' SDXL code
CONTRAST_TAU = {"sd15": 0.01, "sdxl": 0.5}


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> cli.Parser:
    from minipref.dpo import LOSS_TYPES
    from minipref.dspo import VARIANTS
    from minipref.kto import REFERENCE_POINTS, UTILITY_NAMES

    p = cli.Parser(prog="full.train", description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(p)
    a = p.add_argument_group("method").add_argument
    a("--method", required=True, help=" | ".join(METHODS))
    a("--preset", default=None, help="full/presets name (e.g. sd15-dpo) or .json: defaults for the flags")
    a("--beta", type=float, default=None, help="default: the default of the method's minipref function")
    a("--beta_dpo", type=float, default=None,
      help="the diffusers DPO scripts' beta: --beta 2B here for SD1.5 (that script drops the 1/2), B for SDXL")
    a("--utility", choices=UTILITY_NAMES, default="kahneman_tversky", help="kto")
    a("--reference_point", choices=REFERENCE_POINTS, default="batch", help="kto")
    a("--lambda_d", type=float, default=1.0, help="kto: weight of desirable samples")
    a("--lambda_u", type=float, default=1.0, help="kto: weight of undesirable samples")
    a("--desirable_ratio", type=float, default=None, help="binary data: P(draw a desirable image), gamma")
    a("--dpo_loss_type", choices=LOSS_TYPES, default="sigmoid")
    a("--dpo_label_smoothing", type=float, default=0.0, help="dpo: label-noise rate e of cdpo / robust, in [0, 0.5)")
    a("--tau", type=float, default=None, help="contrast temperature; default 0.01 (SD1.5) / 0.5 (SDXL)")
    a("--contrast_weights_inside", action="store_true", help="contrast: the LLM-RPO form")
    a("--contrast_embedding", choices=CONTRAST_EMBEDDINGS, default="image_text",
      help="contrast: what f(y, x) compares: CLIP image and prompt (the paper's f(y, x), default), the image only, "
           "or the prompt only (the RPO authors' code); docs/methods.md")
    a("--clip_model_name_or_path", default=None, help="contrast: CLIP model for f(image, prompt)")
    a("--embedding_column", default=None, help="contrast: read f from columns <name>_0 / <name>_1")
    a("--embedding_cache_file", default=None, help="contrast: default <output_dir>/clip_embeddings.safetensors")
    a("--dspo_variant", choices=VARIANTS, default="dspo")
    a("--dspo_gamma", type=float, default=1.0)
    a("--dspo_threshold", type=float, default=None,
      help="dspo_sdxl: switch to the drift-weighted form when mean (pred - ref_pred)^2 >= this (default 0.1, the "
           "authors' SDXL code)")
    a("--bce_reference", action="store_true", help="bce: the implicit reward as the logit, not -beta * err")
    add_image_data_arguments(p)
    data = p.add_argument_group("data")
    a = data.add_argument
    a("--feedback_policy", default="winner_once", help="pairs -> per-image labels (full.data.pairs_to_feedback)")
    a("--keep_ties", action="store_true")
    a("--cached_dir", default=None, help="a cache from `python -m full.cache`: no VAE, no text encoders")
    add_streaming_arguments(data)
    cli.add_training_arguments(p)
    return p


def add_image_data_arguments(p) -> None:
    """The image-dataset flags of the trainers that read real images (offline, SPIN)."""
    a = p.add_argument_group("data").add_argument
    a("--dataset_name", default=None, help="parquet file, dir of parquet files, or hub dataset name")
    a("--dataset_split_name", default="train")
    a("--data_format", choices=("auto", "pairs", "feedback"), default="auto")
    a("--max_train_samples", type=int, default=None, help="rows read from the source")
    a("--resolution", type=int, default=None, help="default: 512 (SD1.5) / 1024 (SDXL), the native sizes")
    a("--random_crop", action="store_true")
    a("--random_flip", action=argparse.BooleanOptionalAction, default=True,
      help="horizontal flip, the same for both images of a pair (on by default, as in the Diffusion-DPO code; "
           "--no-random_flip to turn it off)")
    a("--caption_dropout", type=float, default=0.0, help="P(a pair or image trains with the empty prompt)")
    a("--dataloader_num_workers", type=int, default=0, help="with --streaming: threads that decode images")
    add_column_arguments(p.add_argument_group("columns of --dataset_name (full/data/columns.py)"))


def check_image_data_arguments(p, args) -> None:
    cli.check_resolution(p, args)
    cli.check_positive(p, args, ("max_train_samples",))
    cli.check_range(p, args, "caption_dropout", 0, 1)
    if args.dataloader_num_workers < 0:
        p.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")


def parse_args(argv=None):
    """Flags, with a `--preset`'s values as defaults (a flag on the command line wins); checks that need no I/O."""
    argv = cli.cli_argv(argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.method not in METHODS:
        if known.method in ONLINE_SCRIPTS:
            objective = minipref.get_objective(known.method)
            parser.error(f"--method {known.method} ({objective.paper}) needs {objective.data} data: the model "
                         f"samples during training; run `accelerate launch -m {ONLINE_SCRIPTS[known.method]}` "
                         "(full.train runs the offline methods)")
        parser.error(f"unknown method {known.method!r}: full.train takes {', '.join(METHODS)} "
                     f"(spin and spo have their own entry points, full.spin and full.spo)")
    cli.apply_preset(parser, argv, None)
    args = parser.parse_args(argv)
    objective = minipref.get_objective(args.method)
    if (args.dataset_name is None) == (args.cached_dir is None):
        parser.error("give exactly one of --dataset_name and --cached_dir")
    check_image_data_arguments(parser, args)
    check_streaming_arguments(parser, args)
    if args.cached_dir:  # a cache holds one centre-cropped, unflipped latent per image
        for flag in ("--random_crop", "--random_flip"):
            if flag in argv:
                parser.error(f"{flag}: a --cached_dir holds one centre-cropped, unflipped VAE latent per image and "
                             "cannot augment; drop the flag, or train from --dataset_name")
        args.random_flip = False  # the default flip cannot apply either; args.json says so
    cli.check_training_arguments(parser, args, argv)
    if args.beta_dpo is not None:
        if args.method != "dpo":
            parser.error(f"--beta_dpo is the diffusers DPO scripts' flag; for --method {args.method} use --beta")
        if cli.given(argv, "--beta"):
            parser.error("give --beta or --beta_dpo, not both")
        # The factor depends on the family, so `train` resolves it once the model is known (beta_from_beta_dpo).
    check_method_flags(parser, args, argv)
    cli.check_positive(parser, args, ("beta", "tau", "lambda_d", "lambda_u", "dspo_threshold"))
    if args.dspo_threshold is not None and not (args.method == "dspo" and args.dspo_variant == "dspo_sdxl"):
        parser.error("--dspo_threshold applies to --method dspo --dspo_variant dspo_sdxl only")
    if args.desirable_ratio is not None and objective.data != "binary":
        parser.error(f"--desirable_ratio applies to binary-feedback methods, not {args.method}")
    cli.check_range(parser, args, "desirable_ratio", 0, 1)
    from full.data.converters import FEEDBACK_POLICIES

    if args.feedback_policy not in FEEDBACK_POLICIES:
        parser.error(f"--feedback_policy must be one of {', '.join(FEEDBACK_POLICIES)}, got {args.feedback_policy!r}")
    if args.dpo_label_smoothing and args.dpo_loss_type not in ("cdpo", "robust"):
        parser.error("--dpo_label_smoothing applies to --dpo_loss_type cdpo or robust")
    if args.dpo_loss_type in ("cdpo", "robust") and not 0 < args.dpo_label_smoothing < 0.5:
        parser.error(f"--dpo_loss_type {args.dpo_loss_type} needs --dpo_label_smoothing in (0, 0.5)")
    if args.contrast_embedding != "image_text" and (args.method != "contrast" or args.embedding_column):
        parser.error("--contrast_embedding selects halves of the CLIP embeddings of --method contrast (from "
                     "--clip_model_name_or_path or a cache); --embedding_column embeddings are used as they are")
    if args.method == "contrast" and not (args.cached_dir or args.clip_model_name_or_path or args.embedding_column):
        parser.error("--method contrast needs --clip_model_name_or_path or --embedding_column (the f(y, x) embeddings)")
    return args


def check_method_flags(parser, args, argv) -> None:
    """A method's own flag given to another method is an error; the unused ones become None."""
    for method, names in METHOD_FLAGS.items():
        if method == args.method:
            continue
        for name in names:
            if cli.given(argv, f"--{name}"):
                parser.error(f"--{name} applies to --method {method}, not {args.method}")
            if name not in ("clip_model_name_or_path", "embedding_column"):  # read by checks below
                setattr(args, name, None)


# diffusers' train_diffusion_dpo.py (SD1.5) has no 1/2 in its loss, logsigmoid(beta_dpo * diff): our beta is 2x;
# train_diffusion_dpo_sdxl.py keeps it, -0.5 * beta_dpo * diff: our beta is the same (docs/conventions.md).
BETA_DPO_FACTOR = {"sd15": 2.0, "sdxl": 1.0}


def beta_from_beta_dpo(args, family: str) -> None:
    """`--beta_dpo B` as the diffusers DPO script of this model family means it, in minipref's convention."""
    if args.beta_dpo is None:
        return
    args.beta = BETA_DPO_FACTOR[family] * args.beta_dpo
    script = "train_diffusion_dpo.py" if family == "sd15" else "train_diffusion_dpo_sdxl.py"
    logger.warning("--beta_dpo %g (diffusers %s convention) = --beta %g here", args.beta_dpo, script, args.beta)


def method_beta(args) -> float | None:
    if args.beta is not None:
        return args.beta
    param = inspect.signature(minipref.get_objective(args.method).fn).parameters.get("beta")
    return None if param is None else param.default


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def make_loader(args, kind: str, accelerator):
    """The DataLoader, and Diff-contrast's embedding table (uncached contrast only)."""
    table = None
    if args.streaming:
        return make_streaming_loader(args, kind, accelerator), None
    if args.cached_dir:
        dataset = CachedDataset(args.cached_dir, args.caption_dropout, args.seed)
        check_cache(dataset.meta, args, kind)
        collate, labels = collate_cached, (dataset.desirable if kind == "feedback" else None)
    else:
        rows = load_training_rows(args, kind)
        if args.method == "contrast":
            table = contrast_table(args, rows, accelerator)
            rows = rows_with_ids(rows, table)
        dataset = (PairDataset if kind == "pairs" else FeedbackDataset)(
            rows, args.resolution, center_crop=not args.random_crop, random_flip=args.random_flip,
            caption_dropout=args.caption_dropout, seed=args.seed)
        collate, labels = collate_skip_none, (rows.column("desirable") if kind == "feedback" else None)
    if args.desirable_ratio is not None:
        sampler = DesirableRatioSampler(labels, args.desirable_ratio, num_samples=len(dataset), seed=args.seed)
    else:
        sampler = EpochShuffleSampler(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=args.dataloader_num_workers)
    return loader, table


def check_cache(meta: dict, args, kind: str) -> None:
    if meta["kind"] != kind:
        raise ValueError(f"cache {args.cached_dir} holds {meta['kind']} but --method {args.method} needs {kind}; "
                         f"build one with `python -m full.cache --method {args.method} ...`")
    if meta["csft_prompts"] != (args.method == "csft"):
        raise ValueError(f"cache {args.cached_dir} was built {'with' if meta['csft_prompts'] else 'without'} CSFT "
                         f"prompts; rebuild it with --method {args.method}")
    if args.method == "contrast" and not meta["has_embeddings"]:
        raise ValueError(f"cache {args.cached_dir} has no CLIP embeddings; rebuild with --clip_model_name_or_path")
    if args.resolution is not None and meta["resolution"] != args.resolution:
        logger.warning("the cache is at resolution %d; --resolution %d is ignored", meta["resolution"], args.resolution)
    args.resolution = meta["resolution"]


def contrast_table(args, rows, accelerator) -> dict[int, Tensor]:
    """Diff-contrast's `f(y, x)` per row id, from a column or from CLIP (computed once, kept in a file)."""
    if args.embedding_column:
        return embeddings_from_column(args.dataset_name, args.dataset_split_name, args.embedding_column,
                                      args.max_train_samples)
    cache_file = args.embedding_cache_file or Path(args.output_dir) / "clip_embeddings.safetensors"
    with accelerator.main_process_first():  # process 0 computes, the others read its file
        return pair_embeddings(rows, args.clip_model_name_or_path, cache_file, accelerator.device,
                               source=f"{args.dataset_name}:{args.dataset_split_name}")



def steps_for_epochs(args, batches_per_epoch: int, num_processes: int) -> int:
    """`--num_train_epochs` as optimizer steps: each process sees 1/P of the batches, accumulation groups them."""
    per_process = -(-batches_per_epoch // num_processes)
    return max(1, -(-per_process // args.gradient_accumulation_steps)) * args.num_train_epochs


# ---------------------------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------------------------


def contrast_embedding(emb: Tensor, choice: str) -> Tensor:
    """The part of the stored CLIP `f = [img/|img|, txt/|txt|]` (B, 2, 2P) that Diff-contrast compares.

    cos of the whole is (cos_img + cos_txt) / 2 (image and prompt, the paper's f(y, x)); "image" and "text" keep
    one half. With "text" a pair's winner and loser share f (one prompt), as in the RPO authors' prompt-only code."""
    if choice == "image_text":
        return emb
    image, text = emb.chunk(2, dim=-1)
    return image if choice == "image" else text


def needs_reference(args) -> bool:
    return args.method in REFERENCE_METHODS or (args.method == "bce" and args.bce_reference)


def compute_loss(args, pred: Tensor, ref_pred: Tensor | None, target: Tensor, inputs: StepInputs,
                 family: str = "sd15", batch: GlobalBatch | None = None) -> minipref.LossOutput:
    """The one dispatch on `--method`; every formula lives in minipref. ``batch`` (all processes' micro-batches)
    gives KTO's reference point and Diff-contrast's in-batch weights their global batch; None: this process's."""
    method, beta = args.method, method_beta(args)
    err = minipref.per_sample_mse(pred, target)  # (n*B,)
    ref_err = None if ref_pred is None else minipref.per_sample_mse(ref_pred, target)
    if inputs.n == 2:  # pairs: first half winners, second half losers
        err_w, err_l = err.chunk(2)
        ref_w, ref_l = ref_err.chunk(2)
        if method == "dpo":
            return minipref.dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta, loss_type=args.dpo_loss_type,
                                     label_smoothing=args.dpo_label_smoothing)
        if method == "contrast":
            tau = args.tau if args.tau is not None else CONTRAST_TAU[family]
            emb = contrast_embedding(inputs.embeddings, args.contrast_embedding)  # (B, 2, E)
            parts = (err_w, err_l, ref_w, ref_l, emb[:, 0], emb[:, 1])
            scale = 1
            if batch is not None and batch.num_processes > 1:  # all M = P*B pairs; gradient through local rows
                parts, scale = batch.gather_with_local_grad(*parts), batch.num_processes
            out = minipref.contrast_loss(*parts, beta=beta, tau=tau, weights_inside=args.contrast_weights_inside)
            # x P: DDP averages the P gradients, each holding only its own rows' share (full/run/global_batch.py)
            return minipref.LossOutput(out.loss * scale, out.metrics)
        if method == "dspo":
            pred_w, ref_pred_w, target_w = pred.chunk(2)[0], ref_pred.chunk(2)[0], target.chunk(2)[0]
            threshold = {} if args.dspo_variant != "dspo_sdxl" else {
                "threshold": SDXL_THRESHOLD if args.dspo_threshold is None else args.dspo_threshold}
            return minipref.dspo_loss(pred_w, ref_pred_w, target_w, err_l, ref_l, beta=beta, gamma=args.dspo_gamma,
                                      variant=args.dspo_variant, **threshold)
    else:
        if method == "sft":
            return minipref.sft_loss(err, weight=inputs.desirable.to(err.device))
        if method == "csft":  # the label is in the prompt; every sample is fitted
            return minipref.sft_loss(err)
        if method == "bce":
            return minipref.bce_loss(err, inputs.desirable, err_ref=ref_err if args.bce_reference else None, beta=beta)
        if method == "kto":
            reference_point = args.reference_point
            if reference_point == "batch" and batch is not None:
                # z_ref = clamp(mean over the global batch of r, 0), detached: the authors' accelerator.reduce
                reward = minipref.implicit_reward(err, ref_err, beta)
                reference_point = batch.global_mean(reward).clamp(min=0)
            return minipref.kto_loss(err, ref_err, inputs.desirable, beta=beta, utility=args.utility,
                                     reference_point=reference_point, lambda_d=args.lambda_d,
                                     lambda_u=args.lambda_u)
    raise ValueError(f"--method {method} cannot train on {'pairs' if inputs.n == 2 else 'per-image'} data")



# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    return run_and_reset(train, parse_args(argv))


def train(args) -> dict:
    from accelerate.utils import set_seed

    # Cheap checks first: a wrong model or bad data fails before minutes of loading.
    family = detect_family(args.pretrained_model_name_or_path, args.revision)
    cli.check_model_family(args, family)
    beta_from_beta_dpo(args, family)
    args.beta = method_beta(args)  # the value used, in args.json and the model card
    if args.method == "contrast" and args.tau is None:
        args.tau = CONTRAST_TAU[family]
    if args.cached_dir:
        meta = read_cache_meta(args.cached_dir)
        if meta["family"] != family:
            raise ValueError(f"cache {args.cached_dir} was built for another model family than {family}")
        check_cache_model(meta, args.cached_dir, args.pretrained_model_name_or_path, args.revision,
                          getattr(args, "pretrained_vae_model_name_or_path", None))
    if args.resolution is None and not args.cached_dir:
        args.resolution = DEFAULT_RESOLUTION[family]
    accelerator, weight_dtype = start_accelerator(args, family)
    device, kind = accelerator.device, data_kind_for(args.method)
    set_seed(args.seed)  # the LoRA init: the same on every process and in every run
    loader, table = make_loader(args, kind, accelerator)
    if args.num_train_epochs:
        args.max_train_steps = steps_for_epochs(args, len(loader), accelerator.num_processes)
    parts = trainable_unet_parts(args, device, weight_dtype, cached=bool(args.cached_dir))
    run = TrainingRun(args, accelerator, parts, family, weight_dtype, loader=loader)
    with_reference, global_batch = needs_reference(args), GlobalBatch(accelerator)

    def step_loss(batch: dict, _) -> minipref.LossOutput:
        generator = run.sample_generators(len(batch["row_ids"]))  # per item: P processes draw as one would
        if args.cached_dir:
            inputs = inputs_from_cache(batch, family, device)
        else:
            inputs = inputs_from_images(batch, parts, args, device, generator, table)
        pred, ref_pred, target = denoise(run.unet, run.model, parts.noise_scheduler, family, inputs,
                                         with_reference=with_reference, generator=generator, weight_dtype=weight_dtype)
        return compute_loss(args, pred, ref_pred, target, inputs, family, global_batch)

    run.train_until(args.max_train_steps, step_loss)
    if args.streaming:
        report_stream_rows(loader, accelerator)
    return run.finish()
