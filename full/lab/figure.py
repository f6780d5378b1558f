"""The lab's figure: what each method draws (same held-out prompts, same seed) and how often it beats the base model.

Left: one row per model (the base first), one column per held-out caption, seed 0 of full.evaluate's images.
Right: the rater's win rate over the base model with its 95% bootstrap CI (over prompts), the caption fidelity
next to each bar. A bar whose CI lies right of 0.5 is a method that moved the reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def lab_figure(eval_dir: Path, results: dict, path: Path, n_prompts: int = 9) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no backend switch, safe inside a user's notebook
    from PIL import Image

    rows = [json.loads(line) for line in (Path(eval_dir) / "manifest.jsonl").read_text().splitlines() if line.strip()]
    seed = min(r["seed"] for r in rows)
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in rows))[:n_prompts]
    captions = {r["prompt_id"]: r["prompt"] for r in rows if r["model"] == "base"}  # CSFT's carry its prefix
    names = ["base", *results["methods"]]
    where = {(r["model"], r["prompt_id"]): r["path"] for r in rows if r["seed"] == seed}

    fig = Figure(figsize=(4 + 0.9 * len(prompt_ids) + 5, 0.75 * len(names) + 1.5))
    grid = fig.add_gridspec(1, 2, width_ratios=[0.9 * len(prompt_ids), 5], wspace=0.2)
    ax = fig.add_subplot(grid[0])
    # one mosaic of 32 px tiles with a 2 px white gutter
    tile = 34
    mosaic = np.ones((tile * len(names), tile * len(prompt_ids), 3))
    for i, name in enumerate(names):
        for j, pid in enumerate(prompt_ids):
            if (name, pid) in where:
                image = np.asarray(Image.open(Path(eval_dir) / where[(name, pid)]).convert("RGB"), dtype=np.float64)
                mosaic[i * tile:i * tile + 32, j * tile:j * tile + 32] = image / 255.0
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([i * tile + 16 for i in range(len(names))], names, fontsize=8)
    ax.set_xticks([j * tile + 16 for j in range(len(prompt_ids))],
                  [captions[p].replace("a ", "", 1).replace(" background", "").replace(" on a ", "\n")
                   for p in prompt_ids], fontsize=6)
    ax.set_title(f"held-out captions, seed {seed}", fontsize=9)

    ax = fig.add_subplot(grid[1])
    methods = list(results["methods"])
    y = np.arange(len(methods))[::-1]
    rates = np.array([results["methods"][m]["win_rate"] for m in methods])
    low = np.array([results["methods"][m]["ci"][0] for m in methods])
    high = np.array([results["methods"][m]["ci"][1] for m in methods])
    colours = ["tab:green" if lo > 0.5 else "tab:red" if hi < 0.5 else "tab:gray" for lo, hi in zip(low, high)]
    ax.barh(y, rates, color=colours, alpha=0.8)
    # the point marks the win rate too, so a rate of 0 (a bar of no width) is still seen
    ax.errorbar(rates, y, xerr=[rates - low, high - rates], fmt="o", color="black", ms=3, capsize=2, lw=1)
    ax.axvline(0.5, color="black", lw=0.8, ls="--")
    for yi, m in zip(y, methods):
        ax.text(1.02, yi, f"{results['methods'][m]['win_rate']:.2f}, fid. {results['methods'][m]['fidelity']:.2f}",
                va="center", fontsize=7)
    ax.set_yticks(y, methods, fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("win rate over base (rater: larger shape), 95% CI")
    ax.set_title(f"base fidelity {results['base']['fidelity']:.2f}", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path
