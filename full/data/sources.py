"""Reading preference data: a parquet file, a directory of parquet files, or a Hub dataset, as checked rows.

Two schemas reach the trainers (docs/conventions.md §10):

* **pairs** (Diffusion-DPO, Diff-contrast, DSPO, SFT on winners): the Pick-a-Pic v2 schema of
  Kirstain et al., one row per comparison, ``jpg_0, jpg_1`` (JPEG bytes, or the Hub's
  ``{"bytes": ..., "path": ...}`` Image struct), ``label_0`` (1: ``jpg_0`` won, 0: ``jpg_1`` won,
  0.5: tie) and ``caption``. Ties carry no preference and are dropped by default, as the
  Diffusion-DPO training code does.
* **binary feedback** (Diffusion-KTO, BCE, CSFT): ``image, caption, label`` with label 1 for a
  desirable and 0 for an undesirable image (paper 001, Sec. 4: "per-image binary feedback").

Rows come through Hugging Face ``datasets`` as a memory-mapped Arrow table (`open_table`): the trainers keep only
the ids and labels of the usable rows (`LazyRows`) and read an item's image bytes when the item is drawn, so memory
stays flat in the number of rows. `iter_source` streams instead (the cache builder, converters).

Bad data never crashes an epoch: a row whose columns are malformed is reported with its row id when
the rows are loaded and skipped. A source with nothing usable raises ``ValueError`` before training starts. Loading
reads no image bytes (`full.data.checks`): labels, captions and the image columns' lengths come from the Arrow
table, the image headers from a check stored next to the table when it was converted (or first loaded).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from full.data.checks import checked_rows, image_check, looks_like_image
from full.data.columns import ColumnMap, as_column_map
from full.data.tables import is_image_folder, iter_source, open_table  # noqa: F401  (iter_source: re-exported)

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
FEEDBACK_COLUMNS = ("image", "caption", "label")
MAX_REPORTED_ROWS = 20  # individual warnings per load; the rest are only counted


def as_image_bytes(value) -> bytes | None:
    """JPEG bytes from raw ``bytes`` or the Hub Image struct ``{"bytes": ..., "path": ...}``
    (a decoded ``PIL.Image`` from ``datasets`` is re-encoded losslessly as PNG)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path") and Path(value["path"]).is_file():
            value = Path(value["path"]).read_bytes()
        else:
            return None
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    return None


class RowReport:
    """Counts rejected rows by reason and warns about the first few with their row ids. Also counts the rows that are
    kept although worth a word (an empty caption, `note`), with their first ids, for one warning (`warn_kept`)."""

    def __init__(self, name: str):
        self.name, self.counts, self.reported = name, {}, 0
        self.kept: dict[str, list] = {}  # remark -> [rows, their first MAX_REPORTED_ROWS ids]

    def skip(self, row_id: int, reason: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.reported < MAX_REPORTED_ROWS:
            logger.warning("%s: skipping row %d: %s%s", self.name, row_id, reason, detail)
            self.reported += 1

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "no rows rejected"

    def note(self, row_id: int, remark: str) -> None:
        """Count a row that is kept with ``remark`` (a key of `KEPT_REMARKS`)."""
        entry = self.kept.setdefault(remark, [0, []])
        entry[0] += 1
        if len(entry[1]) < MAX_REPORTED_ROWS and row_id not in entry[1]:
            entry[1].append(row_id)

    def note_rows(self, row_ids, remark: str) -> None:
        """`note` for many rows of one pass at once (ids in row order)."""
        if len(row_ids):
            entry = self.kept.setdefault(remark, [0, []])
            entry[0] += len(row_ids)
            entry[1] += [int(i) for i in row_ids[:max(0, MAX_REPORTED_ROWS - len(entry[1]))]]

    def kept_summary(self) -> str:
        """"2 rows have an empty caption (row ids 1, 4): kept, ..." for each remark; "" when there is none."""
        return "; ".join(f"{n} row{'s have' if n != 1 else ' has'} {remark} ({row_ids_text(ids, n)}): "
                         f"{KEPT_REMARKS[remark]}" for remark, (n, ids) in self.kept.items())

    def warn_kept(self, prefix: str = "") -> None:
        if self.kept:
            logger.warning("%s: %s%s", self.name, prefix, self.kept_summary())


EMPTY_CAPTION = "an empty caption"
# What happens to a row kept with a remark. An empty prompt is what caption dropout trains with (classifier-free
# guidance), so such a row is legitimate; it is named because it may also be a hole in the data.
KEPT_REMARKS = {EMPTY_CAPTION: "kept, they train as unconditional (with the empty prompt, as the captions that "
                               "caption dropout drops)"}


def row_ids_text(ids: Sequence[int], n: int) -> str:
    """"row id 3", "row ids 1, 4", or "row ids 1, 4, ... (the first 20 of 35)"."""
    listed = ", ".join(str(i) for i in ids)
    if n > len(ids):
        return f"row ids {listed}, ... (the first {len(ids)} of {n})"
    return f"row id{'s' if len(ids) != 1 else ''} {listed}"


def is_empty_caption(caption: str) -> bool:
    """Blank or whitespace only: the tokenizer makes the empty prompt of it."""
    return not caption.strip()


def note_empty_caption(row: dict, row_id: int, report: RowReport) -> None:
    """Count a usable row whose caption is empty (call it once the row is known to be kept)."""
    if is_empty_caption(row["caption"]):
        report.note(row_id, EMPTY_CAPTION)


def _caption_or_skip(row: dict, row_id: int, report) -> str | None:
    """The row's caption, or None after reporting the row as skipped (a caption must be text)."""
    caption = row["caption"]
    if not isinstance(caption, str):
        report.skip(row_id, "caption not a string", f": {type(caption).__name__}")
        return None
    return caption


def missing_file(value) -> str | None:
    """The path of an image folder's row whose file does not exist (`datasets` keeps ``{"bytes": None, "path"}``
    for it), else None."""
    if isinstance(value, dict) and not value.get("bytes") and value.get("path") and not Path(value["path"]).is_file():
        return str(value["path"])
    return None


def _images_or_skip(row: dict, row_id: int, report: RowReport, columns: Sequence[str]) -> bool:
    """True when every image column holds image bytes; else the row is reported (a missing file by its name)."""
    missing = [path for path in map(missing_file, (row[c] for c in columns)) if path]
    if missing:
        report.skip(row_id, "missing file", f" {' and '.join(missing)}")
        return False
    bad = check_image_columns(row, columns)
    if bad:
        report.skip(row_id, "unreadable image bytes", f": {' and '.join(bad)}")
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Checked rows over a memory-mapped Arrow table: only row ids and labels stay in memory
# ----------------------------------------------------------------------------------------------


class LazyRows(Sequence):
    """The checked rows of a source, built on access from the memory-mapped table.

    What stays in memory is one int64 row id per usable row plus its small per-row fields (labels, which column
    holds the winner): about 10 bytes a row, 10 MB for Pick-a-Pic v2's million pairs, instead of the images.
    ``rows[i]`` reads row ``row_ids[i]`` from the table and ``build`` turns it into the dict the datasets expect;
    a slice is another `LazyRows` over the same table.
    """

    def __init__(self, table, row_ids, fields: dict, build):
        import numpy as np

        self.table, self.row_ids, self.build = table, np.asarray(row_ids, dtype=np.int64), build
        self.fields = {name: np.asarray(values) for name, values in fields.items()}

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyRows(self.table, self.row_ids[index], {k: v[index] for k, v in self.fields.items()},
                            self.build)
        row_id = int(self.row_ids[index])
        return self.build(self.table[row_id], row_id, {k: v[index].item() for k, v in self.fields.items()})

    def subset(self, keep) -> "LazyRows":
        """The rows where the boolean array ``keep`` is True."""
        return LazyRows(self.table, self.row_ids[keep], {k: v[keep] for k, v in self.fields.items()}, self.build)

    def column(self, name: str):
        """A per-row field for all rows at once (e.g. the labels for a sampler), without reading the table."""
        return self.fields[name]


def _checked_table(dataset_name, split, columns, default, max_rows, schema) -> tuple:
    """The table, its report, and the ids, labels and empty-caption flags of its rows that pass (`checked_rows`)."""
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    columns = as_column_map(columns or default)
    table = open_table(dataset_name, split, columns, max_rows)
    report = RowReport(dataset_name)
    image_columns = ("jpg_0", "jpg_1") if schema == "pairs" else ("image",)
    bad_images = image_check(table, {c: columns[c] for c in image_columns})
    return (table, report, *checked_rows(table, schema, report, bad_images))


def pair_item(raw: dict, row_id: int, fields: dict) -> dict:
    """A checked pair row as the datasets take it; ``fields``: its ``jpg_0_won`` and ``tie``. The table
    (`LazyRows`) and the stream (`full.data.streaming`) both build their rows with it."""
    first, second = as_image_bytes(raw["jpg_0"]), as_image_bytes(raw["jpg_1"])
    winner, loser = (first, second) if fields["jpg_0_won"] else (second, first)
    return {"row_id": row_id, "winner": winner, "loser": loser, "caption": raw["caption"], "tie": fields["tie"]}


def feedback_item(raw: dict, row_id: int, fields: dict) -> dict:
    """A checked feedback row as the datasets take it; ``fields``: its ``desirable``. Shared like `pair_item`."""
    return {"row_id": row_id, "image": as_image_bytes(raw["image"]), "caption": raw["caption"],
            "desirable": fields["desirable"]}


def check_image_columns(row: dict, columns: Sequence[str]) -> list[str]:
    """The columns of ``row`` whose bytes are not an image (a header check, no decode)."""
    bad = []
    for column in columns:
        data = as_image_bytes(row[column])
        if data is None or not looks_like_image(data):
            bad.append(column)
    return bad


def checked_caption_and_images(row: dict, row_id: int, report: RowReport, image_columns: Sequence[str]) -> bool:
    """True when the caption is text and every image column holds an image; else the row is reported (the first
    reason only) and False."""
    return _caption_or_skip(row, row_id, report) is not None and _images_or_skip(row, row_id, report, image_columns)


def checked_pair_label(row: dict, row_id: int, report: RowReport) -> float | None:
    """A pair row's ``label_0`` as 0, 0.5 or 1, or None after reporting the row (a bad label, a caption that is not
    text, an image folder's missing file, image bytes that are not an image). The stream (`full.data.streaming`)
    and the converters check rows with it; the table reader checks the same, column by column
    (`full.data.checks.checked_rows`)."""
    label = row["label_0"]
    if isinstance(label, bool):
        label = float(label)
    if not isinstance(label, (int, float)) or label not in (0, 0.5, 1):
        report.skip(row_id, "bad label_0 (not 0, 0.5 or 1)", f": {label!r}")
        return None
    return float(label) if checked_caption_and_images(row, row_id, report, ("jpg_0", "jpg_1")) else None


def checked_feedback_label(row: dict, row_id: int, report: RowReport) -> bool | None:
    """A feedback row's ``label`` as desirable (True) or not, or None after reporting the row."""
    label = row["label"]
    if not (isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1))):
        report.skip(row_id, "bad label (not 0/1 or a bool)", f": {label!r}")
        return None
    return bool(label) if checked_caption_and_images(row, row_id, report, ("image",)) else None


def load_pair_rows(dataset_name: str, split: str = "train", keep_ties: bool = False,
                   max_rows: int | None = None, columns: ColumnMap | None = None) -> LazyRows:
    """Pick-a-Pic v2 rows as ``{"row_id", "winner", "loser", "caption", "tie"}`` (bytes, bytes, str), lazily.

    ``label_0 == 1`` means ``jpg_0`` won; ``0`` means ``jpg_1`` won; ``0.5`` is a tie, dropped
    unless ``keep_ties`` (then ``jpg_0`` is stored as "winner" and ``tie`` is True). Any other
    label, a missing caption, a missing image file or unreadable image bytes: the row is reported and skipped. An
    empty caption is kept (it trains as unconditional, as --caption_dropout does) and the rows are counted and named.
    ``max_rows`` limits the rows *read* from the source (before filtering). ``columns``: the source's names of the
    columns (`full.data.columns`, the column flags); default the Pick-a-Pic names.

    The checks read labels, captions and the image columns' lengths from the Arrow table, and the image headers from
    the check stored with the table (`full.data.checks`): no image bytes, so a launch costs the same whatever the
    images weigh. What is kept is the row ids and labels (`LazyRows`): memory does not grow with the images
    (docs/scaling.md has the measurements).
    """
    table, report, row_ids, labels, empty = _checked_table(dataset_name, split, columns, PAIR_COLUMNS, max_rows,
                                                           "pairs")
    tie = labels == 0.5
    ties = int(tie.sum())
    if not keep_ties:
        row_ids, labels, empty, tie = row_ids[~tie], labels[~tie], empty[~tie], tie[~tie]
    report.note_rows(row_ids[empty], EMPTY_CAPTION)
    dropped = f"{ties} ties {'kept' if keep_ties else 'dropped'}"
    if not len(row_ids):
        raise ValueError(f"no usable rows in {dataset_name} (split {split!r}): {dropped}, "
                         f"malformed: {report.summary()}")
    logger.info("%s: %d pairs (%s; malformed: %s)", dataset_name, len(row_ids), dropped, report.summary())
    report.warn_kept()
    return LazyRows(table, row_ids, {"jpg_0_won": labels >= 0.5, "tie": tie}, pair_item)


def load_feedback_rows(dataset_name: str, split: str = "train", max_rows: int | None = None,
                       columns: ColumnMap | None = None) -> LazyRows:
    """Binary-feedback rows as ``{"row_id", "image", "caption", "desirable"}``, lazily (`LazyRows`).

    ``label`` is 1/0 or True/False. Other labels, captions that are not strings, a missing image file or unreadable
    image bytes: the row is reported with its id and skipped. Empty captions are kept, counted and named (as pairs).
    """
    table, report, row_ids, labels, empty = _checked_table(dataset_name, split, columns, FEEDBACK_COLUMNS, max_rows,
                                                           "feedback")
    report.note_rows(row_ids[empty], EMPTY_CAPTION)
    desirable = labels == 1.0
    if not len(row_ids):
        raise ValueError(f"no usable rows in {dataset_name} (split {split!r}): malformed: {report.summary()}")
    n_desirable = int(desirable.sum())
    logger.info("%s: %d images (%d desirable, %d undesirable; malformed: %s)", dataset_name, len(row_ids),
                n_desirable, len(row_ids) - n_desirable, report.summary())
    report.warn_kept()
    return LazyRows(table, row_ids, {"desirable": desirable}, feedback_item)


def detect_format(dataset_name: str, pair_columns: Sequence[str] = ("jpg_0", "jpg_1"),
                  image_column: str = "image") -> str:
    """"pairs" or "feedback" from a local source's columns (an image folder is binary feedback); Hub datasets are
    taken as pairs (Pick-a-Pic). ``pair_columns`` / ``image_column``: the source's names (the column flags)."""
    path = Path(dataset_name).expanduser()
    if is_image_folder(path):
        return "feedback"
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if not files:
        return "pairs"
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(files[0]).names)
    except Exception as error:  # not a parquet file, truncated footer, ...
        raise ValueError(f"dataset {dataset_name}: cannot read {files[0]} as parquet ({error})") from error
    if set(pair_columns) & names:
        return "pairs"
    if image_column in names:
        return "feedback"
    raise ValueError(f"{files[0]} has neither the pair columns {list(pair_columns)} (--pair_image_columns) nor "
                     f"the feedback image column {image_column!r} (--image_column); it has {sorted(names)}")
