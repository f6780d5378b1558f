"""`python -m full.cache` / `minipref-cache` / `accelerate launch -m full.cache`: precompute latents and prompt
embeddings, shared over the launched processes and resumable (full/data/cache_build.py).

    accelerate launch -m full.cache --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name yuvalkirstain/pickapic_v2 --method dpo --resolution 512 --output_dir cache/pickapic-sd15
    accelerate launch -m full.train --cached_dir cache/pickapic-sd15 --method dpo ...
"""

import argparse
import logging
import sys

from full import cli

def parse_args(argv=None) -> argparse.Namespace:
    from full.data.converters import FEEDBACK_POLICIES

    p = cli.Parser(prog="full.cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--pretrained_vae_model_name_or_path", default=None)
    p.add_argument("--dataset_name", required=True)
    p.add_argument("--dataset_split_name", default="train")
    p.add_argument("--data_format", choices=("auto", "pairs", "feedback"), default="auto")
    p.add_argument("--feedback_policy", default="winner_once", help="pairs -> feedback (full.data.pairs_to_feedback)")
    p.add_argument("--keep_ties", action="store_true")
    p.add_argument("--max_train_samples", type=int, default=None)
    # The trainers' column flags: the data errors name them, and a cache reads --dataset_name as the trainer would.
    cli.add_column_arguments(p.add_argument_group("columns of --dataset_name (full/data/columns.py)"))
    p.add_argument("--method", required=True, help="the objective the cache serves (pairs or feedback, CSFT prompts)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--clip_model_name_or_path", default=None, help="store Diff-contrast embeddings (pairs only)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--shard_size", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--cache_dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--device", default=None,
                   help="default: each process's own device under accelerate launch, else cuda if available, else cpu")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="dtype of the frozen encoders while caching")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error instead of one line")
    args = p.parse_args(cli.cli_argv(argv))
    cli.check_positive(p, args, ("shard_size", "batch_size", "max_train_samples"))
    cli.check_resolution(p, args)
    if args.feedback_policy not in FEEDBACK_POLICIES:
        p.error(f"--feedback_policy must be one of {', '.join(FEEDBACK_POLICIES)}, got {args.feedback_policy!r}")
    check_cache_method(p, args)
    cli.check_model_paths(p, args)
    return args


def check_cache_method(parser, args) -> None:
    """A cache serves `full.train --cached_dir`: the offline methods (the others sample their own images), and a
    method that needs embeddings (Diff-contrast) only with the CLIP embeddings the trainer reads from it."""
    from minipref.methods import METHODS

    offline = [name for name, method in METHODS.items() if method.data in ("paired", "binary")]
    if args.method not in offline:
        parser.error(f"--method {args.method}: a cache serves full.train's offline methods ({', '.join(offline)}); "
                     "spin and spo sample their own images during training and read no cache")
    if METHODS[args.method].needs_embeddings and not args.clip_model_name_or_path:
        parser.error(f"--method {args.method}: add --clip_model_name_or_path; full.train reads Diff-contrast's "
                     "f(y, x) embeddings from the cache and refuses one without them")


def main(argv=None):
    from full.data.cache_build import CacheConfig, build_cache
    from full.data.config import DataConfig
    from full.models.config import ModelConfig

    args = parse_args(argv)
    return build_cache(cli.config(CacheConfig, args, data=cli.config(DataConfig, args),
                                  model=cli.config(ModelConfig, args)))


def console() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli.entry_point(main, prog="full.cache")


if __name__ == "__main__":
    sys.exit(console())
