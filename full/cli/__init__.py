"""What every `full` entry point shares on the command line: a parser whose errors are one line, the entry-point
wrapper (`entry_point`) that turns input errors into one line and a non-zero exit (a traceback only with
`--debug`), argument groups with diffusers' flag names, presets as defaults, and the checks that need no model.

A flag is checked here, at parse time, whenever the check needs no file or model: the message names the flag and
the allowed range. Errors found later (a missing file, a bad row) are `ValueError`s that the trainers raise before
any model loads where they can; `entry_point` prints them as one line too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

# The checks of parsed flags and the dataset flags, re-exported: `cli.check_range`, `cli.add_image_data_arguments`...
from full.cli.checks import (check_importable, check_model_paths, check_positive, check_range,  # noqa: F401
                             check_resolution, check_training_arguments, given, lr_scheduler_names)
from full.cli.data import (add_column_arguments, add_image_data_arguments, add_streaming_arguments,  # noqa: F401
                           check_image_data_arguments, check_streaming_arguments)

TRAIN_MODES = ("lora", "full")
OPTIMIZERS = ("adamw", "adafactor", "adamw_8bit")
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
# The entry point that trains a row of the method table, by its data kind: the online ones sample during training.
ENTRY_OF_KIND = {"paired": "full.train", "binary": "full.train", "self_play": "full.spin", "online": "full.spo"}  # a bug's KeyError keeps its traceback


class UsageError(ValueError):
    """A bad flag value found after parsing; printed as one line like an argparse error."""


def typed_prog(prog: str | None) -> str | None:
    """The command as the user typed it: a console script's own name (`minipref-train`) when that is what runs,
    else ``prog`` (the module, as `python -m full.train` and `accelerate launch -m full.train` show it)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script.startswith("minipref-") else prog


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that still exits with status 2, named as the user typed it."""

    def __init__(self, *args, prog: str | None = None, **kwargs):
        super().__init__(*args, prog=typed_prog(prog), **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cli_argv(argv: Sequence[str] | None) -> list[str]:
    """`argv`, or the process's arguments, except inside a Jupyter kernel, whose own `-f kernel.json` is not ours:
    `main()` in a notebook parses nothing (then fails on the required flags, naming them)."""
    if argv is not None:
        return list(argv)
    return [] if "ipykernel" in sys.modules else sys.argv[1:]


def config(cls, args: argparse.Namespace, **values):
    """A typed config of a library room (`full.data.config.DataConfig`, `full.models.config.ModelConfig`,
    `full.run.config.RunConfig`, ...) from the parsed flags: each field is read from the flag of the same name
    (a field without a flag keeps its default), ``values`` set the rest. The rooms below never see ``args``."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:  # a typo here would silently drop a value
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    flags = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**(flags | values))


def run_config(args: argparse.Namespace):
    """The run loop's `RunConfig` from a trainer's final flags; ``flags`` keeps them all (args.json, the card)."""
    from full.models.config import ModelConfig
    from full.run.config import RunConfig

    return config(RunConfig, args, model=config(ModelConfig, args), flags=dict(vars(args)))


def entry_point(main: Callable, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run `main(argv)` for `python -m ...` and the console scripts: an input error is one line on stderr and exit
    status 2; with `--debug` (or MINIPREF_DEBUG=1) the traceback is shown instead."""
    argv = cli_argv(argv)
    prog = typed_prog(prog) or os.path.basename(sys.argv[0])
    debug = "--debug" in argv or os.environ.get("MINIPREF_DEBUG") == "1"
    try:
        result = main(argv)
    except INPUT_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


# ---------------------------------------------------------------------------------------------------------------
# Argument groups every LoRA trainer shares (diffusers example-script names)
# ---------------------------------------------------------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser):
    """The model flags every trainer shares (train, spin, spo); returns the group's ``add_argument``."""
    a = p.add_argument_group("model").add_argument
    a("--pretrained_model_name_or_path", required=True,
      help="an SD1.5, SDXL, SD3/SD3.5 or FLUX.1 diffusers pipeline: hub id or dir (the family is read from it)")
    a("--revision", default=None)
    a("--variant", default=None, help="e.g. fp16")
    a("--pretrained_vae_model_name_or_path", default=None, help="a VAE that is safe in half precision (SDXL)")
    a("--train_mode", choices=TRAIN_MODES, default="lora",
      help="lora: peft adapters on the UNet's attention (the reference is the UNet with them off); full: every UNet "
           "weight, the reference a frozen copy of the start (full/run/weights.py)")
    a("--rank", type=int, default=8, help="--train_mode lora: the LoRA rank")
    a("--lora_alpha", type=float, default=None, help="--train_mode lora: default --rank (scale 1)")
    a("--use_ema", action="store_true", help="--train_mode full: keep an EMA of the weights (diffusers EMAModel); "
                                             "the final unet/ holds it")
    a("--ema_decay", type=float, default=None, help="--use_ema: the EMA decay (default 0.9999, diffusers')")
    a("--save_pipeline", action="store_true",
      help="--train_mode full: also write the whole pipeline into --output_dir (DiffusionPipeline.from_pretrained)")
    a("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    add_flow_arguments(p)
    return a


def add_flow_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the rectified-flow families (SD3, FLUX), with the diffusers dreambooth scripts' names; unset, each
    takes its script's default (full/models/flow_families.py). Given for another family: one line at start."""
    a = p.add_argument_group("rectified-flow models (sd3, flux)").add_argument
    a("--weighting_scheme", choices=("logit_normal", "mode", "none"), default=None,
      help="the density of the training timesteps: logit_normal (SD3 script's default), mode, none (uniform, FLUX "
           "script's default)")
    a("--logit_mean", type=float, default=None, help="logit_normal: mean (default 0.0)")
    a("--logit_std", type=float, default=None, help="logit_normal: std (default 1.0)")
    a("--mode_scale", type=float, default=None, help="mode: scale (default 1.29)")
    a("--max_sequence_length", type=int, default=None, help="T5 tokens (default: SD3 script 77, FLUX script 512)")
    a("--flux_guidance_scale", type=float, default=None,
      help="FLUX.1-dev's guidance embedding while training (default 3.5, the FLUX script's --guidance_scale)")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Optimisation, checkpoint, logging and validation flags every trainer shares (train, spin, spo)."""
    a = p.add_argument_group("optimisation").add_argument
    a("--train_batch_size", type=int, default=4, help="pairs (images for binary methods) per device")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=1e-4)
    a("--scale_lr", action=argparse.BooleanOptionalAction, default=False,
      help="learning rate x global batch (processes x micro-batch x accumulation), as the Diffusion-DPO launchers")
    a("--lr_scheduler", default="constant_with_warmup")
    a("--lr_warmup_steps", type=int, default=500)
    a("--max_train_steps", type=int, default=10_000)
    a("--num_train_epochs", type=int, default=None,
      help="passes over the data instead of --max_train_steps (the step count then follows from the data size); "
           "not with --max_train_steps")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--optimizer", choices=OPTIMIZERS, default=None,
      help="adamw (default); adafactor (transformers', as Diffusion-DPO's SDXL launcher: no momentum, factored "
           "second moments); adamw_8bit (bitsandbytes)")
    a("--use_8bit_adam", action="store_true", help='= --optimizer adamw_8bit (pip install "minipref[8bit]")')
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="default: the accelerate config")
    a("--gradient_checkpointing", action="store_true")
    a("--allow_tf32", action="store_true")
    a("--vae_encode_batch_size", type=int, default=None, help="images per VAE encode (default: the whole batch)")
    a("--seed", type=int, default=0)
    a = p.add_argument_group("checkpoints and logging").add_argument
    a("--output_dir", required=True)
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None, help="keep the newest N checkpoints (default: all)")
    a("--resume_from_checkpoint", default=None, help='a checkpoint dir or "latest"')
    a("--overwrite_output_dir", action="store_true",
      help="delete the checkpoints and weights of an earlier run in --output_dir and start over (without it, a folder "
           "holding another run's work is refused)")
    a("--report_to", default="tensorboard", help="tensorboard | wandb | all | none (comma-separated for several)")
    a("--logging_dir", default="logs")
    a("--tracker_project_name", default="minipref")
    a("--push_to_hub", action="store_true", help="upload --output_dir (LoRA, model card, args) to the Hub at the end")
    a("--hub_model_id", default=None, help="the Hub repo for --push_to_hub (default: the output dir's name)")
    a("--hub_token", default=None)
    a("--validation_prompts", nargs="*", default=None)
    a("--validation_steps", type=int, default=500)
    a("--num_validation_images", type=int, default=2)
    a("--num_validation_inference_steps", type=int, default=25)
    a("--validation_guidance_scale", type=float, default=7.5)


# ---------------------------------------------------------------------------------------------------------------
# A method's own flags, from its row of the method table (minipref/methods.py)
# ---------------------------------------------------------------------------------------------------------------


def add_method_arguments(p: argparse.ArgumentParser, methods) -> None:
    """Each option of each method's row as a flag (an option two methods share is one flag)."""
    group, seen = p.add_argument_group("method options (each applies to the methods named in its help)"), {}
    for method in methods:
        for option in method.options:
            seen.setdefault(option.name, (option, []))[1].append(method.name)
    for name, (option, owners) in seen.items():
        help_text = f"{' / '.join(owners)}: {option.help}"
        if option.type is bool:
            group.add_argument(f"--{name}", action="store_true", default=option.default, help=help_text)
        else:
            group.add_argument(f"--{name}", type=option.type, choices=option.choices, default=option.default,
                               help=help_text + ("" if option.default is None else f" (default {option.default})"))


def method_options(parser, args, argv: Sequence[str], method, methods) -> dict:
    """The chosen method's options from the flags, checked against its row; another method's flag on the command
    line is an error, and those of the other methods are None in ``args`` (so args.json and the model card list
    only what the run used)."""
    own = {option.name for option in method.options}
    for other in methods:
        for option in other.options:
            if option.name in own:
                continue
            if given(argv, f"--{option.name}"):
                parser.error(f"--{option.name} applies to --method {other.name}, not {method.name}")
            setattr(args, option.name, None)
    options = {option.name: getattr(args, option.name) for option in method.options}
    for option in method.options:
        problem = option.problem(options[option.name])
        if problem:
            parser.error(problem)
    problem = method.check(options)
    if problem:
        parser.error(problem)
    return options


def apply_preset(parser: argparse.ArgumentParser, argv, method: str | None, extra_keys=()) -> None:
    """`--preset NAME`: its trainer flags (and the `method_settings` named in `extra_keys`) become defaults; a flag
    on the command line still wins. `method` None: the preset must match the parsed `--method`."""
    known, _ = parser.parse_known_args(argv)
    if not known.preset:
        return
    from full.presets import preset_details

    try:
        preset = preset_details(known.preset)
    except ValueError as error:
        parser.error(str(error))
    method = method or known.method
    if preset["method"] != method:
        parser.error(f"--preset {known.preset} is for --method {preset['method']}, not {method}")
    defaults = {key: entry["value"] for key, entry in preset["flags"].items()}
    defaults |= {key: entry["value"] for key, entry in preset.get("method_settings", {}).items() if key in extra_keys}
    parser.set_defaults(**defaults, preset_family=preset["model_family"],
                        preset_train_mode=defaults.get("train_mode", "lora"))


def check_model_family(args, family: str) -> None:
    """A preset is for one model family; the resolution fits the family's latent grid."""
    from full.models.families import get_family

    if getattr(args, "preset_family", family) != family:
        raise ValueError(f"--preset {args.preset} is for {args.preset_family}, the model is {family}")
    multiple = get_family(family).resolution_multiple
    if getattr(args, "resolution", None) and args.resolution % multiple:
        raise ValueError(f"--resolution {args.resolution}: {family} takes a multiple of {multiple} pixels (its latents "
                         f"are {multiple} pixels a side), e.g. {args.resolution // multiple * multiple or multiple}")


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

