"""Published training settings per (model, method), each value next to the paper section it comes from.

One JSON file per preset, ``full/presets/<model_family>-<method>.json`` (LoRA) or ``...-<method>-full.json`` (the
whole UNet, ``train_mode: full``: the papers' own full fine-tuning recipes):

    {"name": "sd15-dpo", "model_family": "sd15", "method": "dpo", "description": ...,
     "flags": {"learning_rate": {"value": 1e-4, "source": "paper 000 Sec. 4.2: ..."}, ...},
     "method_settings": {...},        # optional: settings that are not trainer flags (SPO's sampler, ...)
     "paper_full_finetune": "...",    # optional: what the method's own paper ran, when it tuned all weights
     "processes": {"value": 16, "source": ...},  # optional (default 1): the GPU count the per-GPU values are for
     "notes": [...]}

The keys of ``flags`` are the offline trainer's flag names (``PRESET_KEYS``, ``full/trainers/offline.py``);
``--preset NAME`` sets them as defaults and any flag given on the command line wins. A value that no paper
gives says so in its source, starting with "NOT in the paper", and names what was chosen and why.

Sources cite the papers by their numbers 000-004 (the Papers table of docs/methods.md, printed under
``python -m full.presets`` too) and the repository's conventions by section (docs/conventions.md §N).

Per-GPU values for a stated GPU count. ``flags`` are per process (``train_batch_size`` per GPU, accumulation
steps); ``processes`` says for how many GPUs (1 when absent: the LoRA presets describe one A100-80GB).
``full/launch/train.sh`` keeps the effective batch on the GPUs it launches: accumulation x processes / GPUs, rounded
up (``full.plan.accumulation_for``), and says when that changes the batch (and with ``scale_lr`` the learning rate).

How the LoRA presets' values were picked. Paper 000 is the LoRA study of BCE / DPO / KTO /
SPIN on SD1.5, so its recipe (rank 8, AdamW 1e-4, 500 warm-up steps, 10k steps) is the optimiser setting
for every SD1.5 preset; each method's own hyperparameters (beta, tau, desirable ratio, utility, DSPO
variant, feedback policy) come from its own paper. Papers 001, 002 and 004 fine-tune *all* weights,
with learning rates around 1e-8..1e-7 at batches of 32 to 2048: those values do not transfer to a
rank-8 adapter, so they are recorded under ``paper_full_finetune`` and not applied. SPO (paper 003) trained
LoRA itself, so its presets are its own settings. No paper gives SDXL LoRA settings for the offline methods: those
presets say what was chosen. The ``-full`` presets apply those full fine-tuning recipes (Diffusion-DPO's launchers,
papers 001, 002 and 004) as printed.

    python -m full.presets                 # table of every preset: value and source
    python -m full.presets sd15-dpo        # one preset, with its notes
    python -m full.presets sd15-dpo --get train_batch_size
    python -m full.presets sd15-dpo-full --plan --engine zero2 --num_processes 8   # batch, lr, memory per GPU
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent
MODEL_FAMILIES = ("sd15", "sdxl")  # a preset for every method
FLOW_FAMILIES = ("sd3", "flux")  # SD3.5-medium and FLUX.1-dev: DPO and KTO presets (docs/flow_matching.md)

# The trainer flags a preset may set (argparse destinations of full/trainers/offline.py and full/cli): these, and
# every option of every row of the method table (minipref/methods.py: utility, tau, dspo_variant, ...), so that a
# method added as a row gets presets without an edit here.
TRAINER_KEYS = (
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps",
    "train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
    "resolution", "mixed_precision", "rank",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "beta",             # every objective's beta, minipref's convention (docs/conventions.md §2)
    "feedback_policy",  # pairs -> per-image labels: winner_once | always_win (full.data.pairs_to_feedback)
    "desirable_ratio",  # gamma of Diffusion-KTO's sampler: P(draw a desirable image) (paper 001: 0.8)
    "train_mode", "optimizer", "scale_lr",  # full fine-tuning (full/run/weights.py, full/run/accelerator.py)
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length", "flux_guidance_scale",  # flow
)
# The flags whose values are names: argparse does not check a default (a preset's value) against its choices.
CHOICES = {"train_mode": ("lora", "full"), "optimizer": ("adamw", "adafactor", "adamw_8bit")}  # = full.cli's
_TYPES = {"learning_rate": float, "beta": float, "desirable_ratio": float,
          "adam_beta1": float, "adam_beta2": float, "adam_weight_decay": float, "adam_epsilon": float,
          "lr_warmup_steps": int, "max_train_steps": int, "train_batch_size": int, "gradient_accumulation_steps": int,
          "resolution": int, "rank": int, "lr_scheduler": str, "mixed_precision": str,
          "feedback_policy": str, "gradient_checkpointing": bool, "train_mode": str, "optimizer": str,
          "scale_lr": bool, "weighting_scheme": str, "logit_mean": float, "logit_std": float, "mode_scale": float,
          "max_sequence_length": int, "flux_guidance_scale": float}


def preset_types() -> dict[str, type]:
    """Each key a preset may set, with its type: the trainer's flags and the method table's options."""
    from minipref import METHODS

    options = {option.name: option.type for method in METHODS.values() for option in method.options}
    return _TYPES | options


PRESET_KEYS = tuple(preset_types())  # as the built-in rows stand; validation reads preset_types() when it runs


# The papers the sources cite by number (docs/methods.md, "Papers"): title, and arXiv id where there is one.
PAPERS = {
    "000": "Aligning Text-to-Image Diffusion Models using Reinforcement Learning from Human Utility "
           "(Yin and Zhang, Stanford project report; the LoRA study; no arXiv id)",
    "001": "Aligning Diffusion Models by Optimizing Human Utility (Diffusion-KTO, Li et al. 2024; arXiv:2404.04465)",
    "002": "Diffusion Preference Alignment via Relative Text-Image Contrast (Diff-contrast; the double-blind version "
           "of Diffusion-RPO, Gu et al. 2024, arXiv:2406.06382)",
    "003": "Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference "
           "Optimization (SPO, Liang et al.; arXiv:2406.04314)",
    "004": "DSPO: Direct Score Preference Optimization for Diffusion Model Alignment (Zhu, Xiao and Honavar, "
           "ICLR 2025; no arXiv id)",
}


def papers_legend() -> str:
    """One line per paper number the sources cite."""
    return "\n".join(f"paper {number}: {title}" for number, title in PAPERS.items())


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def _validate(preset: dict, origin: str) -> dict:
    for field in ("name", "model_family", "method", "flags"):
        if field not in preset:
            raise ValueError(f"preset {origin} has no {field!r} field")
    if preset["model_family"] not in MODEL_FAMILIES + FLOW_FAMILIES:
        raise ValueError(f"preset {origin}: model_family must be one of {', '.join(MODEL_FAMILIES + FLOW_FAMILIES)}")
    types = preset_types()
    for key, entry in preset["flags"].items():
        if key not in types:
            raise ValueError(f"preset {origin}: {key!r} is not a trainer flag; known flags: {', '.join(types)}")
        if not isinstance(entry, dict) or set(entry) != {"value", "source"} or not str(entry["source"]).strip():
            raise ValueError(f"preset {origin}: flag {key!r} must be {{\"value\": ..., \"source\": \"...\"}}")
        value, kind = entry["value"], types[key]
        if kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind)
        if not ok:
            raise ValueError(f"preset {origin}: flag {key!r} must be {kind.__name__}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"preset {origin}: flag {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    processes = preset.get("processes", {"value": 1, "source": "default"})
    if (not isinstance(processes, dict) or set(processes) != {"value", "source"} or isinstance(processes["value"], bool)
            or not isinstance(processes["value"], int) or processes["value"] < 1):
        raise ValueError(f"preset {origin}: 'processes' must be {{\"value\": <GPUs, >= 1>, \"source\": \"...\"}}")
    return preset


def preset_processes(preset: dict) -> int:
    """The GPU count a preset's per-GPU values are for (1 when it states none)."""
    return preset.get("processes", {"value": 1})["value"]


def is_full(preset: dict) -> bool:
    """The preset trains the whole UNet (``train_mode: full``)."""
    return preset["flags"].get("train_mode", {"value": "lora"})["value"] == "full"


def preset_details(model_family: str, method: str | None = None) -> dict:
    """The whole preset (values, sources, notes). Accepts ``("sd15", "dpo")``, ``"sd15-dpo"`` or a
    path to a JSON file in the same format."""
    if method is None and model_family.endswith(".json") and Path(model_family).is_file():
        path = Path(model_family)
    else:
        name = model_family if method is None else f"{model_family}-{method}"
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"no preset {name!r}; available presets: {', '.join(available_presets())} "
                             "(or a path to a .json preset file)")
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"preset file {path} is not valid JSON: {error}") from error
    return _validate(preset, str(path))


def load_preset(model_family: str, method: str | None = None) -> dict:
    """``{flag: value}`` for the trainer, e.g. ``load_preset("sd15", "kto")["desirable_ratio"] == 0.8``."""
    return {key: entry["value"] for key, entry in preset_details(model_family, method)["flags"].items()}


TRAINER_DEFAULTS = {"gradient_accumulation_steps": 1, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 500,
                    "max_train_steps": 10_000}  # full/cli's defaults, for a preset that does not set them


def preset_plan(name: str, engine_name: str = "ddp", processes: int | None = None, *, use_ema: bool = False,
                cached: bool = False) -> str:
    """`python -m full.presets NAME --plan`: the preset on ``processes`` GPUs (default: the count it states), its
    accumulation rescaled as train.sh rescales it so that the effective batch stays the preset's."""
    from full.plan import accumulation_for, describe, engine

    engine(engine_name)
    preset = preset_details(name)
    stated = preset_processes(preset)
    processes = stated if processes is None else processes
    if processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {processes}")
    settings = TRAINER_DEFAULTS | {key: entry["value"] for key, entry in preset["flags"].items()}
    settings |= {"use_ema": use_ema, "cached_dir": "(cached)" if cached else None}
    accumulation = settings["gradient_accumulation_steps"]
    settings["gradient_accumulation_steps"] = accumulation_for(stated, accumulation, processes)
    lines = describe(settings, family=preset["model_family"], method=preset["method"], engine_name=engine_name,
                     processes=processes, title=f"{preset['name']}: {preset['description']}").split("\n")
    batch = settings["train_batch_size"]
    wanted, got = stated * batch * accumulation, processes * batch * settings["gradient_accumulation_steps"]
    if processes != stated:
        lines.insert(1, f"GPUs         the preset states {stated} ({stated} x {batch} x "
                        f"{accumulation} = {wanted}); on {processes}: accumulation {accumulation} -> "
                        f"{settings['gradient_accumulation_steps']} (full/launch/train.sh does the same)")
    if got != wanted:
        lines.append(f"note: the effective batch is {got}, not the preset's {wanted} (accumulation cannot go below 1)"
                     + ("; --scale_lr scales the learning rate with it" if settings.get("scale_lr") else ""))
    return "\n".join(lines)


def format_table(names: list[str] | None = None) -> str:
    """A markdown table: one row per (preset, flag) with value and source."""
    lines = ["| preset | flag | value | source |", "|---|---|---|---|"]
    for name in names or available_presets():
        preset = preset_details(name)
        if "processes" in preset:
            lines.append(f"| {name} | (GPUs) | {preset['processes']['value']} | {preset['processes']['source']} |")
        for key, entry in preset["flags"].items():
            lines.append(f"| {name} | {key} | {entry['value']} | {entry['source']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m full.presets", description="Show the published training presets.")
    parser.add_argument("name", nargs="?", help="preset name, e.g. sd15-dpo; all presets when omitted")
    parser.add_argument("--get", metavar="FLAG", help="print only this flag's value (for shell scripts)")
    plan = parser.add_argument_group("--plan: batch, steps, learning rate, schedule and memory per GPU (full/plan.py)")
    plan.add_argument("--plan", action="store_true", help="print the preset's plan instead of its table")
    plan.add_argument("--engine", default="ddp", help="ddp | zero2 | zero3 | fsdp (default ddp)")
    plan.add_argument("--num_processes", type=int, default=None, help="GPUs (default: the preset's)")
    plan.add_argument("--use_ema", action="store_true", help="count an EMA of the weights")
    plan.add_argument("--cached", action="store_true", help="train from a --cached_dir (no VAE, no text encoders)")
    args = parser.parse_args(argv)
    try:
        if args.plan:
            if not args.name:
                parser.error("--plan needs a preset name")
            print(preset_plan(args.name, args.engine, args.num_processes, use_ema=args.use_ema, cached=args.cached))
            return 0
        if args.get:
            if not args.name:
                parser.error("--get needs a preset name")
            print(load_preset(args.name)[args.get] if args.get in load_preset(args.name) else "")
            return 0
        if args.name is None:
            print(format_table())
            print(f"\n{papers_legend()}")
            return 0
        preset = preset_details(args.name)
        print(f"{preset['name']}: {preset['description']}\n")
        print(format_table([args.name]))
        for field in ("method_settings",):
            for key, entry in preset.get(field, {}).items():
                print(f"- {key} = {entry['value']}  ({entry['source']})")
        if preset.get("paper_full_finetune"):
            print(f"\nPaper setting (not applied): {preset['paper_full_finetune']}")
        for note in preset.get("notes", []):
            print(f"\nNote: {note}")
        print(f"\n{papers_legend()}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
