"""The lab's figure: what each method draws (same held-out prompts, same seed) and how often it beats the base model.

Left: one row per model (the base first), one column per held-out caption, seed 0 of full.evaluate's images. The
32 px samples are drawn enlarged (``tile`` px, bicubic), and on every tile a dashed outline marks where the *base*
model put its shape for the same caption and seed (``full/lab/reader.py``'s coverage, at one half): the rater rewards
larger shapes, so a shape spilling over its outline is the effect the right panel measures, and one inside it the
opposite.
Right: the rater's win rate over the base model with its 95% bootstrap CI (over prompts); the bar's colour says
which side of 0.5 the CI lies on (legend), and the text next to it gives the win rate, the mean shape area as a
multiple of the base model's, and the caption fidelity. A bar whose CI lies right of 0.5 is a method that moved the
reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The colour of a bar: where its 95% CI lies relative to 0.5 (no preference either way).
VERDICTS = (("tab:green", "95% CI above 0.5: larger shapes than the base"),
            ("tab:red", "95% CI below 0.5: smaller shapes than the base"),
            ("tab:gray", "95% CI contains 0.5: no clear change"))


def verdict_colour(low: float, high: float) -> str:
    return VERDICTS[0][0] if low > 0.5 else VERDICTS[1][0] if high < 0.5 else VERDICTS[2][0]


def _enlarged(image, tile: int) -> np.ndarray:
    """(tile, tile, 3) floats in [0, 1]: the sample resampled bicubically (a 32 px image blown up by pixel
    replication shows its pixel grid more than its shape)."""
    from PIL import Image

    resized = image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float64) / 255.0


def _enlarged_coverage(image, tile: int) -> np.ndarray:
    """The shape's coverage (reader.coverage), (tile, tile), bilinear: its 0.5 level is the shape's outline."""
    from PIL import Image

    from full.lab import reader

    cover = Image.fromarray(reader.coverage(image).astype(np.float32), mode="F")
    return np.asarray(cover.resize((tile, tile), Image.Resampling.BILINEAR), dtype=np.float64)


def lab_figure(eval_dir: Path, results: dict, path: Path, n_prompts: int = 9, tile: int = 96) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no backend switch, safe inside a user's notebook
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from PIL import Image

    from full.lab.shapes import parse_caption

    rows = [json.loads(line) for line in (Path(eval_dir) / "manifest.jsonl").read_text().splitlines() if line.strip()]
    seed = min(r["seed"] for r in rows)
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in rows))[:n_prompts]
    captions = {r["prompt_id"]: r["prompt"] for r in rows if r["model"] == "base"}  # CSFT's carry its prefix
    names = ["base", *results["methods"]]
    where = {(r["model"], r["prompt_id"]): r["path"] for r in rows if r["seed"] == seed}

    # Sizes in inches: each tile 0.8 in, the bar panel 4.5 in, so the samples take most of the width.
    cell = 0.8
    fig = Figure(figsize=(cell * len(prompt_ids) + 4.5 + 3.5, cell * len(names) + 2.2))
    grid = fig.add_gridspec(1, 2, width_ratios=[cell * len(prompt_ids), 4.5], wspace=0.35)
    ax = fig.add_subplot(grid[0])
    # one mosaic of enlarged tiles with a white gutter; `outline` holds the base's coverage under every tile
    gap = max(2, tile // 16)
    step = tile + gap
    mosaic = np.ones((step * len(names), step * len(prompt_ids), 3))
    outline = np.zeros(mosaic.shape[:2])
    for j, pid in enumerate(prompt_ids):
        base = Image.open(Path(eval_dir) / where[("base", pid)]) if ("base", pid) in where else None
        base_cover = _enlarged_coverage(base, tile) if base is not None else None
        for i, name in enumerate(names):
            if (name, pid) in where:
                image = Image.open(Path(eval_dir) / where[(name, pid)])
                mosaic[i * step:i * step + tile, j * step:j * step + tile] = _enlarged(image, tile)
            if base_cover is not None:
                outline[i * step:i * step + tile, j * step:j * step + tile] = base_cover
    ax.imshow(mosaic, interpolation="antialiased")
    if outline.max() > 0.5:
        # a dark line under a light dashed one: visible on the dark and on the light backgrounds
        ax.contour(outline, levels=[0.5], colors="black", linewidths=1.6)
        ax.contour(outline, levels=[0.5], colors="white", linewidths=0.8, linestyles="--")
    ax.set_yticks([i * step + tile / 2 for i in range(len(names))], names, fontsize=9)
    ax.set_xticks([j * step + tile / 2 for j in range(len(prompt_ids))],
                  ["\n".join(parse_caption(captions[p])) for p in prompt_ids], fontsize=8)  # colour, shape, background
    ax.set_title(f"held-out captions, seed {seed}; dashed outline: the base model's shape for the same caption "
                 "and seed", fontsize=10)

    ax = fig.add_subplot(grid[1])
    methods = list(results["methods"])
    y = np.arange(len(methods))[::-1]
    rates = np.array([results["methods"][m]["win_rate"] for m in methods])
    low = np.array([results["methods"][m]["ci"][0] for m in methods])
    high = np.array([results["methods"][m]["ci"][1] for m in methods])
    ax.barh(y, rates, color=[verdict_colour(lo, hi) for lo, hi in zip(low, high)], alpha=0.8)
    # the point marks the win rate too, so a rate of 0 (a bar of no width) is still seen
    ax.errorbar(rates, y, xerr=[rates - low, high - rates], fmt="o", color="black", ms=3, capsize=2, lw=1)
    ax.axvline(0.5, color="black", lw=0.8, ls="--")
    base_area = results["base"].get("mean_score")
    for yi, m in zip(y, methods):
        entry = results["methods"][m]
        area = (f", area x{entry['mean_score'] / base_area:.2f}"
                if base_area and entry.get("mean_score") is not None else "")
        ax.text(1.03, yi, f"{entry['win_rate']:.2f}{area}, fid. {entry['fidelity']:.2f}", va="center", fontsize=8)
    ax.set_yticks(y, methods, fontsize=9)
    ax.set_ylim(-0.7, len(methods) - 0.3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("win rate over base (rater: larger shape), 95% CI over prompts")
    base_text = f"base: area {base_area:.3f}, fidelity" if base_area else "base fidelity"
    ax.set_title(f"{base_text} {results['base']['fidelity']:.2f}; text: win rate, area / base's, fidelity",
                 fontsize=10)
    handles = [Patch(facecolor=colour, alpha=0.8, label=label) for colour, label in VERDICTS]
    handles.append(Line2D([], [], color="black", marker="o", ms=3, lw=1, label="win rate and its 95% CI"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / len(methods) - 0.02), ncol=1,
              fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
