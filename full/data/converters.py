"""Converters: other feedback -> the two training schemas, and their CLI (`python -m full.data convert ...`).

pairs -> per-image feedback (Diffusion-KTO), scalar scores -> pairs or feedback, and the red-filter synthetic user
(paper 001 Sec. 6); `python -m full.data check` loads a dataset as the trainers would (the same schema detection and
column flags) and decodes every image, so the count it prints is what training uses.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from full.data.columns import ColumnMap
from full.data.config import DataConfig
from full.data.sources import (as_image_bytes, checked_caption_and_images, is_empty_caption, iter_source,
                               load_feedback_rows, load_pair_rows, note_empty_caption, row_ids_text, RowReport)

logger = logging.getLogger(__name__)

FEEDBACK_POLICIES = ("winner_once", "always_win")


def image_key(data: bytes) -> str:
    """An image's identity across rows: the SHA-256 of its encoded bytes (Pick-a-Pic repeats the
    same generated image in several comparisons, byte for byte)."""
    return hashlib.sha256(data).hexdigest()


def pairs_to_feedback(rows: Sequence[dict], policy: str = "winner_once") -> list[dict]:
    """Per-image binary feedback from pairwise comparisons, as Diffusion-KTO builds it from Pick-a-Pic.

    Paper 001 (Diffusion-KTO), App. 0.C.1 "Data Partitioning" names two options; counting for each
    distinct image (by content hash) its wins and losses over the non-tie comparisons it is in:

    * ``"winner_once"`` (the paper's choice, Sec. 5.1.1 and App. 0.A): desirable if it was preferred
      in at least one comparison, undesirable if it was always the non-preferred one.
    * ``"always_win"``: desirable only if it won every comparison it is in ("always preferred"),
      every other image undesirable. Applied to :func:`scores_to_pairs` output this is our reading
      of paper 000's "exclusive_win" labels (Sec. 3.1.3 and 4.1).

    Rows are :func:`load_pair_rows` rows (``winner``, ``loser``, ``caption``, optional ``tie``).
    Ties decide nothing: they are skipped, and an image seen only in ties gets no label (the paper
    does not say; its Pick-a-Pic counts exclude ties). An image keeps the caption (and ``row_id``,
    when the input rows have one) of its first row. Returns rows ``{"image", "caption", "label",
    "wins", "losses"[, "row_id"]}`` in order of first appearance.
    """
    if policy not in FEEDBACK_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {FEEDBACK_POLICIES}")
    stats: dict[str, dict] = {}
    for row in rows:
        if row.get("tie", False):
            continue
        for data, won in ((row["winner"], True), (row["loser"], False)):
            entry = stats.setdefault(image_key(data), {"image": data, "caption": row["caption"], "wins": 0, "losses": 0})
            if "row_id" in row:
                entry.setdefault("row_id", row["row_id"])  # the first row the image appears in
            entry["wins" if won else "losses"] += 1
    feedback = []
    for entry in stats.values():
        desirable = entry["wins"] > 0 if policy == "winner_once" else entry["wins"] > 0 and entry["losses"] == 0
        feedback.append({**entry, "label": int(desirable)})
    return feedback


def _pair_row(caption: str, winner: bytes, loser: bytes) -> dict:
    """A Pick-a-Pic row; the winner's slot (jpg_0 or jpg_1) is a deterministic coin flip of the two
    hashes, so neither slot carries the label (a position bias a reward model could learn)."""
    winner_first = int(hashlib.sha256((image_key(winner) + image_key(loser)).encode()).hexdigest(), 16) % 2 == 0
    jpg_0, jpg_1 = (winner, loser) if winner_first else (loser, winner)
    return {"caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1,
            "label_0": 1.0 if winner_first else 0.0, "label_1": 0.0 if winner_first else 1.0}


def scores_to_pairs(rows: Sequence[dict], max_pairs_per_group: int | None = None) -> list[dict]:
    """Deterministic win/lose pairs from scalar scores (paper 000, Sec. 4.1: "the dataset's built-in
    aesthetic scalar score ... converted into deterministic win/lose labels").

    ``rows``: ``{"image": bytes, "caption": str, "score": float}``. Images are compared only within
    a caption (a preference is a statement about one prompt); every two images whose scores differ
    make a pair, the higher score wins; equal scores are ties and skipped. ``max_pairs_per_group``
    keeps the pairs with the largest score gaps (a caption with n images has n(n-1)/2 pairs).
    The output order and orientation depend only on the data, never on a random seed.
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        score = row["score"]
        if not isinstance(score, (int, float)) or math.isnan(score):
            raise ValueError(f"score must be a number, got {score!r} (caption {row['caption']!r})")
        groups.setdefault(row["caption"], []).append(row)
    pairs = []
    for caption, group in groups.items():
        # Sort by score, then by hash, so the pair list is independent of the input order.
        group = sorted(group, key=lambda r: (-r["score"], image_key(r["image"])))
        candidates = [(group[i]["score"] - group[j]["score"], i, j)
                      for i in range(len(group)) for j in range(i + 1, len(group))
                      if group[i]["score"] > group[j]["score"]]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        for _, i, j in candidates[:max_pairs_per_group]:
            pairs.append(_pair_row(caption, group[i]["image"], group[j]["image"]))
    return pairs


def scores_to_feedback(rows: Sequence[dict], threshold: float) -> list[dict]:
    """Binary feedback by a score threshold: paper 001 Sec. 6's "aesthetics" synthetic user calls
    images with an aesthetic score of 7 or more desirable, the rest undesirable (the comparison
    sign is lost in our text of the paper; we read it as >=)."""
    return [{"image": row["image"], "caption": row["caption"], "label": int(row["score"] >= threshold)}
            for row in rows]


def red_filter(image: Image.Image, strength: float = 0.5) -> Image.Image:
    """Raise the red channel towards 255 by ``strength``: ``R' = R + strength * (255 - R)``,
    green and blue untouched. Unlike a gain on R this also reddens dark pixels."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    array[..., 0] += strength * (255.0 - array[..., 0])
    return Image.fromarray(array.round().clip(0, 255).astype(np.uint8))


def redness(data: bytes) -> float:
    """Mean of ``R - (G + B) / 2`` over pixels, divided by 255: in [-1, 1], higher is redder. The
    measure to score a red-filter-aligned model's samples with."""
    with Image.open(io.BytesIO(data)) as raw:
        array = np.asarray(raw.convert("RGB"), dtype=np.float32) / 255.0
    return float((array[..., 0] - (array[..., 1] + array[..., 2]) / 2).mean())


def _encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def red_filter_feedback(images: Sequence[dict], strength: float = 0.5) -> list[dict]:
    """The red-filter synthetic user of paper 001 (Diffusion-KTO), Sec. 6: "we use (image, caption)
    pairs from the Pick-a-Pic v2 training set and enhance the red channel values to generate desired
    samples (original images are considered undesirable)".

    For each distinct image (``{"image", "caption"}`` rows, deduplicated by content hash) emit the
    red-filtered copy with label 1 and the original with label 0, same caption. The paper gives no
    amount; ``strength`` 0.5 is our choice. Both copies go through the same decode / JPEG (q=95)
    encode, so the red channel is the only difference a model can learn. Undecodable images are
    reported with their row id and skipped.
    """
    feedback, seen = [], set()
    for row_id, row in enumerate(images):
        key = image_key(row["image"])
        if key in seen:
            continue
        seen.add(key)
        try:
            with Image.open(io.BytesIO(row["image"])) as raw:
                original = raw.convert("RGB")
        except Exception as error:
            logger.warning("red filter: skipping row %d: cannot decode image (%s)", row_id, error)
            continue
        feedback.append({"image": _encode_jpeg(red_filter(original, strength)), "caption": row["caption"], "label": 1})
        feedback.append({"image": _encode_jpeg(original), "caption": row["caption"], "label": 0})
    return feedback


# ----------------------------------------------------------------------------------------------
# CLI: python -m full.data convert {pairs-to-feedback,scores-to-pairs,scores-to-feedback,red-filter} / check
# ----------------------------------------------------------------------------------------------


def _load_scored_rows(dataset_name: str, split: str, columns: ColumnMap, max_rows: int | None) -> list[dict]:
    """``{"image", "caption", "score"}`` rows from any table with those three columns (``columns``: their names in
    the source), checked as the trainers check rows."""
    report, rows = RowReport(dataset_name), []
    for row_id, row in iter_source(dataset_name, split, columns, max_rows):
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
            report.skip(row_id, "score not a number", f": {score!r}")
        elif checked_caption_and_images(row, row_id, report, ("image",)):
            note_empty_caption(row, row_id, report)
            rows.append({"image": as_image_bytes(row["image"]), "caption": row["caption"], "score": float(score)})
    if not rows:
        raise ValueError(f"no usable rows in {dataset_name}: {report.summary()}")
    report.warn_kept()
    return rows


def score_columns(image: str = "image", caption: str = "caption", score: str = "score") -> ColumnMap:
    """The scored converters' columns; a name other than the default is reported as the flag that set it."""
    names = {"image": image, "caption": caption, "score": score}
    return ColumnMap(names, [name for name, source in names.items() if source != name],
                     flags={"score": "--score_column"})


def check_output(path: str | Path) -> Path:
    """Fail in one line before a conversion whose result could not be written: ``--output`` is a directory, lies
    under a file, or where it would go is not writable. Nothing is created here (a failed conversion leaves no
    empty directory behind); `write_parquet` creates the missing directories."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory: give the parquet file to write")
    existing = path.parent
    while not existing.exists():  # the directories write_parquet will create: the nearest existing one must allow it
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output {path}: {existing} is a file, not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"--output {path}: the file exists and is not writable")
    if not path.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: cannot create files in {existing} (permission denied or read-only)")
    return path


def write_parquet(rows: Sequence[dict], path: str | Path) -> Path:
    """Write dict rows with pyarrow; ``bytes`` columns become ``binary`` as in Pick-a-Pic's parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise ValueError(f"nothing to write to {path}: the conversion produced no rows")
    path = Path(path)
    columns = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        columns[name] = pa.array(values, type=pa.binary() if isinstance(values[0], bytes) else None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), path, row_group_size=1024)
    except OSError as error:  # a disk that filled up, a permission `check_output` could not foresee
        raise ValueError(f"cannot write {path}: {error}") from error
    return path


def _summary(rows: Sequence[dict], label: str = "label") -> str:
    positive = sum(int(row[label]) for row in rows)
    return f"{len(rows)} rows ({positive} desirable, {len(rows) - positive} undesirable)"


def _decode_all(dataset, threads: int, chunk: int = 256) -> tuple[list[dict], list[int]]:
    """Every item of a `PairDataset` / `FeedbackDataset` as training makes it (the same decode; PIL releases the GIL,
    so threads decode at once): ``({"row_id", "caption", "desirable"?} of the items that decode, row ids of those
    that do not)``. Rows are read in this thread, a chunk at a time: only the small fields of an item are kept."""
    from concurrent.futures import ThreadPoolExecutor

    usable, undecodable = [], []
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(dataset.rows), chunk):
            rows = [dataset.rows[i] for i in range(start, min(start + chunk, len(dataset.rows)))]
            for row, item in zip(rows, pool.map(lambda row: dataset.prepare(row, row["row_id"]), rows)):
                if item is None:  # warned with its row id by the dataset, as in training
                    undecodable.append(row["row_id"])
                else:
                    usable.append({k: item[k] for k in ("row_id", "caption", "desirable") if k in item})
    return usable, undecodable


def check_dataset(data: DataConfig) -> str:
    """`python -m full.data check`: the rows a trainer would train on, as one line. The schema is detected as the
    trainer detects it (`full.data.rows.source_format`, unless --data_format is given), the column flags are the
    trainer's, and every image is decoded as the training datasets decode it, so the count is what training uses."""
    from full.data.images import FeedbackDataset, PairDataset
    from full.data.rows import source_format

    fmt = source_format(data)
    columns = data.columns(fmt)
    if fmt == "pairs":
        rows = load_pair_rows(data.dataset_name, data.dataset_split_name, keep_ties=data.keep_ties, max_rows=data.max_train_samples,
                              columns=columns)
        dataset = PairDataset(rows, CHECK_RESOLUTION)
    else:
        rows = load_feedback_rows(data.dataset_name, data.dataset_split_name, max_rows=data.max_train_samples, columns=columns)
        dataset = FeedbackDataset(rows, CHECK_RESOLUTION)
    usable, undecodable = _decode_all(dataset, threads=min(8, os.cpu_count() or 1))
    notes = [f"{len(undecodable)} more skipped as training skips them: an image does not decode "
             f"({row_ids_text(undecodable[:20], len(undecodable))})"] if undecodable else []
    if not usable:  # the loader has raised already when no row loads: here every row that loads failed to decode
        raise ValueError(f"no usable rows in {data.dataset_name}: every row that loads was skipped; {notes[0]}")
    if fmt == "pairs":
        counted = f"{len(usable)} usable pairs"
    else:
        desirable = sum(item["desirable"] for item in usable)
        counted = f"{len(usable)} usable images ({desirable} desirable, {len(usable) - desirable} undesirable)"
    detected = ", detected as the trainers detect it" if data.data_format == "auto" else ""
    empty = [item["row_id"] for item in usable if is_empty_caption(item["caption"])]
    if empty:
        notes.append(f"{len(empty)} of them with an empty caption ({row_ids_text(empty[:20], len(empty))}): they "
                     "train as unconditional")
    return "; ".join([f"{data.dataset_name} ({fmt}{detected}): {counted}", *notes])


CHECK_RESOLUTION = 8  # `check` decodes every image as training does; the resize after the decode is to a tiny size


def convert(kind: str, input: str, output: str, *, split: str = "train", max_rows: int | None = None,
            columns: ColumnMap | None = None, policy: str = "winner_once", threshold: float | None = None,
            max_pairs_per_group: int | None = None, input_schema: str = "pairs", strength: float = 0.5) -> str:
    """`python -m full.data convert KIND ...`: the output is checked first, then converted and written; the line to
    print. ``columns``: the input's columns (`column_map` for pairs and feedback, `score_columns` for scores)."""
    check_output(output)
    if kind == "pairs-to-feedback":
        out = pairs_to_feedback(load_pair_rows(input, split, max_rows=max_rows, columns=columns), policy)
    elif kind in ("scores-to-pairs", "scores-to-feedback"):
        scored = _load_scored_rows(input, split, columns or score_columns(), max_rows)
        out = (scores_to_pairs(scored, max_pairs_per_group) if kind == "scores-to-pairs"
               else scores_to_feedback(scored, threshold))
    elif kind == "red-filter":
        if input_schema == "pairs":
            images = [{"image": r[key], "caption": r["caption"]}
                      for r in load_pair_rows(input, split, max_rows=max_rows, columns=columns)
                      for key in ("winner", "loser")]
        else:
            images = load_feedback_rows(input, split, max_rows=max_rows, columns=columns)
        out = red_filter_feedback(images, strength)
    else:
        raise ValueError(f"unknown conversion {kind!r}; choose from pairs-to-feedback, scores-to-pairs, "
                         "scores-to-feedback, red-filter")
    path = write_parquet(out, output)
    return f"wrote {path}: " + (f"{len(out)} pairs" if kind == "scores-to-pairs" else _summary(out))
