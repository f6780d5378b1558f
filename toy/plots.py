"""The toy's two figures: a grid of sample scatter plots, and the training curves.

Figures are built with ``matplotlib.figure.Figure`` and written with ``savefig`` (the Agg renderer behind PNG),
without pyplot: nothing here selects a backend, so importing the toy in a notebook leaves inline plots working,
and it runs on a headless machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle

from .data import DESIRABLE, PRETRAIN, UNDESIRABLE, bayes_ceilings

CONTOUR_STYLE = {PRETRAIN.name: "0.45", DESIRABLE.name: "tab:green", UNDESIRABLE.name: "tab:red"}
LIMITS = ((-0.2, 1.2), (0.1, 2.0))  # x, y: the pretraining Gaussian +- 3 std, and room above for DPO's drift


def draw_gaussians(ax) -> None:
    """Mahalanobis 1 and 2 contours of the three Gaussians (circles: they are isotropic)."""
    for gaussian in (PRETRAIN, DESIRABLE, UNDESIRABLE):
        for radius, style in ((1, "-"), (2, "--")):
            ax.add_patch(Circle(gaussian.mean, radius * gaussian.std, fill=False, lw=1.2, ls=style,
                                color=CONTOUR_STYLE[gaussian.name], zorder=3))


def plot_samples(samples: dict, results: dict, path: Path, cols: int = 4) -> None:
    """One panel per method: its samples, the three Gaussians, and its headline numbers in the title."""
    names = list(samples)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(2.9 * cols, 4.0 * rows))
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = np.asarray(samples[name])
        ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.35, color="tab:blue", linewidths=0, rasterized=True)
        draw_gaussians(ax)
        m = results[name]
        shown = ((points[:, 0] >= LIMITS[0][0]) & (points[:, 0] <= LIMITS[0][1])
                 & (points[:, 1] >= LIMITS[1][0]) & (points[:, 1] <= LIMITS[1][1])).mean()
        outside = f" | {1 - shown:.0%} off-plot" if shown < 0.99 else ""
        ax.set_title(
            f"{name}\nin D {m['desirable_frac']:.2f} | in U {m['undesirable_frac']:.2f}{outside}\n"
            f"ED {m['energy_distance']:.3g} | impl. acc {m['pairwise_implicit_acc']:.2f}",
            fontsize=9,
        )
        if shown < 0.5:  # say where the samples went rather than leave an empty panel unexplained
            ax.text(0.5, 0.9, f"diverged:\nsample mean\n({m['mean'][0]:.3g}, {m['mean'][1]:.3g})", transform=ax.transAxes,
                    ha="center", va="top", fontsize=9, color="0.2")
        ax.set_xlim(*LIMITS[0])
        ax.set_ylim(*LIMITS[1])
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    handles = [Line2D([], [], color=c, label=n) for n, c in CONTOUR_STYLE.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False,
               title="contours: Mahalanobis 1 (solid) and 2 (dashed)", title_fontsize=8)
    # Fixed margins: tight_layout would cost ~0.5 s per figure, a tenth of a --quick run.
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.93, wspace=0.12, hspace=0.28)
    fig.savefig(path, dpi=100)


def smooth(values, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window or window < 2:
        return values
    finite = np.where(np.isfinite(values), values, np.nanmean(values))
    return np.convolve(finite, np.ones(window) / window, mode="valid")


def plot_curves(histories: dict, path: Path, cols: int = 4) -> None:
    """Per method: training loss (left axis, smoothed) and held-out pairwise implicit accuracy (right axis)."""
    names = list(histories)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    ceiling = bayes_ceilings()[1]
    for ax, name in zip(axes.flat, names):
        h = histories[name]
        window = max(1, len(h["loss"]) // 30)
        loss = smooth(h["loss"], window)
        ax.plot(np.arange(len(loss)) + window // 2, loss, color="tab:blue", lw=1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("loss", fontsize=7, color="tab:blue")
        acc = ax.twinx()
        acc.plot(h["heldout_step"], h["heldout_implicit_acc"], color="tab:orange", lw=1.5, marker=".", ms=3)
        acc.axhline(ceiling, color="0.5", ls=":", lw=1)
        acc.axhline(0.5, color="0.8", ls=":", lw=1)
        acc.set_ylim(0.3, 1.0)
        acc.tick_params(labelsize=7)
        acc.set_ylabel("held-out impl. acc", fontsize=7, color="tab:orange")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle(f"training loss (blue) and held-out pairwise implicit accuracy (orange); "
                 f"dotted: 0.5 and the Bayes ceiling {ceiling:.3f}", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.07, top=0.92, wspace=0.55, hspace=0.55)
    fig.savefig(path, dpi=100)
