"""`python -m full.lab.fidelity`: how well a pretrained lab model follows its captions, per guidance scale.

    python -m full.lab.fidelity --model runs/lab/model --guidance 3,5,7.5
    python -m full.lab.fidelity --model runs/pre/steps2000 --pretrain unet_steps=2000 unet_lr=0.002

The base model draws every held-out caption with seeds 0..7 (20 DDIM steps, the lab's evaluation), and the reader
(`full/lab/reader.py`) says whether it finds the caption's colour, shape and background; "all" is the lab's
fidelity. `--pretrain key=value ...` first pretrains the full lab's model with those `PretrainConfig` fields
changed into `--model` (skipped when `--model` already holds a pipeline): the command behind the pretraining table
in docs/lab.md. Prints one JSON line per guidance scale.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from full.cli import Parser
from full.lab.presets import FULL, FULL_PRETRAIN, PretrainConfig


def pretrain_overrides(pairs: list[str]) -> PretrainConfig:
    """["unet_steps=2000", "unet_lr=0.002"] -> the full lab's PretrainConfig with those fields changed."""
    types = {f.name: type(getattr(FULL_PRETRAIN, f.name)) for f in fields(PretrainConfig)}
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or not value or types[key] is tuple:
            raise ValueError(f"--pretrain: {pair!r} is not FIELD=VALUE for one of {', '.join(sorted(types))}"
                             " (tuple fields excluded)")
        changes[key] = types[key](value)
    return replace(FULL_PRETRAIN, **changes)


def caption_fidelity(model: Path, guidance: float, seeds: int = 8, steps: int = FULL.sample_steps) -> dict:
    """Fraction of held-out samples whose colour, shape, background (and all three) the reader finds."""
    from full.lab.preferences import load_pipeline, sample_images
    from full.lab.rater import attribute_rates
    from full.lab.shapes import HELD_OUT_CAPTIONS

    prompts = [caption for caption in HELD_OUT_CAPTIONS for _ in range(seeds)]
    images = sample_images(load_pipeline(model), prompts, list(range(seeds)) * len(HELD_OUT_CAPTIONS),
                           steps=steps, guidance=guidance)
    return {**attribute_rates(images, prompts), "n_images": len(images)}


def main(argv=None) -> int:
    parser = Parser(prog="python -m full.lab.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a pretrained lab pipeline (save_pretrained)")
    parser.add_argument("--guidance", default=str(FULL.guidance), help="comma-separated scales (default: the lab's)")
    parser.add_argument("--pretrain", nargs="*", default=None, metavar="FIELD=VALUE",
                        help="pretrain the full lab's model with these PretrainConfig fields changed into --model first")
    args = parser.parse_args(argv)
    try:
        scales = [float(g) for g in args.guidance.split(",")]
    except ValueError:
        parser.error(f"--guidance: {args.guidance!r} is not a comma-separated list of numbers")
    try:
        config = pretrain_overrides(args.pretrain) if args.pretrain is not None else None
    except ValueError as error:
        parser.error(str(error))
    if not (args.model / "model_index.json").is_file():
        if config is None:
            parser.error(f"--model: {args.model} holds no pipeline (no model_index.json); --pretrain makes one")
        from full.lab.pretrain import pretrain

        seconds = pretrain(args.model, config)["seconds"]
        changed = {k: v for k, v in vars(config).items() if getattr(FULL_PRETRAIN, k) != v}
        print(json.dumps({"pretrained": str(args.model), "changed": changed, "seconds": round(seconds, 1)}), flush=True)
    for guidance in scales:
        print(json.dumps({"model": str(args.model), "guidance": guidance, **caption_fidelity(args.model, guidance)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
