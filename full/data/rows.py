"""The rows an offline method trains on: preference pairs, or per-image feedback (read as such, or converted from
pairs per image as Diffusion-KTO does with Pick-a-Pic, paper 001 App. C.1)."""

from __future__ import annotations

import minipref
from full.data.converters import image_key, pairs_to_feedback
from full.data.sources import FEEDBACK_COLUMNS, PAIR_COLUMNS, detect_format, load_feedback_rows, load_pair_rows


def data_kind_for(method: str) -> str:
    """"pairs" for paired objectives, "feedback" for binary ones."""
    return "pairs" if minipref.get_objective(method).data == "paired" else "feedback"


def load_training_rows(args, kind: str) -> list[dict]:
    """Rows for `PairDataset` (kind "pairs") or `FeedbackDataset` (kind "feedback")."""
    fmt = detect_format(args.dataset_name) if args.data_format == "auto" else args.data_format
    split, limit = args.dataset_split_name, args.max_train_samples
    if kind == "pairs":
        if fmt == "feedback":
            raise ValueError(f"--method {args.method} needs preference pairs {list(PAIR_COLUMNS)}, but "
                             f"{args.dataset_name} holds binary feedback {list(FEEDBACK_COLUMNS)}")
        return load_pair_rows(args.dataset_name, split, keep_ties=args.keep_ties, max_rows=limit)
    if fmt == "feedback":
        rows = load_feedback_rows(args.dataset_name, split, max_rows=limit)
    else:  # per-image labels from comparisons, as Diffusion-KTO does with Pick-a-Pic (paper 001, App. C.1)
        pairs = load_pair_rows(args.dataset_name, split, max_rows=limit)
        first_row = {}
        for row in pairs:
            for image in (row["winner"], row["loser"]):
                first_row.setdefault(image_key(image), row["row_id"])
        rows = [{"row_id": first_row[image_key(r["image"])], "image": r["image"], "caption": r["caption"],
                 "desirable": bool(r["label"])} for r in pairs_to_feedback(pairs, args.feedback_policy)]
    if args.method == "sft":  # SFT only ever looks at desirable images: do not spend forwards on the others
        rows = [r for r in rows if r["desirable"]]
        if not rows:
            raise ValueError(f"--method sft trains on desirable images and {args.dataset_name} has none")
    return rows


def real_image_rows(args) -> list[dict]:
    """SPIN's real images as feedback rows: the winners of pairs, or the desirable images of feedback data."""
    fmt = detect_format(args.dataset_name) if args.data_format == "auto" else args.data_format
    if fmt == "pairs":
        pairs = load_pair_rows(args.dataset_name, args.dataset_split_name, max_rows=args.max_train_samples)
        return [{"row_id": r["row_id"], "image": r["winner"], "caption": r["caption"], "desirable": True}
                for r in pairs]
    rows = [r for r in load_feedback_rows(args.dataset_name, args.dataset_split_name, args.max_train_samples)
            if r["desirable"]]
    if not rows:
        raise ValueError(f"SPIN needs real (desirable) images and {args.dataset_name} has none labelled 1")
    return rows
