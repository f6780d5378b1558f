"""Checking a table's rows at launch without reading their images: what the Arrow table says (labels, captions, the
image columns' types and lengths) for every row, and the image headers from a check stored next to the table.

A launch used to parse both image headers of every row (the JPEG bytes copied out of the memory-mapped table), so
its cost grew with the data: a full read of Pick-a-Pic v2 in every process of every launch. Now:

* `checked_rows` reads the label and caption columns and the offsets of the image columns (never their bytes), an
  Arrow chunk at a time, and reports a malformed row with its row id and reason as before;
* `image_check` gives the rows whose bytes are not an image (`looks_like_image`, a header parse, no decode) from
  ``<table>.check.json`` next to the converted table: the parquet conversion writes it in the same pass
  (`full.data.tables._convert_parquet`); a table without one (a Hub download, an image folder, a table converted by
  an older version) is checked by the first process that loads it, under a file lock, and the result is stored, so
  the other processes of the launch and every later launch read it instead of the images. It is keyed like the
  table: a changed source is a new table, with a new check.

What a header parse cannot see (truncated data) is caught when the item is drawn and decoded (`full.data.images`),
warned about with its row id and totalled at the end of the run, as before.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CHUNK_ROWS = 65536  # rows per Arrow chunk of the cheap checks: a few MB of labels and offsets at a time
CHECK_FORMAT = 1
SCHEMAS = {  # label column, its allowed values, the reason a row with another label is skipped, image columns
    "pairs": ("label_0", (0.0, 0.5, 1.0), "bad label_0 (not 0, 0.5 or 1)", ("jpg_0", "jpg_1")),
    "feedback": ("label", (0.0, 1.0), "bad label (not 0/1 or a bool)", ("image",)),
}


def looks_like_image(data) -> bool:
    """Cheap check: PIL parses the header only (no decode). Truncated data passes and is caught when the dataset
    decodes it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width > 0 and image.height > 0
    except Exception:
        return False


def _is_binary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_image_struct(t) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


# ----------------------------------------------------------------------------------------------
# The stored check: image headers, one pass per table
# ----------------------------------------------------------------------------------------------


def bad_image_rows(column, first_row_id: int) -> list[int]:
    """Row ids of the values of a binary (or Hub Image struct) Arrow column that hold bytes which are not an image.
    Values without bytes are left to `checked_rows` (empty, null, a missing file); a struct's path is read."""
    if not (_is_binary(column.type) or _is_image_struct(column.type)):
        return []  # not image bytes at all: `checked_rows` rejects every row of such a column
    bad = []
    for start in range(0, len(column), 64):  # 64 values in Python at a time
        for i, value in enumerate(column.slice(start, 64).to_pylist(), start):
            if isinstance(value, dict):  # a Hub Image struct: its bytes, else the file its path names
                path = value.get("path")
                value = value.get("bytes") or (Path(path).read_bytes() if path and Path(path).is_file() else None)
            if value and not looks_like_image(value):
                bad.append(first_row_id + i)
    return bad


def check_path(files: list[str]) -> Path:
    """Where the check of the table in ``files`` (its Arrow cache files) is kept: ``KEY.check.json`` next to a
    converted parquet source's ``KEY.arrow``; for other tables (a Hub download, an image folder) a file named by
    the cache files' paths, sizes and modification times in the same directory."""
    import hashlib

    from full.data.tables import converted_directory

    first = Path(files[0])
    if len(files) == 1 and first.parent == converted_directory():
        return first.with_suffix(".check.json")
    stats = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    return converted_directory() / f"{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:20]}.check.json"


def write_check(path: Path, rows: int, columns: dict[str, list[int]]) -> None:
    """Write the check atomically: a reader sees the previous file or this one, never half of one."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"format": CHECK_FORMAT, "rows": rows, "checked": "image headers (PIL, no decode)",
                                   "columns": columns}))
    os.replace(partial, path)


def _read_check(path: Path) -> dict | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("format") == CHECK_FORMAT else None


def _check_files(files: list[str], sources: list[str]) -> tuple[int, dict[str, list[int]]]:
    """One pass over the Arrow files (memory-mapped, a record batch at a time): the bad rows of ``sources``."""
    import pyarrow as pa

    found, row = {s: [] for s in sources}, 0
    for file in files:
        with pa.memory_map(file) as source:
            for batch in pa.ipc.open_stream(source):
                for name in sources:
                    found[name] += bad_image_rows(batch.column(name), row)
                row += batch.num_rows
    return row, found


def image_check(dataset, columns: dict[str, str]) -> dict[str, np.ndarray]:
    """``{canonical image column: sorted row ids whose bytes are not an image}`` for the `datasets` table
    ``dataset`` (``columns``: canonical name -> the source's column), from the stored check (see the module doc)."""
    files = [f["filename"] for f in dataset.cache_files]
    sources = sorted(set(columns.values()))
    if not files:  # an in-memory table: nothing to key a stored check by; checked here
        table = dataset.with_format("arrow")[:]
        found = {s: bad_image_rows(table.column(c), 0) for c, s in columns.items()}
    else:
        found = _stored(files, sources, len(dataset))
    return {c: np.asarray(found[s], dtype=np.int64) for c, s in columns.items()}


def _stored(files: list[str], sources: list[str], rows: int) -> dict[str, list[int]]:
    from filelock import FileLock  # a dependency of `datasets`

    path = check_path(files)
    stored = _read_check(path)
    if stored is not None and set(sources) <= set(stored["columns"]) and stored["rows"] >= rows:
        return stored["columns"]
    try:
        with FileLock(str(path) + ".lock"):  # the first process checks, the others wait and read its result
            stored = _read_check(path) or {"rows": 0, "columns": {}}
            missing = [s for s in sources if s not in stored["columns"] or stored["rows"] < rows]
            if missing:
                logger.info("checking the image headers of %s once (columns %s); stored in %s", files[0],
                            ", ".join(missing), path)
                total, found = _check_files(files, missing)
                kept = stored["columns"] if stored["rows"] == total else {}
                write_check(path, total, {**kept, **found})
                stored = _read_check(path)
    except OSError as error:  # a read-only cache: check in this process, every launch
        logger.warning("cannot store the image check next to %s (%s): checking the image headers in this process",
                       files[0], error)
        return _check_files(files, sources)[1]
    return stored["columns"]


# ----------------------------------------------------------------------------------------------
# The cheap checks: labels, captions, the image columns' types and lengths, an Arrow chunk at a time
# ----------------------------------------------------------------------------------------------


def _mask(values) -> np.ndarray:
    """A writable bool array from an Arrow boolean result (nulls: False)."""
    import pyarrow.compute as pc

    return np.array(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _labels(column, allowed) -> tuple[np.ndarray, np.ndarray]:
    """(the labels as floats, NaN where not a number; whether each is allowed). A bool is 0 or 1, as before."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        return np.full(len(column), np.nan), np.zeros(len(column), dtype=bool)  # text, decimals, ...: not a label
    values = pc.fill_null(column.cast(pa.float64(), safe=False), float("nan")).to_numpy(zero_copy_only=False)
    return values, np.isin(values, allowed)


@cache
def whitespace() -> str:
    """What Python's str.strip() strips: a caption of these only is empty (`full.data.sources.is_empty_caption`).
    Computed once, when captions are first checked (a scan of every code point: ~0.1 s, not at import)."""
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def _captions(column) -> tuple[np.ndarray, np.ndarray]:
    """(the caption is text; it is empty or whitespace only)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_string_view(t):
        column, t = column.cast(pa.large_string()), pa.large_string()
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return np.zeros(len(column), dtype=bool), np.zeros(len(column), dtype=bool)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim(column, characters=whitespace())), 0)
    return _mask(column.is_valid()), _mask(empty)


def _non_empty(values) -> np.ndarray:
    """Which binary or string values are non-empty (null: no), from their offsets: the bytes are not read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_null(values.type):  # a field that is null in every row (an image folder's bytes)
        return np.zeros(len(values), dtype=bool)
    return _mask(pc.greater(pc.binary_length(values), 0))


def _image_column(column) -> tuple[np.ndarray, dict[int, str]]:
    """(the value holds no image bytes, ``{index: path}`` of the values naming a file that does not exist). Only
    lengths, validity and paths are read: never the bytes."""
    import pyarrow.compute as pc

    if _is_binary(column.type):
        return ~_non_empty(column), {}
    if not _is_image_struct(column.type):
        return np.ones(len(column), dtype=bool), {}  # a string, a number, ...: no bytes in it
    has = _non_empty(pc.struct_field(column, "bytes"))
    missing = {}
    if column.type.get_field_index("path") >= 0:  # no bytes but a path (an image folder): the file is the image
        paths = pc.struct_field(column, "path")
        named = np.flatnonzero(~has & _non_empty(paths))
        for i, path in zip(named, paths.take(named).to_pylist()):
            if Path(path).is_file():
                has[i] = True
            else:
                missing[int(i)] = path
    no_bytes = ~has
    no_bytes[list(missing)] = False  # reported as a missing file instead
    return no_bytes, missing


def checked_rows(table, schema: str, report, bad_images: dict[str, np.ndarray]):
    """``(row_ids, labels, empty_caption)`` of the rows of the `datasets` table ``table`` (canonical columns of
    ``schema``) that pass; every other row is reported to ``report`` with its id and its first reason, in row order
    and as `full.data.sources.checked_pair_label` orders them: the label, the caption, a missing file, image bytes
    (empty, or in ``bad_images``: the stored header check, `image_check`)."""
    label_name, allowed, label_reason, image_columns = SCHEMAS[schema]
    kept, start = [], 0
    for chunk in table.with_format("arrow").iter(batch_size=CHUNK_ROWS):
        n = chunk.num_rows
        ids = np.arange(start, start + n, dtype=np.int64)
        label_column, caption_column = chunk.column(label_name), chunk.column("caption")
        labels, label_ok = _labels(label_column, allowed)
        caption_ok, empty = _captions(caption_column)
        images = [_image_column(chunk.column(c)) for c in image_columns]
        good = label_ok & caption_ok
        missing = np.zeros(n, dtype=bool)
        for _, paths in images:
            missing[list(paths)] = True
        missing &= good
        unreadable = [no_bytes | np.isin(ids, bad_images.get(c, ())) for c, (no_bytes, _) in zip(image_columns, images)]
        unreadable_any = np.logical_or.reduce(unreadable) & good & ~missing
        ok = good & ~missing & ~unreadable_any
        for i in map(int, np.flatnonzero(~ok)):  # the malformed rows (few, normally): one by one, in row order
            row_id = start + i
            if not label_ok[i]:
                report.skip(row_id, label_reason, f": {label_column[i].as_py()!r}")
            elif not caption_ok[i]:
                report.skip(row_id, "caption not a string", f": {type(caption_column[i].as_py()).__name__}")
            elif missing[i]:
                report.skip(row_id, "missing file", f" {' and '.join(p[i] for _, p in images if i in p)}")
            else:
                report.skip(row_id, "unreadable image bytes",
                            f": {' and '.join(c for c, bad in zip(image_columns, unreadable) if bad[i])}")
        kept.append((ids[ok], labels[ok], empty[ok]))
        start += n
    if not kept:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=bool)
    return tuple(np.concatenate(parts) for parts in zip(*kept))
