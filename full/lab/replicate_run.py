"""The replication run, stage by stage (`python -m full.lab.replicate`; the CLI and the statistics are in
full/lab/replicate.py, the claims and the rule in full/lab/claims.py):

    LAB/model, LAB/clip, LAB/data   the lab's pretrained pipeline, CLIP and preference data (reused; made if missing)
    OUT/train/NAME/                 each (arm, seed)'s LoRA, cached by its command (quick: LAB/train, the lab's own)
    OUT/eval/                       full.evaluate's images and scores.jsonl for every model
    OUT/replication.json            rule, claims with estimate, CI, per-seed values and verdict, checkpoints, cost
    OUT/replication.md, .png        the table (replicate.markdown_table) and the figure
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from full.lab import claims as claims_lib
from full.lab import run as lab_run
from full.lab.replicate import (ReplicationConfig, checkpoint_gains, markdown_table, measure_claims, read_scores,
                                replication_arms)


def checkpoint_models(trained: dict, step: int, seed0_names: set) -> tuple[dict, dict]:
    """{arm: {step: model name}} and {model name: LoRA entry}: seed 0's LoRA saved at `step` (before the end; one
    step only, to keep the evaluation's cost down), for every arm that saved one."""
    found, loras = {}, {}
    for name, entry in trained.items():
        path = Path(entry["lora"]) / f"checkpoint-{step}"
        if step and name in seed0_names and (path / "pytorch_lora_weights.safetensors").is_file():
            found[name] = {step: f"{name}_step{step}"}
            loras[f"{name}_step{step}"] = {**entry, "lora": str(path)}
    return found, loras


def run_replication(out: Path, lab_dir: Path, config: ReplicationConfig, *, launcher: str = "accelerate",
                    quiet: bool = False) -> dict:
    from full.progress import progress_bar

    out.mkdir(parents=True, exist_ok=True)
    progress = lab_run.Progress(quiet)
    progress(f"replication '{config.name}': {len(config.claims)} claims, seeds {list(config.seeds)}, lab {lab_dir}")
    model, clip = lab_run.ensure_pretrained(lab_dir, config.lab, progress)
    data = lab_run.ensure_preference_data(lab_dir, config.lab, model, progress)
    arms = replication_arms(config)
    train_root = lab_dir if config.train_in_lab else out
    start = time.perf_counter()
    with progress_bar(total=len(arms), desc="train arms", unit="arm", disable=quiet) as bar:
        trained = lab_run.train_all(train_root, config.lab, model, clip, data, launcher=launcher, progress=progress,
                                    selected=arms, on_done=lambda name: bar.update(1))
    progress.timed("train", time.perf_counter() - start)
    seed0 = {m.name for m in arms if m.seed == 0}
    checkpoints, checkpoint_loras = checkpoint_models(trained, config.checkpoint_every, seed0)
    scorers = tuple(dict.fromkeys(spec for spec, _ in claims_lib.SCORES.values()))
    start = time.perf_counter()
    progress(f"evaluate base + {len(trained) + len(checkpoint_loras)} LoRAs with full.evaluate")
    lab_run.evaluate(out, config.lab, model, {**trained, **checkpoint_loras}, launcher=launcher, scorers=scorers,
                     report=False)
    progress.timed("evaluate", time.perf_counter() - start)
    scores = read_scores(out / "eval" / "scores.jsonl")
    spm_file = train_root / "train" / "spm" / "lab_spm.json"
    spm_seconds = json.loads(spm_file.read_text())["seconds"] if spm_file.is_file() else 0.0
    rows = measure_claims(config, scores, trained, spm_seconds)
    result = {
        "rule": claims_lib.RULE, "min_seeds": config.min_seeds, "claims": rows,
        "checkpoints": checkpoint_gains(scores, checkpoints),
        "arms": {name: {"seconds": e["seconds"], "command": e["command"]} for name, e in trained.items()},
        "spm_seconds": spm_seconds,
        "config": {"name": config.name, "seeds": list(config.seeds), "checkpoint_every": config.checkpoint_every,
                   "n_resamples": config.n_resamples, "lab_dir": str(lab_dir),
                   "lab": {k: v for k, v in asdict(config.lab).items() if k != "pretrain"}},
        "stage_seconds": progress.times,
    }
    result["wall_s"] = round(time.perf_counter() - progress.start, 1)
    if config.calibrate:  # the repository's fixed CPU workload, right after the run (docs/benchmarks.md)
        from toy.calib import measure

        result["calibration_s"] = round(measure(), 2)
        result["wall_calibration_units"] = round(result["wall_s"] / result["calibration_s"], 1)
    (out / "replication.json").write_text(json.dumps(result, indent=1))
    (out / "replication.md").write_text(markdown_table(result) + "\n")
    replication_figure(result, out / "replication.png")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("holds", "reversed", "inconclusive")}
    progress(f"wrote {out / 'replication.json'}: {counts} ({result['wall_s']:.0f}s)")
    return result


VERDICT_COLOURS = {"holds": "tab:green", "reversed": "tab:red", "inconclusive": "tab:gray"}


def replication_figure(result: dict, path: Path) -> Path:
    """One row per claim: the lab's estimate with its 95% CI against the no-effect line (0.5 for a win rate, 1 for
    a ratio), coloured by verdict, and the paper's number written beside it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = result["claims"]
    fig = Figure(figsize=(13, 0.42 * len(rows) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    for y, row in enumerate(rows):
        lab, ratio = row["lab"], row["kind"].startswith("ratio")
        colour = VERDICT_COLOURS[row["verdict"]]
        if lab["estimate"] is not None:  # a ratio is drawn as log2(ratio)/4 + 0.5: 1 on the 0.5 line, 2x at 0.75
            tx = (lambda v: min(1.0, max(0.0, 0.5 + math.log2(max(v, 1e-3)) / 4))) if ratio else \
                (lambda v: min(1.0, max(0.0, v)))  # noqa: E731
            ax.plot([tx(lab["ci"][0]), tx(lab["ci"][1])], [y, y], color=colour, lw=3)
            ax.plot([tx(lab["estimate"])], [y], "o", color=colour)
        ax.text(1.03, y, f"paper: {row['paper_value']}", va="center", fontsize=7, transform=ax.get_yaxis_transform())
    ax.axvline(0.5, color="black", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['id']}: {r['a']} vs {r['b']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("lab estimate, 95% CI: win rate W(A, B) (0.5 = no difference); ratio rows: 0.5 + log2(A/B)/4")
    ax.legend(handles=[Patch(color=c, label=v) for v, c in VERDICT_COLOURS.items()], loc="lower left", fontsize=7)
    fig.subplots_adjust(left=0.3, right=0.68)
    fig.savefig(path, dpi=120)
    return path
