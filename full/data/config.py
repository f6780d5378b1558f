"""`DataConfig`: where a trainer's rows come from and how an image becomes a training tensor.

An entry point parses its flags once and builds this (`full.cli.config(DataConfig, args)`: each field is read
from the flag of the same name); everything in `full/data` takes it, never the parsed command line. The column
flags become a `ColumnMap` per schema here, so the readers see canonical names (docs/conventions.md §10).
"""

from __future__ import annotations

from dataclasses import dataclass

from minipref.methods import get_method
from full.data.columns import ColumnMap, column_map


@dataclass(frozen=True)
class DataConfig:
    dataset_name: str | None = None
    dataset_split_name: str = "train"
    data_format: str = "auto"  # "pairs" | "feedback" | "auto" (detected from the columns)
    max_train_samples: int | None = None  # rows read from the source
    keep_ties: bool = False
    feedback_policy: str = "winner_once"  # pairs -> per-image labels (full.data.converters.FEEDBACK_POLICIES)
    # the source's column names (None: the canonical name), as `full/data/columns.py` describes them
    caption_column: str | None = None
    image_column: str | None = None
    pair_image_columns: tuple[str, str] | None = None
    label_column: str | None = None
    # an image as a tensor
    resolution: int | None = None
    random_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0
    seed: int = 0
    # the loader
    train_batch_size: int = 1
    dataloader_num_workers: int = 0
    streaming: bool = False
    shuffle_buffer_size: int | None = None
    method: str = "dpo"  # the method-table row the rows are for (which rows it keeps; named in messages)

    def columns(self, schema: str) -> ColumnMap:
        """The `ColumnMap` of ``schema`` ("pairs" or "feedback") from the column flags."""
        return column_map(schema, caption=self.caption_column, image=self.image_column,
                          pair_images=self.pair_image_columns, label=self.label_column)

    @property
    def desirable_only(self) -> bool:
        """The row trains on desirable images only (SFT): the other images are not worth a forward."""
        return get_method(self.method).trains_on == "desirable"
