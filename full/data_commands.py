"""`python -m full.data` / `minipref-data`: check a dataset as the trainers read it, or convert other feedback
into the training schemas (full/data/converters.py does the work).

    python -m full.data check yuvalkirstain/pickapic_v2 --max_rows 1000
    python -m full.data convert pairs-to-feedback --input pairs.parquet --output feedback.parquet
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from full import cli
from full.data import converters
from full.data.config import DataConfig


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog="full.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="load a dataset as the trainer would and print what is usable")
    check.add_argument("dataset_name")
    check.add_argument("--data_format", "--schema", dest="data_format", choices=("auto", "pairs", "feedback"),
                       default="auto", help="default: detected from the columns, as the trainers do")
    check.add_argument("--split", "--dataset_split_name", dest="split", default="train")
    check.add_argument("--max_rows", type=int, help="read at most this many rows (the trainers' --max_train_samples)")
    check.add_argument("--keep_ties", action="store_true", help="pairs: count ties as usable, as the trainers do")
    cli.add_column_arguments(check.add_argument_group("columns of the dataset (full/data/columns.py)"))
    convert = commands.add_parser("convert", help="write a training-schema parquet file from other feedback")
    kinds = convert.add_subparsers(dest="kind", required=True)

    def io_args(sub):
        sub.add_argument("--input", required=True, help="parquet file, directory of parquet files, or Hub dataset")
        sub.add_argument("--output", required=True, help="parquet file to write")
        sub.add_argument("--split", "--dataset_split_name", dest="split", default="train")
        sub.add_argument("--max_rows", type=int, help="read at most this many input rows")

    def score_args(sub):
        sub.add_argument("--image_column", default="image")
        sub.add_argument("--caption_column", default="caption")
        sub.add_argument("--score_column", default="score")

    sub = kinds.add_parser("pairs-to-feedback", help="Pick-a-Pic pairs -> binary feedback (Diffusion-KTO)")
    io_args(sub)
    sub.add_argument("--policy", choices=converters.FEEDBACK_POLICIES, default="winner_once")
    cli.add_column_arguments(sub.add_argument_group("columns of --input (full/data/columns.py)"))
    sub = kinds.add_parser("scores-to-pairs", help="scalar scores -> win/lose pairs per caption (paper 000)")
    io_args(sub)
    score_args(sub)
    sub.add_argument("--max_pairs_per_group", type=int)
    sub = kinds.add_parser("scores-to-feedback",
                           help="scalar scores -> desirable iff score >= threshold (paper 001 Sec. 6)")
    io_args(sub)
    score_args(sub)
    sub.add_argument("--threshold", type=float, required=True)
    sub = kinds.add_parser("red-filter", help="the red-filter synthetic user (paper 001 Sec. 6)")
    io_args(sub)
    sub.add_argument("--input_schema", choices=("feedback", "pairs"), default="pairs",
                     help="take the images of a Pick-a-Pic file (both of each pair) or of a feedback file")
    sub.add_argument("--strength", type=float, default=0.5)
    cli.add_column_arguments(sub.add_argument_group("columns of --input (full/data/columns.py)"))
    return parser


def check(args) -> str:
    """`check`: the rows the trainers would read with these flags (the trainers' `DataConfig`)."""
    return converters.check_dataset(cli.config(DataConfig, args, dataset_split_name=args.split,
                                               max_train_samples=args.max_rows))


def convert(args) -> str:
    if args.kind.startswith("scores-"):
        columns = converters.score_columns(args.image_column, args.caption_column, args.score_column)
    else:
        columns = cli.config(DataConfig, args).columns(getattr(args, "input_schema", "pairs"))
    options = {name: getattr(args, name) for name in ("policy", "threshold", "max_pairs_per_group", "input_schema",
                                                      "strength") if hasattr(args, name)}
    return converters.convert(args.kind, args.input, args.output, split=args.split, max_rows=args.max_rows,
                              columns=columns, **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(cli.cli_argv(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        line = check(args) if args.command == "check" else convert(args)
    except cli.INPUT_ERRORS as error:  # bad input: one line, no traceback
        print(f"full.data: error: {error}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
