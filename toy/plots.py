"""The toy's figures: the five-panel hero, the full grid by family, the training curves, the claims map.

* ``plot_hero``    (``samples.png``): paper 001 Fig. 7's comparison: reference, SFT, DPO, KTO Kahneman-Tversky, KTO
  risk-seeking (bounded); each panel shows where the samples went and an arrow from the reference's mean to the
  method's; samples above the cropped y-axis are counted and drawn as an arrow at the top edge.
* ``plot_samples`` (``samples_all.png``): every method, one row per family.
* ``plot_curves``  (``curves.png``): held-out implicit accuracy, the sample mean y (the drift) and the loss over
  the first step's loss against training progress, as small multiples: one row per metric on one shared scale, one
  column per family; a line that leaves the scale ends at the frame with a note of where its values went.
* ``plot_claims``  (``claims.png``, ``python -m toy.sweep``): where each claim of paper 001 Sec. 7 holds.

Figures are built with ``matplotlib.figure.Figure`` and written with ``savefig`` (the Agg renderer behind PNG),
without pyplot: nothing here selects a backend, so importing the toy in a notebook leaves inline plots working,
and it runs on a headless machine. Ticks are fixed: matplotlib's automatic ticks cost most of the drawing time.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle

from .methods import FAMILIES, METHODS, SUPERVISED
from .data import DESIRABLE, PRETRAIN, UNDESIRABLE, bayes_ceilings

CONTOUR_STYLE = {PRETRAIN.name: "0.45", DESIRABLE.name: "tab:green", UNDESIRABLE.name: "tab:red"}
LIMITS = ((-0.15, 1.15), (0.2, 1.5))  # x, y: the pretraining Gaussian +- 3 std; higher samples become an arrow
TITLES = {
    "reference": "pretrained (reference)", "sft": "SFT", "csft": "CSFT (sampled 'good')", "bce": "BCE (no reference)",
    "dpo": "Diffusion-DPO", "kto_kahneman_tversky": "KTO, Kahneman-Tversky", "kto_loss_averse": "KTO, loss-averse",
    "kto_risk_seeking": "KTO, risk-seeking (unbounded)", "kto_risk_seeking_bounded": "KTO, risk-seeking (bounded)",
    "spin": "SPIN-Diffusion", "contrast": "Diff-contrast", "dspo": "DSPO", "spo": "SPO",
}


def method_families() -> dict[str, list[str]]:
    """The samples grid's rows and the curves' columns: each family of toy/methods.py (the reference leads the
    supervised row), its methods in the table's order. Read from the table, so a new method cannot be left out of a
    figure."""
    rows = {family: ["reference"] if family == SUPERVISED else [] for family in FAMILIES}
    for name, spec in METHODS.items():
        rows[spec.family].append(name)
    return rows


HERO = ["reference", "sft", "dpo", "kto_kahneman_tversky", "kto_risk_seeking_bounded"]
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]  # a method's line style: its place in its family
EXACT_DESIRABLE = "exact desirable samples: in D 0.87 | in U 0.40 | ED 0 | mean (0.30, 0.80)"


def draw_gaussians(ax) -> None:
    """Mahalanobis 1 and 2 contours of the three Gaussians (circles: they are isotropic)."""
    for gaussian in (PRETRAIN, DESIRABLE, UNDESIRABLE):
        for radius, style in ((1, "-"), (2, "--")):
            ax.add_patch(Circle(gaussian.mean, radius * gaussian.std, fill=False, lw=1.1, ls=style,
                                color=CONTOUR_STYLE[gaussian.name], zorder=3))


def draw_method(ax, name: str, points: np.ndarray, m: dict, reference_mean) -> None:
    """One panel: the samples inside the crop, the escapees as an arrow, the mean shift as an arrow, the numbers."""
    (x_low, x_high), (y_low, y_high) = LIMITS
    ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.35, color="tab:blue", linewidths=0, rasterized=True)
    draw_gaussians(ax)
    finite = np.isfinite(points).all(axis=1)
    above = finite & (points[:, 1] > y_high)
    outside = ~finite | (points[:, 0] < x_low) | (points[:, 0] > x_high) | (points[:, 1] < y_low) | above
    if above.mean() > 0.01:  # DPO's escape: where the samples went, instead of an empty panel
        ax.annotate(f"{above.mean():.0%} above\n(y up to {np.percentile(points[above, 1], 95):.1f})",
                    xy=(0.85, y_high), xytext=(0.85, y_high - 0.3), ha="center", fontsize=7, color="tab:blue",
                    arrowprops={"arrowstyle": "->", "color": "tab:blue", "lw": 1.5}, zorder=5)
    mean = np.asarray(m["mean"], dtype=float)
    if name != "reference" and np.isfinite(mean).all():
        inside = x_low <= mean[0] <= x_high and y_low <= mean[1] <= y_high
        tip = mean if inside else np.clip(mean, [x_low, y_low], [x_high, y_high])
        ax.annotate("", xy=tip, xytext=reference_mean, zorder=6,
                    arrowprops={"arrowstyle": "->", "color": "k", "lw": 1.3, "shrinkA": 0, "shrinkB": 0})
    ax.plot(*reference_mean, "k+", ms=7, zorder=6)
    if outside.mean() > 0.5 and above.mean() <= 0.5:
        ax.text(0.5, 0.5, f"diverged: {outside.mean():.0%} off the plot\nmean ({mean[0]:.3g}, {mean[1]:.3g})",
                transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.2", zorder=7)
    ax.set_title(f"{TITLES.get(name, name)}\nin D {m['desirable_frac']:.2f} | in U {m['undesirable_frac']:.2f} | "
                 f"ED {m['energy_distance']:.3g}\nimpl. acc {m['pairwise_implicit_acc']:.2f} (ranking only)", fontsize=8)
    ax.set_xlim(x_low, x_high)
    ax.set_ylim(y_low, y_high)
    ax.set_aspect("equal")
    ax.set_xticks([0.0, 0.5, 1.0])
    ax.set_yticks([0.4, 0.8, 1.2])
    ax.tick_params(labelsize=7)


def contour_legend(fig, y: float) -> None:
    handles = [Line2D([], [], color=c, label=n) for n, c in CONTOUR_STYLE.items()]
    handles.append(Line2D([], [], color="k", marker="+", ls="-", label="mean shift from the reference"))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, y), ncol=4, fontsize=8, frameon=False,
               title=f"contours: Mahalanobis 1 (solid) and 2 (dashed). For scale, {EXACT_DESIRABLE}",
               title_fontsize=8)


def plot_hero(samples: dict, results: dict, path: Path) -> None:
    """``samples.png``: the five methods of the paper's Fig. 7 side by side, or, in a run without all five (e.g.
    ``--methods dpo,spo``), the methods it ran (in a row up to 7 panels, else as the family grid)."""
    names = HERO if all(n in samples for n in HERO) else list(samples)
    if len(names) > 7:
        plot_samples(samples, results, path)
        return
    fig = Figure(figsize=(2.75 * len(names), 3.9))
    reference_mean = np.asarray(results["reference"]["mean"], dtype=float)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        draw_method(ax, name, np.asarray(samples[name]), results[name], reference_mean)
        if i:
            ax.tick_params(labelleft=False)
    contour_legend(fig, 0.0)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.2, top=0.83, wspace=0.08)
    fig.savefig(path, dpi=100)


def plot_samples(samples: dict, results: dict, path: Path) -> None:
    """``samples_all.png``: every method, one row per family (rows: ``method_families``)."""
    rows = [(family, [n for n in members if n in samples]) for family, members in method_families().items()]
    rows = [(family, names) for family, names in rows if names]
    cols = max(len(names) for _, names in rows)
    fig = Figure(figsize=(2.6 * cols + 0.4, 3.5 * len(rows) + 0.6))
    reference_mean = np.asarray(results["reference"]["mean"], dtype=float)
    for r, (family, names) in enumerate(rows):
        for c, name in enumerate(names):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            draw_method(ax, name, np.asarray(samples[name]), results[name], reference_mean)
            if c == 0:
                ax.set_ylabel(family, fontsize=10, fontweight="bold")
            else:
                ax.tick_params(labelleft=False)
    contour_legend(fig, 0.0)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.6 / (3.5 * len(rows) + 0.6) + 0.02, top=0.96,
                        wspace=0.1, hspace=0.45)
    fig.savefig(path, dpi=90)


def smooth(values, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window or window < 2:
        return values
    finite = np.where(np.isfinite(values), values, np.nanmean(values))
    return np.convolve(finite, np.ones(window) / window, mode="valid")


# The curves as small multiples: one row per metric, one column per family, each row on one shared scale. Within a
# panel (at most five lines) each method has its own colour from Okabe and Ito's colour-blind-safe palette and its
# own line style, so a panel also reads in grey.
PANEL_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"]
CURVE_ROWS = {  # row -> (y-limits, y-ticks, label)
    "accuracy": ((0.0, 1.0), [0.0, 0.25, 0.5, 0.75, 1.0], "held-out pairwise\nimplicit accuracy\n(ranking only)"),
    "drift": ((0.6, 1.9), [0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8], "sample mean y\n(256 samples):\nthe drift"),
    "loss": ((-1.0, 2.0), [-1, 0, 1, 2], "training loss /\nfirst step's loss\n(smoothed)"),
}


def draw_curve(ax, x, y, limits, **kw) -> None:
    """One line, drawn up to its first point off the row's scale (the line leaves through the frame, it is not clipped
    flat against it) and not beyond; where the values went afterwards is written at the exit."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    low, high = limits
    off = ~np.isfinite(y) | (y < low) | (y > high)
    if not off.any():
        ax.plot(x, y, **kw)
        return
    i = int(np.argmax(off))
    ax.plot(x[: i + 1] if np.isfinite(y[i]) else x[:i], y[: i + 1] if np.isfinite(y[i]) else y[:i], **kw)
    rest = y[i:][np.isfinite(y[i:])]
    went = f"between {rest.min():.2g} and {rest.max():.2g}" if len(rest) else "not finite"
    above = np.isfinite(y[i]) and y[i] > high
    inward = (0.05 + 0.22 * len(ax.texts)) * (high - low)  # a second exit in the same panel goes below the first
    ax.annotate(f"{kw['label']}:\noff scale from {x[i]:.0%} on,\nthen {went}", xy=(x[i], high if above else low),
                xytext=(min(x[i] + 0.05, 0.5), high - inward if above else low + inward), fontsize=6.5,
                va="top" if above else "bottom", color=kw["color"],
                arrowprops={"arrowstyle": "->", "color": kw["color"], "lw": 0.8})


def plot_curves(histories: dict, path: Path) -> None:
    """``curves.png``: held-out implicit accuracy, sample mean y and the smoothed loss against the fraction of
    training done; one column per family of ``method_families`` that ran, one row per metric."""
    ceiling = bayes_ceilings()[1]
    columns = [(family, [n for n in members if n in histories]) for family, members in method_families().items()]
    columns = [(family, names) for family, names in columns if names]
    fig = Figure(figsize=(3.4 * len(columns) + 1.0, 9.2))
    axes = fig.subplots(len(CURVE_ROWS), len(columns), squeeze=False, sharex=True)
    for c, (family, names) in enumerate(columns):
        acc, drift, loss = axes[:, c]
        for k, name in enumerate(names):
            h = histories[name]
            kw = {"color": PANEL_COLOURS[k % len(PANEL_COLOURS)], "ls": LINESTYLES[k % len(LINESTYLES)], "lw": 1.5,
                  "label": TITLES.get(name, name)}
            steps = max(1, len(h["loss"]))
            progress = np.asarray(h["heldout_step"], dtype=float) / steps
            draw_curve(acc, progress, h["heldout_implicit_acc"], CURVE_ROWS["accuracy"][0], **kw)
            if h.get("sample_mean_y"):
                draw_curve(drift, progress, h["sample_mean_y"], CURVE_ROWS["drift"][0], **kw)
            window = max(1, len(h["loss"]) // 30)
            values = smooth(h["loss"], window)  # a moving mean of `window` steps, centred
            if len(values):
                first = abs(h["loss"][0]) or 1.0  # the raw first loss: a smoothed start is itself negative for some
                draw_curve(loss, (np.arange(len(values)) + window // 2) / steps, values / first,
                           CURVE_ROWS["loss"][0], **kw)
        acc.axhline(ceiling, color="0.4", ls=":", lw=1)
        acc.axhline(0.5, color="0.7", ls=":", lw=1)
        drift.axhline(DESIRABLE.mean[1], color="tab:green", ls=":", lw=1)
        loss.axhline(1.0, color="0.7", ls=":", lw=1)
        acc.set_title(family, fontsize=10, fontweight="bold")
        loss.set_xlabel("fraction of training", fontsize=8)
        loss.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=7.5, frameon=False)
    for r, (limits, ticks, label) in enumerate(CURVE_ROWS.values()):
        for c, ax in enumerate(axes[r]):
            ax.set_ylim(*limits)
            ax.set_yticks(ticks)
            ax.set_xlim(0, 1)
            ax.tick_params(labelsize=7, labelleft=c == 0)
            ax.grid(color="0.92", lw=0.6)
        axes[r, 0].set_ylabel(label, fontsize=8)
    axes[0, 0].text(0.98, ceiling - 0.015, f"Bayes ceiling {ceiling:.3f}", fontsize=6.5, color="0.3", ha="right",
                    va="top")
    axes[1, 0].text(0.98, DESIRABLE.mean[1] - 0.03, "desirable mean y 0.8", fontsize=6.5, color="tab:green",
                    ha="right", va="top")
    for ax in axes[-1]:
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "0.25", "0.5", "0.75", "1"])
    title = ("training curves: one column per family, one scale per row (dotted: chance 0.5 and the Bayes ceiling; "
             "the desirable mean y; the first step's loss)")
    wide = len(columns) > 2
    fig.suptitle(title if wide else textwrap.fill(title, 25 * len(columns) + 20), fontsize=9)
    fig.subplots_adjust(left=0.09 if wide else 0.22, right=0.99 if wide else 0.97, bottom=0.17,
                        top=0.92 if wide else 0.88, wspace=0.1, hspace=0.12)
    fig.savefig(path, dpi=100)


def plot_claims(holds: dict, columns: list[str], n_seeds: int, path: Path) -> None:
    """The claims map: one row per claim, one column per setting, each cell the seeds where the claim holds."""
    grid = np.array([[by_point[p] for p in by_point] for by_point in holds.values()], dtype=float) / n_seeds
    fig = Figure(figsize=(0.55 * len(columns) + 4.2, 0.5 * len(holds) + 1.6))
    ax = fig.add_axes((0.34, 0.28, 0.64, 0.62))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (row, col), value in np.ndenumerate(grid):
        ax.text(col, row, f"{round(value * n_seeds)}/{n_seeds}", ha="center", va="center", fontsize=7)
    axis_of = [c.split(" ")[0] for c in columns]
    for col in range(1, len(columns)):
        if axis_of[col] != axis_of[col - 1]:  # a line between the hyperparameters
            ax.axvline(col - 0.5, color="k", lw=1.2)
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(holds)), list(holds), fontsize=7)
    ax.set_title(f"where each claim of paper 001 Sec. 7 holds (seeds out of {n_seeds}; one hyperparameter moved at a "
                 "time from the default)", fontsize=8)
    fig.savefig(path, dpi=110)
