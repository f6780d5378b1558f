"""Checks of parsed flags that need neither files nor models: each failure is one `parser.error` line that names
the flag and what it accepts. `full.cli` re-exports them; `full/cli/data.py` uses them too."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

from minipref.methods import range_problem


def check_positive(parser, args, names) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            parser.error(f"--{name} must be positive, got {value}")


def check_range(parser, args, name: str, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """`--name` in [low, high] (open ends as given); None (unset) passes."""
    value = getattr(args, name, None)
    problem = None if value is None else range_problem(name, value, low, high, low_open=low_open,
                                                       high_open=high_open)
    if problem:
        parser.error(problem)


def check_resolution(parser, args) -> None:
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")


def check_importable(parser, flag: str, module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        parser.error(f'{flag} needs {module}, which is not installed: pip install "minipref[{extra}]"')


def lr_scheduler_names() -> list[str]:
    from diffusers.optimization import SchedulerType

    # diffusers' schedules, and transformers' inverse square root (DSPO's warm-up then inverse scaling)
    return [schedule.value for schedule in SchedulerType] + ["inverse_sqrt"]


def given(argv: Sequence[str], flag: str) -> bool:
    """`flag` is on the command line (as `--flag value` or `--flag=value`), not only a default or a preset's."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


# Every flag that names a model (a Hub id or a local folder) in some trainer; the pipeline's own flag is checked
# where its family is read (full.models.pipeline.detect_family), before anything loads too.
MODEL_PATH_FLAGS = ("pretrained_vae_model_name_or_path", "clip_model_name_or_path",
                    "spm_model_name_or_path", "processor_name_or_path", "spm_processor_name_or_path")


def check_model_paths(parser, args) -> None:
    """A model flag that reads as a local path but does not exist is one line now, not a Hub lookup that retries
    for a minute and ends in a traceback (full/paths.py says what reads as local)."""
    from full.paths import missing_local_path

    for name in MODEL_PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and missing_local_path(value):
            parser.error(f"--{name} {value}: no such local directory (and it does not read as a Hub id)")


def check_training_arguments(parser, args, argv: Sequence[str] = ()) -> None:
    """The shared flags of `add_training_arguments` (every LoRA trainer); `argv` tells which were given."""
    check_model_paths(parser, args)
    from full.run.accelerator import check_report_to

    check_positive(parser, args, ("train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                                  "checkpointing_steps", "rank", "learning_rate", "num_train_epochs",
                                  "validation_steps", "num_validation_images", "vae_encode_batch_size",
                                  "logit_std", "max_sequence_length"))
    check_range(parser, args, "adam_beta1", 0, 1, high_open=True)
    check_range(parser, args, "adam_beta2", 0, 1, high_open=True)
    check_range(parser, args, "max_grad_norm", 0, math.inf)
    check_range(parser, args, "lr_warmup_steps", 0, math.inf)
    check_positive(parser, args, ("checkpoints_total_limit",))
    schedules = lr_scheduler_names()
    if args.lr_scheduler not in schedules:
        parser.error(f"--lr_scheduler must be one of {', '.join(schedules)}, got {args.lr_scheduler!r}")
    if given(argv, "--num_train_epochs") and given(argv, "--max_train_steps"):
        parser.error("--num_train_epochs sets the step count from the data size: give it or --max_train_steps, "
                     "not both")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir starts over and --resume_from_checkpoint continues: give one")
    if getattr(args, "caption_dropout", None) is not None:
        check_range(parser, args, "caption_dropout", 0, 1)
    message = check_report_to(args.report_to)
    if message:
        parser.error(message)
    if args.use_8bit_adam:
        if args.optimizer not in (None, "adamw_8bit"):
            parser.error(f"--use_8bit_adam is --optimizer adamw_8bit; it contradicts --optimizer {args.optimizer}")
        args.optimizer = "adamw_8bit"
    args.optimizer = args.optimizer or "adamw"
    if args.optimizer == "adamw_8bit":
        check_importable(parser, "--use_8bit_adam" if args.use_8bit_adam else "--optimizer adamw_8bit",
                         "bitsandbytes", "8bit")
    if hasattr(args, "train_mode"):
        check_train_mode(parser, args, argv)
    if args.hub_model_id and not args.push_to_hub:
        parser.error("--hub_model_id is used with --push_to_hub")


def check_train_mode(parser, args, argv: Sequence[str]) -> None:
    """The flags of one --train_mode are errors in the other; --ema_decay needs --use_ema; a preset's learning rate
    and batch are for the mode it names."""
    preset_mode = getattr(args, "preset_train_mode", args.train_mode)
    if preset_mode != args.train_mode:
        parser.error(f"--preset {args.preset} is a --train_mode {preset_mode} recipe (its learning rate and batch do "
                     f"not transfer to --train_mode {args.train_mode}); pick the {args.train_mode} preset")
    if args.train_mode == "full":
        for flag in ("--rank", "--lora_alpha"):
            if given(argv, flag):
                parser.error(f"{flag} applies to --train_mode lora; --train_mode full trains every UNet weight")
        args.rank = args.lora_alpha = None  # args.json, the model card and the run's identity: no LoRA here
    else:
        for flag in ("--use_ema", "--save_pipeline"):
            if getattr(args, flag[2:]):
                parser.error(f"{flag} applies to --train_mode full (a LoRA run saves its adapter: "
                             "pipe.load_lora_weights)")
    if args.ema_decay is not None and not args.use_ema:
        parser.error("--ema_decay applies with --use_ema")
    if args.use_ema:
        args.ema_decay = 0.9999 if args.ema_decay is None else args.ema_decay
        check_range(parser, args, "ema_decay", 0, 1, low_open=True, high_open=True)
