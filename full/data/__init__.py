"""Preference data for the full-scale trainers: where rows come from, how images become tensors, in what order.

config.py      `DataConfig`: the data flags as one typed value (what every reader below takes)
tables.py      where rows come from: parquet file / directory / image folder / Hub dataset, as a memory-mapped table
columns.py     the column flags (--caption_column, --image_column, ...): a source's names -> the canonical ones
streaming.py   `full.train --streaming`: checked, decoded items of the stream; its place in each checkpoint
stream_source.py  the stream's rows: the parquet files shuffled per epoch and shared out, resumable from a place
sources.py     checked pair or feedback rows (bad rows named), lazily over the table (`LazyRows`)
checks.py      the launch's checks without the images: Arrow columns, and image headers stored next to the table
allocators.py  the allocator settings the readers run with (the launcher sets them; the benchmark measures them)
rows.py        the rows one offline method trains on (pairs, or per-image feedback converted from pairs)
images.py      decode, crop, flip: torch datasets of pairs and single images; `collate_skip_none`
samplers.py    per-epoch orders that are the same on every process and after a resume
embeddings.py  Diff-contrast's CLIP embeddings f(y, x)
cache.py       precomputed latents and prompt embeddings (`python -m full.cache`, then `--cached_dir`)
cache_build.py building a cache: shards per process, written atomically, resumable (`python -m full.cache`)
converters.py  other feedback -> the two schemas, and the dataset check (their command line: full/data_commands.py)
bench.py       the data benchmark (`python -m full.bench --data`): start-up, rows/s and memory against the rows

The names below are the public API; modules inside `full/` import from the files directly.
"""

from full.data.converters import (FEEDBACK_POLICIES, image_key, pairs_to_feedback, red_filter,
                                  red_filter_feedback, redness, scores_to_feedback, scores_to_pairs, write_parquet)
from full.data.images import FeedbackDataset, PairDataset, collate_skip_none
from full.data.samplers import DesirableRatioSampler, EpochShuffleSampler
from full.data.sources import FEEDBACK_COLUMNS, PAIR_COLUMNS, detect_format, load_feedback_rows, load_pair_rows

__all__ = ["FEEDBACK_POLICIES", "image_key", "pairs_to_feedback", "red_filter", "red_filter_feedback",
           "redness", "scores_to_feedback", "scores_to_pairs", "write_parquet", "FeedbackDataset", "PairDataset",
           "collate_skip_none", "DesirableRatioSampler", "EpochShuffleSampler", "FEEDBACK_COLUMNS", "PAIR_COLUMNS",
           "detect_format", "load_feedback_rows", "load_pair_rows"]
