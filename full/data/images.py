"""Decoding and augmentation of the rows of `full.data.sources`: torch datasets of pairs and of single images.

An image that fails to decode is reported with its row id when it is read and the item becomes ``None``, which
:func:`collate_skip_none` drops.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Decoding and augmentation: one random draw per *pair*, so both images see the same flip/crop
# ----------------------------------------------------------------------------------------------


def _resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution``, aspect kept (as ``torchvision.transforms.Resize(int)``)."""
    width, height = image.size
    if min(width, height) == resolution:
        return image
    scale = resolution / min(width, height)
    size = (max(resolution, int(width * scale)), max(resolution, int(height * scale)))
    return image.resize(size, resample=Image.BILINEAR)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image, dtype=np.uint8)  # (R, R, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, R, R)


def _prepare(data: bytes, resolution: int, flip: bool, crop_fraction: tuple[float, float] | None):
    """Decode, resize, flip, crop. Returns (pixels [3, R, R], original (h, w), crop (top, left)).

    Order as in diffusers' SDXL training script: resize, flip, crop, so ``crop_top_left`` is in
    the coordinates of the (flipped) resized image that the crop was cut from; SDXL's
    micro-conditioning (``add_time_ids``) takes exactly these numbers.
    """
    with Image.open(io.BytesIO(data)) as raw:
        image = raw.convert("RGB")  # forces the full decode: a truncated JPEG raises here
    original = (image.height, image.width)
    image = _resize_shorter_side(image, resolution)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if crop_fraction is None:  # centre crop
        top = max(0, int(round((image.height - resolution) / 2.0)))
        left = max(0, int(round((image.width - resolution) / 2.0)))
    else:  # random crop, the same relative position for every image of the item
        top = int(crop_fraction[0] * (image.height - resolution + 1))
        left = int(crop_fraction[1] * (image.width - resolution + 1))
        top, left = min(top, image.height - resolution), min(left, image.width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    return _to_tensor(image), original, (top, left)


class _ImageRowsDataset(torch.utils.data.Dataset):
    """Shared machinery: per-item RNG, caption dropout, decode-or-None."""

    image_keys: tuple[str, ...] = ()

    def __init__(self, rows: Sequence[dict] | None, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, caption_dropout: float = 0.0, seed: int = 0):
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if rows is not None and len(rows) == 0:  # None: a stream's rows come to `prepare` one at a time
            raise ValueError("rows is empty: load them with load_pair_rows / load_feedback_rows")
        self.rows, self.resolution = rows, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.caption_dropout, self.seed, self.epoch = caption_dropout, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """A new epoch draws new flips/crops/dropouts; the same (seed, epoch, index) always repeats."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, index: int) -> dict | None:
        return self.prepare(self.rows[index], index)

    def prepare(self, row: dict, key: int) -> dict | None:
        """Decode and augment one row; ``key`` (the index, or in a stream the row id) seeds its draws."""
        # One generator per item: reproducible whatever the worker count or the order of access.
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + key)
        caption = "" if rng.random() < self.caption_dropout else row["caption"]
        flip = self.random_flip and rng.random() < 0.5
        crop_fraction = None if self.center_crop else (rng.random(), rng.random())
        try:
            prepared = [_prepare(row[key], self.resolution, flip, crop_fraction) for key in self.image_keys]
        except Exception as error:  # corrupt/truncated image, decompression bomb, ...
            logger.warning("row %s: cannot decode image (%s: %s); skipped", row["row_id"],
                           type(error).__name__, error)
            return None
        pixels, originals, crops = zip(*prepared)
        return {"pixel_values": torch.stack(pixels),                      # (n, 3, R, R)
                "caption": caption,
                "original_sizes": torch.tensor(originals, dtype=torch.long),   # (n, 2) as (h, w)
                "crop_top_lefts": torch.tensor(crops, dtype=torch.long),       # (n, 2) as (top, left)
                "row_id": row["row_id"]}


class PairDataset(_ImageRowsDataset):
    """Items of :func:`load_pair_rows` rows: ``pixel_values`` [2, 3, R, R], winner first.

    The pair shares its caption dropout (one prompt conditions both images, as the DPO loss
    compares them under the same ``c``), its flip and its relative crop position.
    """

    image_keys = ("winner", "loser")

    def __getitem__(self, index: int) -> dict | None:
        return self._item(index)


class FeedbackDataset(_ImageRowsDataset):
    """Items of :func:`load_feedback_rows` rows: ``pixel_values`` [1, 3, R, R] and ``desirable``."""

    image_keys = ("image",)

    def __getitem__(self, index: int) -> dict | None:
        return self.prepare(self.rows[index], index)

    def prepare(self, row: dict, key: int) -> dict | None:
        item = super().prepare(row, key)
        if item is not None:
            item["desirable"] = bool(row["desirable"])
        return item


def collate_skip_none(items: Sequence[dict | None]) -> dict | None:
    """Stack a batch, dropping the items whose image failed to decode (``None``).

    Returns ``{"pixel_values": [B, n, 3, R, R], "captions": list[str], "original_sizes": [B, n, 2],
    "crop_top_lefts": [B, n, 2], "row_ids": list[int], "n_undecodable": int}`` (the items dropped) plus
    ``"desirable"`` (bool [B]) for feedback items; ``None`` when every item was dropped (the trainer skips that
    batch). The run loop totals the drops and reports them at the end of the run.
    """
    dropped = sum(item is None for item in items)
    items = [item for item in items if item is not None]
    if not items:
        return None
    batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
             "captions": [item["caption"] for item in items],
             "original_sizes": torch.stack([item["original_sizes"] for item in items]),
             "crop_top_lefts": torch.stack([item["crop_top_lefts"] for item in items]),
             "row_ids": [item["row_id"] for item in items],
             "n_undecodable": dropped}
    if "desirable" in items[0]:
        batch["desirable"] = torch.tensor([item["desirable"] for item in items], dtype=torch.bool)
    return batch

