"""``python -m toy.sweep``: where in hyperparameter space each claim of paper 001 Sec. 7 holds on the toy.

docs/toy.md checks the Diffusion-KTO paper's toy findings at one setting (beta 500, 600 steps, lr 1e-3, gamma 0.8,
batch reference point). This sweep moves one hyperparameter at a time away from that setting, for SFT, DPO and the
four KTO utilities, and decides each claim at every point with the rule in ``CLAIMS``. No default is tuned: the
defaults stay what ``python -m toy`` runs, and the default column of the map is that run's numbers.

    python -m toy.sweep --out runs/sweep                     # every axis, seeds 0,1,2
    python -m toy.sweep --out runs/sweep-beta --axes beta --seeds 0 --quick

Outputs in ``--out``: ``sweep.json`` (every run's metrics), ``claims.md`` (the map as a table: seeds out of the
total where the claim holds), ``claims.png`` (the same as a figure). Every run draws its batches from the same
generator as ``python -m toy`` (seed and method name), so settings differ by their hyperparameter, not by luck.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .cli import positive, seed_list
from .methods import METHODS
from .parallel import default_workers, run_jobs
from .run import QUICK_STEP_FACTOR, RunConfig, Timer, method_job, prepare

SWEPT_METHODS = ("sft", "dpo", "kto_kahneman_tversky", "kto_loss_averse", "kto_risk_seeking", "kto_risk_seeking_bounded")
KTO = SWEPT_METHODS[2:]
DEFAULTS = {"beta": 500.0, "steps": 600, "lr": 1e-3, "gamma": 0.8, "reference_point": "batch"}
AXES = {  # each axis: its values (the default among them) and the methods it applies to
    "beta": ([100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0], SWEPT_METHODS[1:]),
    "steps": ([150, 300, 600, 1200, 2400], SWEPT_METHODS),
    "lr": ([1e-4, 3e-4, 1e-3, 3e-3], SWEPT_METHODS),
    "gamma": ([0.5, 0.8, 0.95], KTO),
    "reference_point": (["batch", "zero"], KTO),
}


def diverged(m: dict) -> bool:
    return m["diverged_at_step"] is not None or m["nonfinite_frac"] > 0


# Each claim: (the paper's words, the rule that decides it from the metrics of one setting). "in D"/"in U" are the
# fractions of samples in the desirable/undesirable disc; exact desirable samples score 0.865/0.396.
CLAIMS = {
    "DPO deviates from the desirable distribution":
        lambda r: r["dpo"]["energy_distance"] > r["reference"]["energy_distance"],  # ends farther than it started
    "risk-seeking (unbounded form) behaves like SFT":
        lambda r: not diverged(r["kto_risk_seeking"])
        and abs(r["kto_risk_seeking"]["desirable_frac"] - r["sft"]["desirable_frac"]) <= 0.1,
    "risk-seeking (bounded form) behaves like SFT":
        lambda r: not diverged(r["kto_risk_seeking_bounded"])
        and abs(r["kto_risk_seeking_bounded"]["desirable_frac"] - r["sft"]["desirable_frac"]) <= 0.1,
    "Kahneman-Tversky balances (>= 80% of SFT's in D, <= 75% of its in U)":
        lambda r: r["kto_kahneman_tversky"]["desirable_frac"] >= 0.8 * r["sft"]["desirable_frac"]
        and r["kto_kahneman_tversky"]["undesirable_frac"] <= 0.75 * r["sft"]["undesirable_frac"],
    "DPO implicit accuracy > 0.9": lambda r: r["dpo"]["pairwise_implicit_acc"] > 0.9,
    "KTO (Kahneman-Tversky) implicit accuracy > 0.9": lambda r: r["kto_kahneman_tversky"]["pairwise_implicit_acc"] > 0.9,
}


def settings(axes: list[str]) -> list[tuple[str, object]]:
    """``("default", None)`` and every non-default value of the chosen axes, as ``(axis, value)``."""
    points = [("default", None)]
    for axis in axes:
        points += [(axis, value) for value in AXES[axis][0] if value != DEFAULTS[axis]]
    return points


def runs_of(point: tuple[str, object], quick: bool) -> list[tuple[tuple, object]]:
    """The ``((axis, value, method), spec)`` runs of one setting: the methods its axis applies to (all at default)."""
    axis, value = point
    names = SWEPT_METHODS if axis == "default" else AXES[axis][1]
    runs = []
    for name in names:
        spec = METHODS[name]
        if quick:
            spec = replace(spec, steps=max(1, round(spec.steps * QUICK_STEP_FACTOR)))
        if axis == "steps":
            spec = replace(spec, steps=max(1, round(value * (QUICK_STEP_FACTOR if quick else 1))))
        elif axis != "default":
            spec = spec.with_overrides(**{axis: value})
        runs.append(((axis, value, name), spec))
    return runs


def sweep_job(shared, run: tuple) -> tuple:
    """One run of the sweep: ``method_job`` with the run's spec; returns its key, metrics and seconds."""
    key, spec = run
    result = method_job(shared, spec)
    return key, result["metrics"], sum(result["seconds"].values())


def table_for(point: tuple[str, object], seed_results: list[dict]) -> dict:
    """The metrics a setting's claims are decided on, per seed: methods off this axis take their default run."""
    axis, value = point
    tables = []
    for results in seed_results:
        table = {name: results[("default", None, name)] for name in ("reference", *SWEPT_METHODS)}
        table.update({name: results[(axis, value, name)] for name in SWEPT_METHODS if (axis, value, name) in results})
        tables.append(table)
    return tables


def decide(points: list[tuple[str, object]], seed_results: list[dict]) -> dict:
    """``{claim: {point: seeds where it holds}}``."""
    return {claim: {point: sum(bool(rule(t)) for t in table_for(point, seed_results)) for point in points}
            for claim, rule in CLAIMS.items()}


def label(point: tuple[str, object]) -> str:
    axis, value = point
    if axis == "default":
        return "default"
    return f"{axis} {value:g}" if isinstance(value, float) else f"{axis} {value}"


def write_outputs(out: Path, points, holds: dict, seeds: list[int], records: list, seconds: float, quick: bool):
    (out / "sweep.json").write_text(json.dumps({"seeds": seeds, "quick": quick, "wall_s": seconds, "runs": records}, indent=1))
    lines = ["| claim | " + " | ".join(label(p) for p in points) + " |", "|---" * (len(points) + 1) + "|"]
    for claim, by_point in holds.items():
        lines.append(f"| {claim} | " + " | ".join(f"{by_point[p]}/{len(seeds)}" for p in points) + " |")
    lines += ["", f"seeds {', '.join(map(str, seeds))}{' (--quick)' if quick else ''}; each cell: seeds where the claim "
              f"holds; one hyperparameter moved at a time from the default ({', '.join(f'{k} {v}' for k, v in DEFAULTS.items())}); "
              f"{len(records)} runs in {seconds:.0f} s."]
    (out / "claims.md").write_text("\n".join(lines) + "\n")
    from .plots import plot_claims  # matplotlib is imported only when drawing

    plot_claims(holds, [label(p) for p in points], len(seeds), out / "claims.png")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m toy.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="seeds, e.g. 0,1,2 (default)")
    parser.add_argument("--axes", default=",".join(AXES), help=f"comma-separated subset of: {', '.join(AXES)} (default all)")
    parser.add_argument("--quick", action="store_true", help="python -m toy --quick settings (a quarter of the steps)")
    parser.add_argument("--workers", type=positive(int), help="worker processes (default: 2 on 2+ cores)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        parser.error(f"argument --axes: unknown axis {', '.join(map(repr, unknown)) or '(none given)'}; valid: {', '.join(AXES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or default_workers()
    torch.set_num_threads(1)  # one thread per worker: fastest for these tiny MLPs (as python -m toy)

    started = time.perf_counter()
    points = settings(axes)
    runs = [run for point in points for run in runs_of(point, args.quick)]
    runs.sort(key=lambda run: -run[1].steps)  # the longest first, so the workers finish together
    seed_results, records = [], []
    for seed in args.seeds:
        config = RunConfig(out=args.out, seed=seed, quick=args.quick, progress=False, workers=workers)
        shared, _ = prepare(config, Timer())
        results = {("default", None, "reference"): method_job(shared, None)["metrics"]}
        records.append({"seed": seed, "axis": "default", "value": None, "method": "reference",
                        **{k: results[("default", None, "reference")][k] for k in ("desirable_frac", "undesirable_frac",
                                                                                  "energy_distance", "mean")}})
        for key, metrics, seconds in run_jobs(sweep_job, shared, runs, workers):
            results[key] = metrics
            records.append({"seed": seed, "axis": key[0], "value": key[1], "method": key[2], "seconds": seconds,
                            **{k: metrics[k] for k in ("desirable_frac", "undesirable_frac", "energy_distance", "mean",
                                                       "pairwise_implicit_acc", "diverged_at_step")}})
        print(f"seed {seed}: {len(runs)} runs, {time.perf_counter() - started:.0f} s so far", file=sys.stderr)
        seed_results.append(results)
        holds = decide(points, seed_results)  # written after every seed: a long sweep shows its progress
        write_outputs(args.out, points, holds, args.seeds[: len(seed_results)], records,
                      time.perf_counter() - started, args.quick)
    print((args.out / "claims.md").read_text())
    return holds


if __name__ == "__main__":
    main()
