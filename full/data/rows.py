"""The rows an offline method trains on: preference pairs, or per-image feedback (read as such, or converted from
pairs per image as Diffusion-KTO does with Pick-a-Pic, paper 001 App. C.1)."""

from __future__ import annotations

from minipref.methods import DATA_OF_KIND, get_method
from full.data.config import DataConfig
from full.data.converters import FEEDBACK_POLICIES, image_key
from full.data.sources import (FEEDBACK_COLUMNS, PAIR_COLUMNS, LazyRows, as_image_bytes, detect_format,
                               load_feedback_rows, load_pair_rows)


def data_kind_for(method: str) -> str:
    """"pairs" for paired objectives, "feedback" for binary ones (the row's data kind, minipref/methods.py)."""
    return DATA_OF_KIND[get_method(method).data]


def source_format(data: DataConfig) -> str:
    """"pairs" or "feedback": ``--data_format``, or what the source's columns say (`detect_format`)."""
    if data.data_format != "auto":
        return data.data_format
    pairs, feedback = data.columns("pairs"), data.columns("feedback")
    return detect_format(data.dataset_name, (pairs["jpg_0"], pairs["jpg_1"]), feedback["image"])


def load_training_rows(data: DataConfig, kind: str) -> list[dict]:
    """Rows for `PairDataset` (kind "pairs") or `FeedbackDataset` (kind "feedback")."""
    fmt, split, limit = source_format(data), data.dataset_split_name, data.max_train_samples
    if kind == "pairs":
        if fmt == "feedback":
            raise ValueError(f"--method {data.method} needs preference pairs {list(PAIR_COLUMNS)}, but "
                             f"{data.dataset_name} holds binary feedback {list(FEEDBACK_COLUMNS)}")
        return load_pair_rows(data.dataset_name, split, keep_ties=data.keep_ties, max_rows=limit,
                              columns=data.columns("pairs"))
    if fmt == "feedback":
        rows = load_feedback_rows(data.dataset_name, split, max_rows=limit, columns=data.columns("feedback"))
    else:  # per-image labels from comparisons, as Diffusion-KTO does with Pick-a-Pic (paper 001, App. C.1)
        rows = pairs_as_feedback(load_pair_rows(data.dataset_name, split, max_rows=limit,
                                                columns=data.columns("pairs")), data.feedback_policy)
    if data.desirable_only:  # SFT: do not spend forwards on the other images
        rows = only_desirable(rows)
        if not len(rows):
            raise ValueError(f"--method {data.method} trains on desirable images and {data.dataset_name} has none")
    return rows


def real_image_rows(data: DataConfig) -> list[dict]:
    """SPIN's real images as feedback rows: the winners of pairs, or the desirable images of feedback data."""
    split, limit = data.dataset_split_name, data.max_train_samples
    if source_format(data) == "pairs":
        pairs = load_pair_rows(data.dataset_name, split, max_rows=limit, columns=data.columns("pairs"))
        return LazyRows(pairs.table, pairs.row_ids, {"slot": 1 - pairs.column("jpg_0_won").astype(int),
                                                     "desirable": [True] * len(pairs)}, _image_of_pair)
    rows = only_desirable(load_feedback_rows(data.dataset_name, split, limit, data.columns("feedback")))
    if not len(rows):
        raise ValueError(f"SPIN needs real (desirable) images and {data.dataset_name} has none labelled 1")
    return rows


def only_desirable(rows: LazyRows) -> LazyRows:
    return rows.subset(rows.column("desirable").astype(bool))


def rows_with_ids(rows: LazyRows, row_ids) -> LazyRows:
    """The rows whose id is in ``row_ids`` (e.g. those with an embedding), in their order."""
    import numpy as np

    return rows.subset(np.isin(rows.row_ids, np.fromiter(row_ids, dtype=np.int64)))


def _image_of_pair(raw: dict, row_id: int, fields: dict) -> dict:
    """One image of a pair row as a feedback row: ``slot`` 0 is ``jpg_0``, 1 is ``jpg_1``."""
    return {"row_id": row_id, "image": as_image_bytes(raw[f"jpg_{fields['slot']}"]), "caption": raw["caption"],
            "desirable": fields["desirable"]}


def pairs_as_feedback(pairs: LazyRows, policy: str = "winner_once") -> LazyRows:
    """`full.data.converters.pairs_to_feedback` over lazy pairs: the same labels, images left in the table.

    One pass hashes each image (SHA-256 of its bytes: Pick-a-Pic repeats images byte for byte) and keeps per
    distinct image its first (row id, slot) and its win/loss counts: memory grows with the number of distinct
    images (about 100 bytes each), never with their bytes. Policies as in `pairs_to_feedback`.
    """
    if policy not in FEEDBACK_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {FEEDBACK_POLICIES}")
    stats: dict[str, list] = {}  # image hash -> [row_id, slot, wins, losses], in order of first appearance
    for i in range(len(pairs)):
        if bool(pairs.column("tie")[i]):
            continue  # ties decide nothing
        row, winner_slot = pairs[i], 0 if bool(pairs.column("jpg_0_won")[i]) else 1
        for data, slot, won in ((row["winner"], winner_slot, True), (row["loser"], 1 - winner_slot, False)):
            entry = stats.setdefault(image_key(data), [row["row_id"], slot, 0, 0])
            entry[2 if won else 3] += 1
    entries = list(stats.values())
    desirable = [wins > 0 if policy == "winner_once" else wins > 0 and losses == 0 for _, _, wins, losses in entries]
    return LazyRows(pairs.table, [e[0] for e in entries], {"slot": [e[1] for e in entries], "desirable": desirable},
                    _image_of_pair)
