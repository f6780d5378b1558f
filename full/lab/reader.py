"""Read a lab image back: which colour, which shape, which background, and how large the shape is.

A rule, not a learned classifier, so what it measures can be stated in three lines and checked on the rendered
data (`tests/test_lab.py`: every rendered scene is read back exactly):

1. **segment** by saturation: the background is grey (chroma `max(rgb) - min(rgb)` = 0) and the shapes are
   saturated (chroma 0.81), so `chroma > 0.3` marks the shape; the largest 4-connected piece is *the* shape
   (a speckle of colour elsewhere is neither the shape nor part of its size). Within one pixel of that piece,
   `coverage = chroma / 0.81` (clipped to [0, 1]) is how much of each pixel the shape covers, as rendered;
2. **colour** = the nearest of the six hues to the hue of the shape's mean colour (they are 60 degrees apart);
   **shape** = how much of its bounding box the shape fills, `fill = area / (width * height)` with the width
   the sum over columns of the largest coverage in the column (the height likewise over rows), sub-pixel exact
   for anti-aliased edges: a square fills 1, a circle pi/4 = 0.785, the upright triangle 1/2 (thresholds
   0.89 and 0.67, in the gaps between the fills measured on 3000 rendered scenes: triangles 0.53-0.63, as
   small ones are rounded up by anti-aliasing, circles 0.77-0.82, squares >= 0.99); **background** = dark when the mean grey of the pixels away from the shape is below
   0.475, the middle of the gap between the two ranges;
3. **area** = the summed coverage / all pixels, the rater's "how large" (continuous: no ties from pixel counts).

An image with no saturated piece (a failed sample) reads as colour, shape None and area 0.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from full.lab.shapes import BACKGROUNDS, COLOURS, SATURATION, VALUE

CHROMA_THRESHOLD = 0.3
SHAPE_CHROMA = SATURATION * VALUE  # chroma of a fully covered shape pixel
SQUARE_FILL, TRIANGLE_FILL = 0.89, 0.67  # fill of the bounding box: above -> square, below -> triangle
DARK_BELOW = (BACKGROUNDS["dark"][1] + BACKGROUNDS["light"][0]) / 2  # 0.475


@dataclass(frozen=True)
class Reading:
    colour: str | None
    shape: str | None
    background: str
    area: float  # fraction of the image covered by the shape, in [0, 1]
    fill: float  # fraction of its bounding box the shape fills (0 when there is none)


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (all False if there is none)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]  # pixels per component; label 0 is the outside
    return labels == 1 + int(np.argmax(sizes))


def nearest_colour(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*rgb)[0] * 360.0
    # circular distance between hues, in degrees
    return min(COLOURS, key=lambda name: min(abs(hue - COLOURS[name]), 360.0 - abs(hue - COLOURS[name])))


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64) / 255.0


def _segment(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1 above: (chroma, the shape's piece, its coverage), each (H, W); coverage is 0 where there is no piece."""
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)  # (H, W), 0 for grey
    piece = largest_piece(chroma > CHROMA_THRESHOLD)
    if not piece.any():
        return chroma, piece, np.zeros_like(chroma)
    near = ndimage.binary_dilation(piece, iterations=1)
    return chroma, piece, np.clip(chroma / SHAPE_CHROMA, 0.0, 1.0) * near


def coverage(image) -> np.ndarray:
    """How much of each pixel the shape covers, (H, W) in [0, 1]: what the rater sums (all 0 without a shape).
    The lab figure outlines the base model's shape with it."""
    return _segment(_pixels(image))[2]


def read(image) -> Reading:
    """`image`: PIL image or (H, W, 3) uint8 array."""
    pixels = _pixels(image)
    chroma, piece, covered = _segment(pixels)
    # background: pixels at least 2 px away from anything saturated (edges blend shape and grey)
    away = ~ndimage.binary_dilation(chroma > CHROMA_THRESHOLD / 2, iterations=2)
    grey = pixels[away].mean() if away.any() else pixels.mean()
    background = "dark" if grey < DARK_BELOW else "light"
    if not piece.any():
        return Reading(None, None, background, 0.0, 0.0)
    width, height = covered.max(axis=0).sum(), covered.max(axis=1).sum()
    # fill = area / (width * height): 1 square, pi/4 circle, 1/2 triangle
    fill = float(covered.sum() / (width * height))
    shape = "square" if fill > SQUARE_FILL else "triangle" if fill < TRIANGLE_FILL else "circle"
    colour = nearest_colour(pixels[piece].mean(axis=0))
    return Reading(colour, shape, background, float(covered.mean()), fill)
