"""The lab's world: one coloured shape on a grey background, 32 x 32 px, with a caption that names it.

    "a red circle on a dark background"     colour x shape x background = 6 x 3 x 2 = 36 captions

What the caption fixes and what it leaves free is the whole point of the lab:

* **named**: the colour (six hues 60 degrees apart, so a reader can tell them apart from the mean hue), the
  shape (circle, square, upright triangle: filling pi/4, 1 and 1/2 of their bounding box) and whether the
  grey background is dark or light;
* **free**: the shape's size (side or diameter uniform in 8..20 px), its position (kept 2 px off the
  border) and the exact grey. The synthetic rater (`full/lab/rater.py`) prefers *larger* shapes, a property
  no caption asks for, so the pretrained model samples every size equally and preference tuning has room to move.

The background is grey (no saturation) and the shapes fully saturated, so `full/lab/reader.py` can segment a
generated image by saturation alone. Edges are anti-aliased by rendering at 4x and averaging, as a camera would.

Captions are split in two halves, `TRAIN_CAPTIONS` (the preference data is made on these) and
`HELD_OUT_CAPTIONS` (evaluation): every colour-shape pair appears in both, once on each background, so a
held-out caption is a combination the preference data never showed.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

RESOLUTION = 32
SUPERSAMPLE = 4
COLOURS = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}  # hue, degrees
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"dark": (0.10, 0.35), "light": (0.60, 0.85)}  # grey level range in [0, 1]
SIZE_RANGE = (8, 20)  # side / diameter in px, uniform: the free property the rater cares about
MARGIN = 2  # px between the shape's bounding box and the border
SATURATION, VALUE = 0.85, 0.95  # of every shape colour (HSV)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    grey: float  # background grey level in [0, 1]
    size: float  # px
    cx: float  # centre, px from the left
    cy: float  # centre, px from the top

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


ALL_CAPTIONS = [caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
# Half and half: colour-shape pair number k goes to training with background k % 2, held out with the other.
TRAIN_CAPTIONS = [caption(c, s, list(BACKGROUNDS)[k % 2])
                  for k, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)]
HELD_OUT_CAPTIONS = [c for c in ALL_CAPTIONS if c not in TRAIN_CAPTIONS]


def parse_caption(text: str) -> tuple[str, str, str]:
    """"a red circle on a dark background" -> ("red", "circle", "dark"); ValueError for anything else."""
    words = text.split()
    if len(words) != 7 or words[1] not in COLOURS or words[2] not in SHAPES or words[5] not in BACKGROUNDS:
        raise ValueError(f"not a lab caption: {text!r} (expected 'a <colour> <shape> on a <dark|light> background')")
    return words[1], words[2], words[5]


def shape_rgb(colour: str) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(COLOURS[colour] / 360.0, SATURATION, VALUE))  # (3,) in [0, 1]


def random_scene(rng: np.random.Generator, text: str | None = None) -> Scene:
    """A scene for `text` (or for a caption drawn uniformly), its free properties drawn uniformly."""
    colour, shape, background = parse_caption(text if text is not None else ALL_CAPTIONS[rng.integers(len(ALL_CAPTIONS))])
    size = rng.uniform(*SIZE_RANGE)
    low, high = MARGIN + size / 2, RESOLUTION - MARGIN - size / 2
    return Scene(colour, shape, background, grey=rng.uniform(*BACKGROUNDS[background]), size=size,
                 cx=rng.uniform(low, high), cy=rng.uniform(low, high))


def shape_mask(scene: Scene, resolution: int = RESOLUTION, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage of each pixel by the shape in [0, 1], (H, W): the fraction of its supersample points inside."""
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / supersample  # sample points in px
    y, x = np.meshgrid(coords, coords, indexing="ij")
    half = scene.size / 2
    dx, dy = x - scene.cx, y - scene.cy
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif scene.shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upright isosceles triangle, base = height = size: at depth d below the apex its half-width is d / 2
        depth = dy + half
        inside = (depth >= 0) & (depth <= scene.size) & (np.abs(dx) <= depth / 2)
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image: background grey, shape colour blended by coverage."""
    coverage = shape_mask(scene)[..., None]  # (H, W, 1)
    image = (1 - coverage) * scene.grey + coverage * shape_rgb(scene.colour)  # (H, W, 3)
    return np.round(image * 255).astype(np.uint8)


def make_images(n: int, seed: int, captions: list[str] | None = None) -> tuple[np.ndarray, list[Scene]]:
    """`n` images (n, H, W, 3) uint8 and their scenes; captions cycle through `captions` (default: all 36)."""
    rng = np.random.default_rng(seed)
    captions = captions or ALL_CAPTIONS
    scenes = [random_scene(rng, captions[i % len(captions)]) for i in range(n)]
    return np.stack([render(s) for s in scenes]), scenes
