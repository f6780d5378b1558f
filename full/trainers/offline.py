"""The offline trainer: LoRA or full preference fine-tuning of SD1.5 / SDXL / SD3 / FLUX.1 with sft, csft, bce, dpo, kto,
contrast, dspo.

    accelerate launch -m full.train --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --method dpo --dataset_name yuvalkirstain/pickapic_v2 --output_dir runs/dpo-sd15

This file holds the flags, the data, and what one step computes (`compute_loss`: the one dispatch on `--method`,
every formula in `minipref`); the noising and the forwards are `full/trainers/denoise.py`, and everything else
(resume, checkpoints, NaN stop, logging, validation, saving) is the run loop of `full/run/loop.py`.

Pairs (Pick-a-Pic `jpg_0, jpg_1, label_0, caption`) feed dpo, contrast, dspo; binary feedback (`image,
caption, label`, or pairs converted per image as Diffusion-KTO does) feeds sft, csft, bce, kto.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

import minipref
from minipref.methods import DATA_OF_KIND
from full import cli
from full.data.config import DataConfig
from full.data.cache import CachedDataset, check_cache_model, collate_cached, read_cache_meta
from full.data.embeddings import embeddings_from_column, pair_embeddings
from full.data.images import FeedbackDataset, PairDataset, collate_skip_none
from full.data.rows import load_training_rows, rows_with_ids
from full.data.samplers import DesirableRatioSampler, EpochShuffleSampler
from full.data.streaming import make_streaming_loader, report_stream_rows
from full.models.config import ModelConfig
from full.models.lora import trainable_unet_parts
from full.models.families import get_family
from full.models.pipeline import detect_family
from full.run.global_batch import GlobalBatch
from full.run.loop import TrainingRun, run_and_reset, start_accelerator, steps_for_epochs
from full.run.weights import reference_forward, weights_for
from full.trainers.denoise import StepInputs, denoise, inputs_from_cache, inputs_from_images
from full.trainers.objective import Objective, resolve_objective

logger = logging.getLogger(__name__)

def offline_methods() -> dict[str, minipref.Method]:
    """The rows of the method table this trainer runs: the offline ones (paired and binary data), read when asked
    (a row registered at run time counts); the others sample during training and have their own entry points."""
    return {name: m for name, m in minipref.METHODS.items() if m.data in ("paired", "binary")}


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> cli.Parser:
    p = cli.Parser(prog="full.train", description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(p)
    a = p.add_argument_group("method").add_argument
    a("--method", required=True, help=" | ".join(offline_methods()) + " (rows of minipref/methods.py)")
    a("--preset", default=None, help="full/presets name (e.g. sd15-dpo) or .json: defaults for the flags")
    a("--dry_run", action="store_true", help="print the plan (global batch, learning rate, schedule, memory per "
                                             "GPU for the launch's engine: full/plan.py) and exit")
    a("--beta", type=float, default=None, help="default: the default of the method's minipref function")
    a("--desirable_ratio", type=float, default=None, help="binary data: P(draw a desirable image), gamma")
    cli.add_method_arguments(p, offline_methods().values())
    cli.add_image_data_arguments(p)
    data = p.add_argument_group("data")
    a = data.add_argument
    a("--feedback_policy", default="winner_once", help="pairs -> per-image labels (full.data.pairs_to_feedback)")
    a("--keep_ties", action="store_true")
    a("--cached_dir", default=None, help="a cache from `python -m full.cache`: no VAE, no text encoders")
    cli.add_streaming_arguments(data)
    cli.add_training_arguments(p)
    return p


def parse_args(argv=None):
    """Flags, with a `--preset`'s values as defaults (a flag on the command line wins); checks that need no I/O."""
    argv = cli.cli_argv(argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    methods = offline_methods()
    if known.method not in methods:
        row = minipref.METHODS.get(known.method)
        if row is not None:
            parser.error(f"--method {known.method} ({row.paper}) needs {row.data} data: the model samples during "
                         f"training; run `accelerate launch -m {cli.ENTRY_OF_KIND[row.data]}` (full.train runs the "
                         "offline methods)")
        parser.error(f"unknown method {known.method!r}: full.train takes {', '.join(methods)} "
                     f"(spin and spo have their own entry points, full.spin and full.spo)")
    cli.apply_preset(parser, argv, None)
    args = parser.parse_args(argv)
    method = methods[args.method]
    if (args.dataset_name is None) == (args.cached_dir is None):
        parser.error("give exactly one of --dataset_name and --cached_dir")
    cli.check_image_data_arguments(parser, args)
    cli.check_streaming_arguments(parser, args)
    if args.cached_dir:  # a cache holds one centre-cropped, unflipped latent per image
        for flag in ("--random_crop", "--random_flip"):
            if flag in argv:
                parser.error(f"{flag}: a --cached_dir holds one centre-cropped, unflipped VAE latent per image and "
                             "cannot augment; drop the flag, or train from --dataset_name")
        args.random_flip = False  # the default flip cannot apply either; args.json says so
    cli.check_training_arguments(parser, args, argv)
    args.method_options = cli.method_options(parser, args, argv, method, methods.values())
    if args.beta_dpo is not None and cli.given(argv, "--beta"):
        parser.error("give --beta or --beta_dpo, not both")
    args.beta_source = "--beta" if cli.given(argv, "--beta") else (f"--preset {args.preset}" if args.beta else None)
    cli.check_positive(parser, args, ("beta",))
    if args.desirable_ratio is not None and method.data != "binary":
        parser.error(f"--desirable_ratio applies to binary-feedback methods, not {args.method}")
    cli.check_range(parser, args, "desirable_ratio", 0, 1)
    from full.data.converters import FEEDBACK_POLICIES

    if args.feedback_policy not in FEEDBACK_POLICIES:
        parser.error(f"--feedback_policy must be one of {', '.join(FEEDBACK_POLICIES)}, got {args.feedback_policy!r}")
    if method.needs_embeddings:
        options = args.method_options
        if options["contrast_embedding"] != "image_text" and options["embedding_column"]:
            parser.error("--contrast_embedding selects halves of CLIP embeddings (from --clip_model_name_or_path or "
                         "a cache); --embedding_column embeddings are used as they are")
        if not (args.cached_dir or options["clip_model_name_or_path"] or options["embedding_column"]):
            parser.error(f"--method {args.method} needs --clip_model_name_or_path or --embedding_column (the "
                         "f(y, x) embeddings)")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def make_loader(args, kind: str, accelerator):
    """The DataLoader, and Diff-contrast's embedding table (uncached contrast only)."""
    table, data = None, cli.config(DataConfig, args)
    if args.streaming:
        return make_streaming_loader(data, kind, accelerator), None
    if args.cached_dir:
        dataset = CachedDataset(args.cached_dir, args.caption_dropout, args.seed)
        check_cache(dataset.meta, args, kind)
        collate, labels = collate_cached, (dataset.desirable if kind == "feedback" else None)
    else:
        rows = load_training_rows(data, kind)
        if minipref.get_method(args.method).needs_embeddings:
            table = contrast_table(args, rows, accelerator)
            rows = rows_with_ids(rows, table)
        dataset = (PairDataset if kind == "pairs" else FeedbackDataset)(
            rows, data.resolution, center_crop=not data.random_crop, random_flip=data.random_flip,
            caption_dropout=data.caption_dropout, seed=data.seed)
        collate, labels = collate_skip_none, (rows.column("desirable") if kind == "feedback" else None)
    if args.desirable_ratio is not None:
        sampler = DesirableRatioSampler(labels, args.desirable_ratio, num_samples=len(dataset), seed=args.seed)
    else:
        sampler = EpochShuffleSampler(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=args.dataloader_num_workers)
    return loader, table


def check_cache(meta: dict, args, kind: str) -> None:
    method = minipref.get_method(args.method)
    if meta["kind"] != kind:
        raise ValueError(f"cache {args.cached_dir} holds {meta['kind']} but --method {args.method} needs {kind}; "
                         f"build one with `python -m full.cache --method {args.method} ...`")
    if meta["csft_prompts"] != method.label_in_prompt:
        raise ValueError(f"cache {args.cached_dir} was built {'with' if meta['csft_prompts'] else 'without'} CSFT "
                         f"prompts (the label in the prompt); rebuild it with --method {args.method}")
    if method.needs_embeddings and not meta["has_embeddings"]:
        raise ValueError(f"cache {args.cached_dir} has no CLIP embeddings; rebuild with --clip_model_name_or_path")


def contrast_table(args, rows, accelerator) -> dict[int, Tensor]:
    """Diff-contrast's `f(y, x)` per row id, from a column or from CLIP (computed once, kept in a file)."""
    if args.embedding_column:
        return embeddings_from_column(args.dataset_name, args.dataset_split_name, args.embedding_column,
                                      args.max_train_samples)
    cache_file = args.embedding_cache_file or Path(args.output_dir) / "clip_embeddings.safetensors"
    with accelerator.main_process_first():  # process 0 computes, the others read its file
        return pair_embeddings(rows, args.clip_model_name_or_path, cache_file, accelerator.device,
                               source=f"{args.dataset_name}:{args.dataset_split_name}")



# ---------------------------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------------------------


def objective_for(args, family: str) -> Objective:
    """The method's row with its options and beta resolved (full/trainers/objective.py)."""
    return resolve_objective(minipref.get_method(args.method), args.method_options, args.beta, args.beta_source, family)


def compute_loss(args, pred: Tensor, ref_pred: Tensor | None, target: Tensor, inputs: StepInputs,
                 family: str = "sd15", batch: GlobalBatch | None = None) -> minipref.LossOutput:
    """One micro-batch's loss from parsed flags: the row's adapter (minipref/methods.py); every formula lives in
    minipref. ``batch`` (all processes' micro-batches) gives KTO's reference point and Diff-contrast's in-batch
    weights their global batch; None: this process's."""
    return objective_for(args, family).loss(pred, ref_pred, target, inputs, batch)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        from full.plan import describe, engine_from_environment

        engine, processes = engine_from_environment()
        family = detect_family(args.pretrained_model_name_or_path, args.revision)
        print(describe(vars(args), family=family, method=args.method, engine_name=engine, processes=processes))
        return {}
    return run_and_reset(lambda: train(args))


def train(args) -> dict:
    from accelerate.utils import set_seed

    # Cheap checks first: a wrong model or bad data fails before minutes of loading.
    family = detect_family(args.pretrained_model_name_or_path, args.revision)
    fam = get_family(family)
    cli.check_model_family(args, family)
    fam.check_model_options(cli.config(ModelConfig, args).family_options())
    if args.cached_dir:
        fam.refuse("cache")
    objective = objective_for(args, family)
    # args.json and the model card record the values used: beta and the per-family defaults
    args.beta = objective.beta
    vars(args).update(objective.options)
    if args.cached_dir:
        meta = read_cache_meta(args.cached_dir)
        if meta["family"] != family:
            raise ValueError(f"cache {args.cached_dir} was built for another model family than {family}")
        check_cache_model(meta, args.cached_dir, args.pretrained_model_name_or_path, args.revision,
                          args.pretrained_vae_model_name_or_path)
        if args.resolution is not None and meta["resolution"] != args.resolution:
            logger.warning("the cache is at resolution %d; --resolution %d is ignored", meta["resolution"],
                           args.resolution)
        args.resolution = meta["resolution"]  # a cache holds latents of one size
    elif args.resolution is None:
        args.resolution = fam.default_resolution
    accelerator, weight_dtype = start_accelerator(cli.run_config(args), family)
    device, kind = accelerator.device, DATA_OF_KIND[objective.method.data]
    set_seed(args.seed)  # the LoRA init: the same on every process and in every run
    loader, table = make_loader(args, kind, accelerator)
    if args.num_train_epochs:
        args.max_train_steps = steps_for_epochs(args.num_train_epochs, len(loader), accelerator.num_processes,
                                                args.gradient_accumulation_steps)
    model, with_reference = cli.config(ModelConfig, args), objective.needs_reference
    parts = trainable_unet_parts(model, device, weight_dtype, cached=bool(args.cached_dir),
                                 with_reference=with_reference)
    trained = weights_for(model.train_mode, parts, family, ema_decay=model.ema_decay)
    run = TrainingRun(cli.run_config(args), accelerator, parts, family, weight_dtype, loader=loader, trained=trained)
    reference = reference_forward(lambda: trained.as_reference(run.model))
    global_batch = GlobalBatch(accelerator)

    def step_loss(batch: dict, _) -> minipref.LossOutput:
        generator = run.sample_generators(len(batch["row_ids"]))  # per item: P processes draw as one would
        if args.cached_dir:
            inputs = inputs_from_cache(batch, family, device)
        else:
            inputs = inputs_from_images(batch, parts, model, device, generator, table,
                                        label_in_prompt=objective.method.label_in_prompt)
        pred, ref_pred, target = denoise(run.unet, reference, parts.noise_scheduler, family, inputs,
                                         with_reference=with_reference, generator=generator, weight_dtype=weight_dtype)
        return objective.loss(pred, ref_pred, target, inputs, global_batch)

    run.train_until(args.max_train_steps, step_loss)
    if args.streaming:
        report_stream_rows(loader, accelerator)
    return run.finish()
