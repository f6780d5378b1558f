"""`python -m full.evaluate` / `minipref-evaluate`: generate with fixed seeds, score, compare.

The command line lives here; what it runs is full/eval/evaluate.py (`run` and `report`, and below them
generate.py, scoring.py, stats.py, plots.py). The library's names are re-exported, so `full.evaluate` is the one
module a script or a test imports.
"""

from __future__ import annotations

import argparse
import math
import sys

from full import cli
from full.eval import stats
from full.eval.evaluate import (DEFAULT_GUIDANCE, DEFAULT_SEEDS, DEFAULT_STEPS, EvalConfig, report, run,  # noqa: F401
                                scorers)
from full.eval.generate import (generate, load_prompts, merge_manifest_parts, parse_models, read_jsonl,  # noqa: F401
                                read_manifest)
from full.eval.scoring import score_manifest  # noqa: F401  (the library API, for scripts and tests)

POSITIVE_FLAGS = ("seeds", "steps", "batch_size", "max_prompts", "score_batch_size", "bootstrap")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed overflows above

def build_parser() -> cli.Parser:
    p = cli.Parser(prog="full.evaluate", description=__doc__.split("\n\n")[0].strip("# \n"),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (manifest, images, scores, results)")
    p.add_argument("--stages", default="generate,score,report", help="comma-separated subset of generate,score,report")
    g = p.add_argument_group("generation")
    g.add_argument("--base_model", "--base-model", help="diffusers pipeline directory or hub id (needed by the generate stage)")
    g.add_argument("--lora", action="append", default=[], help="NAME=DIR (or DIR) of a diffusers-format LoRA; repeatable")
    g.add_argument("--full_model", "--full-model", action="append", default=[],
                   help="NAME=DIR (or DIR) of a --train_mode full output: its unet/ (or transformer/) folder replaces "
                        "the base model's; repeatable")
    g.add_argument("--base_name", "--base-name", default="base", help="name of the model without LoRA in tables")
    g.add_argument("--no_base", "--no-base", action="store_true", help="do not evaluate the base model itself")
    g.add_argument("--prompts", default="paper000",
                   help="shipped set (paper000), a .txt/.csv/.json/.jsonl/.parquet file, or hf:<dataset>[:<split>]")
    g.add_argument("--prompt_column", "--prompt-column", help="column holding the prompt (default: prompt, caption or text)")
    g.add_argument("--max_prompts", "--max-prompts", type=int, help="use only the first N prompts")
    g.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="images per prompt and model")
    g.add_argument("--seed_start", "--seed-start", type=int, default=0, help="seeds are seed-start .. seed-start+seeds-1")
    g.add_argument("--scheduler", help="diffusers scheduler class, e.g. DDIMScheduler (default: the pipeline's own)")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    g.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    g.add_argument("--height", type=int, help="image height (default: the model's native size)")
    g.add_argument("--width", type=int, help="image width (default: the model's native size)")
    g.add_argument("--negative_prompt", "--negative-prompt", default=None)
    g.add_argument("--lora_scale", "--lora-scale", type=float, default=1.0, help="adapter weight of each LoRA")
    g.add_argument("--batch_size", "--batch-size", type=int, default=4)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float16 on cuda, float32 on cpu")
    g.add_argument("--no_safety_checker", "--no-safety-checker", action="store_true", help="drop the SD safety checker (it blacks out flagged images)")
    s = p.add_argument_group("scoring")
    s.add_argument("--scorers", default="pickscore,clip", help=f"comma-separated: {','.join(scorers.SCORERS)}, or module.path:ClassName (your own reward)")
    s.add_argument("--pickscore_model", "--pickscore-model", default=scorers.PICKSCORE_MODEL)
    s.add_argument("--pickscore_processor", "--pickscore-processor", default=scorers.PICKSCORE_PROCESSOR,
                   help="processor (tokenizer + image transform); a local model dir's own processor is used if present")
    s.add_argument("--clip_model", "--clip-model", default=scorers.CLIP_MODEL, help="CLIP for the CLIP score")
    s.add_argument("--aesthetic_clip_model", "--aesthetic-clip-model", default=scorers.CLIP_MODEL, help="CLIP ViT-L/14 under the aesthetic head")
    s.add_argument("--aesthetic_head", "--aesthetic-head", help="sac+logos+ava1-l14-linearMSE.pth (or .safetensors, or owner/repo/file)")
    s.add_argument("--hpsv2_version", "--hpsv2-version", default="v2.1")
    s.add_argument("--imagereward_model", "--imagereward-model", default="ImageReward-v1.0")
    s.add_argument("--score_batch_size", "--score-batch-size", type=int, default=16)
    s.add_argument("--fid_reference", "--fid-reference", help="folder of reference images: report each model's FID against it")
    s.add_argument("--fid_inception_weights", "--fid-inception-weights", help="local torch-fidelity pt_inception-2015-12-05 weights (offline FID)")
    r = p.add_argument_group("statistics")
    r.add_argument("--focus", help="compare this model with every other one (rows 'vs. X'); default: each later vs. each earlier")
    r.add_argument("--bootstrap", type=int, default=stats.DEFAULT_RESAMPLES, help="bootstrap resamples over prompts")
    r.add_argument("--bootstrap_seed", "--bootstrap-seed", type=int, default=stats.DEFAULT_BOOTSTRAP_SEED)
    r.add_argument("--confidence", type=float, default=stats.DEFAULT_CONFIDENCE)
    r.add_argument("--zero_method", "--zero-method", choices=stats.ZERO_METHODS, default="wilcox", help="scipy.stats.wilcoxon zero_method")
    r.add_argument("--grid_prompts", "--grid-prompts", type=int, default=4, help="image grids for the first N prompts")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(cli.cli_argv(argv))
    check_flags(parser, args)
    return args


def check_flags(parser: cli.Parser, args: argparse.Namespace) -> None:
    """The flags that need no file: one line naming the flag and what it accepts (exit 2), before anything runs."""
    cli.check_positive(parser, args, POSITIVE_FLAGS)
    for name in ("height", "width"):  # the VAE halves the image side three times (SD1.5, SDXL)
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8, got {value}")
    cli.check_range(parser, args, "confidence", 0, 1, low_open=True, high_open=True)
    cli.check_range(parser, args, "grid_prompts", 0, math.inf)
    cli.check_range(parser, args, "bootstrap_seed", 0, math.inf)  # numpy's default_rng takes no negative seed
    cli.check_range(parser, args, "seed_start", 0, MAX_SEED + 1 - args.seeds)
    for name in ("guidance", "lora_scale"):
        if not math.isfinite(getattr(args, name)):
            parser.error(f"--{name} must be a finite number, got {getattr(args, name)}")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    try:
        return run(cli.config(EvalConfig, args))
    except ValueError as error:  # bad input: one clear line, not a stack trace (unless --debug)
        if args.debug:
            raise
        raise SystemExit(f"full.evaluate: error: {error}") from error


def console() -> int:
    """An input error is one line on stderr and exit status 2, as the other entry points (full/cli.py)."""
    try:
        main()
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # argparse's own exit (status 2, or 0 for --help)
            raise
        print(stop.code, file=sys.stderr)  # main's one-line input error, which Python would exit with status 1
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(console())
