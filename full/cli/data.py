"""The command-line flags of the trainers that read a dataset: the image data (size, augmentation, caption
dropout), the columns of --dataset_name, and --streaming. Parsing and checks that need no file live here; the
readers in `full/data/` take the parsed values."""

from __future__ import annotations

import argparse

from minipref.methods import get_method

from full.cli.checks import check_positive, check_range, check_resolution


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
    check_resolution(p, args)
    check_positive(p, args, ("max_train_samples",))
    check_range(p, args, "caption_dropout", 0, 1)
    if args.dataloader_num_workers < 0:
        p.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")


def add_column_arguments(group) -> None:
    """The column flags, into an argparse group (the trainers that read images: offline, SPIN)."""
    a = group.add_argument
    a("--caption_column", default=None, help="column of the prompt (default: caption)")
    a("--image_column", default=None, help="binary feedback: column of the image (default: image)")
    a("--pair_image_columns", nargs=2, default=None, metavar=("FIRST", "SECOND"),
      help="pairs: the two image columns, in the order of the label (default: jpg_0 jpg_1)")
    a("--label_column", default=None,
      help="pairs: 1 if the first image won, 0 the second, 0.5 a tie (default: label_0); binary feedback: "
           "1 desirable, 0 undesirable (default: label)")


def add_streaming_arguments(group) -> None:
    a = group.add_argument
    a("--streaming", action="store_true",
      help="read --dataset_name (local parquet or a Hub name) as a shuffled stream instead of converting it into an "
           "Arrow table first; resume skips ahead (docs/scaling.md)")
    a("--shuffle_buffer_size", type=int, default=None,
      help="--streaming: rows held for the shuffle (default 1000; each holds its encoded images)")


def check_streaming_arguments(parser, args) -> None:
    """What a stream cannot do, at parse time: each needs the whole table before the first step."""
    if args.shuffle_buffer_size is not None and not args.streaming:
        parser.error("--shuffle_buffer_size applies to --streaming")
    if not args.streaming:
        return
    if args.shuffle_buffer_size is None:
        args.shuffle_buffer_size = 1000
    if args.shuffle_buffer_size <= 0:
        parser.error(f"--shuffle_buffer_size must be positive, got {args.shuffle_buffer_size}")
    needs_table = {"cached_dir": "--cached_dir is a latent cache on disk, not a stream",
                   "num_train_epochs": "a stream has no length: give --max_train_steps",
                   "desirable_ratio": "--desirable_ratio draws desirable and undesirable images at random from the "
                                      "whole table",
                   "embedding_column": "Diff-contrast's embeddings are looked up by row id in a table"}
    for flag, reason in needs_table.items():
        if getattr(args, flag, None):
            parser.error(f"--streaming cannot be used with --{flag}: {reason}; drop --streaming")
    if get_method(args.method).needs_embeddings:
        parser.error("--streaming cannot be used with --method contrast: its CLIP embeddings are computed for every "
                     "pair before training; drop --streaming, or build a --cached_dir")
