"""The synthetic people of the lab: a preference the pretrained model does not satisfy, and a caption check.

**The preference: bigger shapes.** `Rater` scores an image by the fraction of it the shape covers
(`full/lab/reader.py`: the largest saturated piece, sub-pixel coverage). No caption names a size and the
pretraining data draws sizes uniformly (8-20 px), so the base model is indifferent to it: any rise is the
preference tuning's doing. A larger shape is also easy to see in a sample grid. It can be "hacked" only by
drawing something else (a blob that is no longer the captioned shape, colour spilling over the background);
that is what the second scorer watches.

**A harder preference: the caption decides.** `CaptionRater` (the replication table's second data track,
docs/replication.md) wants circles large, squares small, and triangles large on a dark background but small on a
light one: half the captions ask for the opposite of "bigger", so a method must read the caption to please it.

**The caption check.** `Fidelity` scores 1 when the reader finds the caption's colour, shape *and* background in
the image, else 0: its mean is the accuracy with which the model follows its prompts.

**Labelling a pair** (`label_pairs`), as a crowd of raters would: the image with the larger score wins, except
that the `tie_rate` of pairs that are closest in score are called ties (Pick-a-Pic keeps ties as label 0.5) and
each remaining label is flipped with probability `label_noise` (the flip noise cDPO / robust DPO assume).

Both scorers have the interface of `full/scorers.py`'s: keyword-only constructors (unknown options such as
`device` are accepted and ignored: they run on the CPU in microseconds) and `score(images, prompts) -> list[float]`
with one PIL image and one prompt per item, so `full.evaluate --scorers full.lab.rater:Rater` can name them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from minipref.sft import GOOD_PREFIX

from full.lab import reader
from full.lab.shapes import parse_caption


def _check(images: Sequence, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")


class Rater:
    """Higher is better: the fraction of the image the shape covers, in [0, 1]. The prompt is not used."""

    name = "lab_rater"

    def __init__(self, **options):
        self.options = options  # nothing to load

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        _check(images, prompts)
        return [reader.read(image).area for image in images]


class CaptionRater:
    """The harder preference (the replication table's second rater): whether bigger or smaller is better depends on
    the caption. Circles are better large and squares small; triangles large on a dark background and small on a
    light one. The score is +area where larger is wanted and -area where smaller is, so a method that learned
    "bigger" from the first rater wins about half the captions here and loses the rest: a model must read the
    caption's shape (and, for triangles, its background) to please this rater. An image in which the reader finds no
    shape, or another shape than the caption's, scores `FAILED`, below every drawing of the right shape: erasing the
    shape, or drawing a small circle where a square was asked, does not pass as a small square."""

    name = "lab_caption_rater"
    FAILED = -1.0  # |area| <= 1 for every drawing
    LARGER_IS_BETTER = {("circle", "dark"): True, ("circle", "light"): True, ("square", "dark"): False,
                        ("square", "light"): False, ("triangle", "dark"): True, ("triangle", "light"): False}

    def __init__(self, **options):
        self.options = options

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        _check(images, prompts)
        out = []
        for image, prompt in zip(images, prompts):
            _, shape, background = parse_caption(prompt.removeprefix(GOOD_PREFIX))  # CSFT samples with a prefix
            found = reader.read(image)
            if found.shape != shape:
                out.append(self.FAILED)
            else:
                out.append(found.area if self.LARGER_IS_BETTER[shape, background] else -found.area)
        return out


# The raters that can label the lab's preference data (LabConfig.rater)
RATERS = {"size": Rater, "caption": CaptionRater}


def rater_named(name: str):
    if name not in RATERS:
        raise ValueError(f"unknown lab rater {name!r}; choose one of {', '.join(RATERS)}")
    return RATERS[name]


class Fidelity:
    """1.0 when colour, shape and background read from the image are the caption's, else 0.0."""

    name = "lab_fidelity"

    def __init__(self, **options):
        self.options = options

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        _check(images, prompts)
        return [float(attribute_matches(image, prompt).all()) for image, prompt in zip(images, prompts)]


class OutOfRange:
    """1.0 when the image leaves the pretraining data's sizes: its shape's area is below what that shape covers at
    the smallest size the data drew (8 px) or above the largest (20 px), or the reader finds no shape; else 0.0.
    The replication table's drift measure (paper 001 Sec. 7: DPO "deviates from the distribution")."""

    name = "lab_out_of_range"

    def __init__(self, **options):
        self.options = options

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        _check(images, prompts)
        readings = [reader.read(image) for image in images]
        return [float(r.shape is None or not area_range(r.shape)[0] <= r.area <= area_range(r.shape)[1])
                for r in readings]


_AREA_RANGE: dict = {}


def area_range(shape: str) -> tuple[float, float]:
    """(area at SIZE_RANGE[0], area at SIZE_RANGE[1]) of `shape`, as fractions of the image (rendered exactly)."""
    if shape not in _AREA_RANGE:
        from full.lab.shapes import RESOLUTION, SIZE_RANGE, Scene, shape_mask

        centre = RESOLUTION / 2
        _AREA_RANGE[shape] = tuple(float(shape_mask(Scene("red", shape, "dark", 0.2, size, centre, centre)).mean())
                                   for size in SIZE_RANGE)
    return _AREA_RANGE[shape]


def attribute_matches(image, prompt: str) -> np.ndarray:
    """[colour, shape, background] read correctly, as a boolean array of 3. CSFT samples with "good image, "
    before the caption (paper 001 Sec. 5.1.2): the caption it must follow is what comes after the prefix."""
    colour, shape, background = parse_caption(prompt.removeprefix(GOOD_PREFIX))
    found = reader.read(image)
    return np.array([found.colour == colour, found.shape == shape, found.background == background])


def attribute_rates(images: Sequence, prompts: Sequence[str]) -> dict:
    """How often the reader finds each prompt's colour, shape and background, and all three (the fidelity)."""
    hits = np.array([attribute_matches(image, prompt) for image, prompt in zip(images, prompts)])  # (N, 3)
    return {"colour": float(hits[:, 0].mean()), "shape": float(hits[:, 1].mean()),
            "background": float(hits[:, 2].mean()), "all": float(hits.all(axis=1).mean())}


def label_pairs(scores_a: Sequence[float], scores_b: Sequence[float], *, tie_rate: float = 0.0,
                label_noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """`label_0` per pair (1.0: the first image wins, 0.0: the second, 0.5: a tie), from the rater's scores."""
    if not 0.0 <= tie_rate < 1.0:
        raise ValueError(f"tie_rate must be in [0, 1), got {tie_rate}")
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
    gap = np.asarray(scores_a, dtype=np.float64) - np.asarray(scores_b, dtype=np.float64)  # (P,)
    labels = (gap > 0).astype(np.float64)
    rng = np.random.default_rng(seed)
    # flip noise first, on every pair, so the noisy labels do not depend on the tie rate
    flipped = rng.random(gap.shape) < label_noise
    labels = np.where(flipped, 1.0 - labels, labels)
    n_ties = int(round(tie_rate * len(gap)))
    closest = np.argsort(np.abs(gap), kind="stable")[:n_ties]  # the pairs a person could not tell apart
    labels[closest] = 0.5
    labels[gap == 0] = 0.5  # identical scores: no preference to state
    return labels
