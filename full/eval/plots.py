"""
# Plots of an evaluation run (matplotlib, written to PNG files)

The figures of *Aligning Text-to-Image Diffusion Models using RL from Human Utility* (paper 000):

* `plot_means`: mean +- std of each score per model, side by side (its Fig. 1);
* `plot_distributions`: the distribution of each score per model as violins (its Fig. 2);
* `plot_win_rates`: win rate of each comparison with its bootstrap CI and the 50% line (the numbers of
  Diffusion-KTO Table 1, drawn);
* `plot_image_grid`: one prompt's images, a column per model and a row per seed (its Fig. 3).

Every function takes plain data (the `summarize` output of `full/eval/stats.py`, the score dict, file paths),
writes one file and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

# Figures are built with matplotlib's object API (no pyplot): nothing opens a window, no backend is switched, and a
# notebook that imports this module keeps its inline plots.
from matplotlib.figure import Figure
from PIL import Image


def _save(fig, path) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return str(path)


def _axes_row(n: int, width: float = 4.0, height: float = 3.2):
    fig = Figure(figsize=(width * n, height))
    axes = fig.subplots(1, n, squeeze=False)
    return fig, axes[0]


def plot_means(summary: dict, path) -> str:
    """Bars of mean +- std, one panel per scorer, one bar per model."""
    scorers = list(summary["means"])
    fig, axes = _axes_row(len(scorers))
    for ax, scorer in zip(axes, scorers):
        models = list(summary["means"][scorer])
        means = [summary["means"][scorer][m]["mean"] for m in models]
        stds = [summary["means"][scorer][m]["std"] for m in models]
        ax.bar(range(len(models)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(models))])
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        pad = 0.1 * (high - low) or 1.0
        ax.set_ylim(low - pad, high + pad)  # scores like PickScore ~21 would be flat bars from zero
        ax.set_title(f"{scorer} (mean ± std)")
    return _save(fig, path)


def plot_distributions(all_scores: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], path) -> str:
    """Violins of every image's score, one panel per scorer, one violin per model."""
    scorers = list(all_scores)
    fig, axes = _axes_row(len(scorers))
    for ax, scorer in zip(axes, scorers):
        models = list(all_scores[scorer])
        data = [[v for seeds in all_scores[scorer][m].values() for v in seeds] for m in models]
        if all(len(set(d)) > 1 for d in data):
            ax.violinplot(data, showmedians=True)
        else:  # a violin needs spread; fall back to a box plot for degenerate data
            ax.boxplot(data)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=30, ha="right")
        ax.set_title(f"{scorer} distribution")
    return _save(fig, path)


def plot_win_rates(summary: dict, path) -> str:
    """Horizontal bars of each comparison's win rate (%) with its CI; the dashed line is a coin flip."""
    scorers = [s for s in summary["win_rates"] if summary["win_rates"][s]]
    if not scorers:
        raise ValueError("no comparisons to plot: evaluate at least two models")
    n_rows = max(len(summary["win_rates"][s]) for s in scorers)
    fig, axes = _axes_row(len(scorers), height=0.5 * n_rows + 1.5)
    for ax, scorer in zip(axes, scorers):
        rows = summary["win_rates"][scorer]
        rates = [100 * r["win_rate"] for r in rows]
        errors = [[100 * (r["win_rate"] - r["ci_low"]) for r in rows],
                  [100 * (r["ci_high"] - r["win_rate"]) for r in rows]]  # (2, n) asymmetric CI
        colors = ["C2" if r > 50 else ("C3" if r < 50 else "0.6") for r in rates]
        ax.barh(range(len(rows)), rates, color=colors, alpha=0.6)
        # The point and its CI are drawn on top, so a 0% win rate (no bar) still shows.
        ax.errorbar(rates, range(len(rows)), xerr=errors, fmt="o", color="k", capsize=4)
        for y, rate in enumerate(rates):
            ax.annotate(f"{rate:.1f}", (rate, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{r['model']} vs. {r['baseline']}" for r in rows])
        ax.axvline(50, color="k", linestyle="--", linewidth=1)
        ax.set_xlim(0, 100)
        ax.invert_yaxis()
        ax.set_xlabel("win rate (%)")
        ax.set_title(scorer)
    return _save(fig, path)


def plot_image_grid(prompt: str, images: Mapping[str, Sequence[str]], path, *, seeds: Sequence[int] | None = None,
                    tile: float = 2.2) -> str:
    """One prompt across models: `images[model]` is that model's image paths in seed order."""
    models = list(images)
    if not models:
        raise ValueError("no images to put in the grid")
    n_rows = max(len(paths) for paths in images.values())
    fig = Figure(figsize=(tile * len(models), tile * n_rows + 0.6))
    axes = fig.subplots(n_rows, len(models), squeeze=False)
    for col, model in enumerate(models):
        for row in range(n_rows):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row < len(images[model]):
                with Image.open(images[model][row]) as image:
                    ax.imshow(image.convert("RGB"))
            if row == 0:
                ax.set_title(model, fontsize=9)
            if col == 0 and seeds is not None:
                ax.set_ylabel(f"seed {seeds[row]}", fontsize=8)
    fig.suptitle(prompt if len(prompt) < 90 else prompt[:87] + "...", fontsize=9)
    return _save(fig, path)
