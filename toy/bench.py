"""``python -m toy.bench``: how long ``python -m toy`` takes, in seconds and in calibration units.

Absolute times do not transfer between machines, so the targets (issue 14) are ratios: the wall time of the whole
``python -m toy`` *process* (interpreter start, imports, everything, exit) divided by the seconds of the fixed CPU
workload ``python -m toy.calib`` (``toy/calib.py``), measured back to back on the same machine:

    python -m toy --quick    <= 1.5 calibration units
    python -m toy            <= 4   calibration units

On a shared machine both times move from run to run (the calibration 5.3-7.4 s within minutes here), and they
move differently: the calibration keeps the fastest of its three repeats, a run has no such shield. ``--repeat``
measures several back-to-back pairs and judges the target on the median ratio.

A benchmark, not a test: it prints figures and asserts nothing. For each configuration it runs the calibration,
then the real command in a fresh process, and prints both times, the ratio, the phases the run reports in
``metrics.json`` (summed over the worker processes: CPU-side seconds, not wall), and the machine's load average
(other jobs on the machine inflate the job more than the calibration, which keeps its fastest of three repeats).
``$MINIPREF_CALIB=/path/to/calib.py`` replaces the built-in workload by another script that prints seconds.

    python -m toy.bench                 # quick, then full
    python -m toy.bench --only quick    # or: --only full
    python -m toy.bench --check         # also compare metrics.json with the recorded seed-0 numbers (toy/golden.py)
    python -m toy.bench --only quick --repeat 5   # 5 calib/run pairs: each ratio, and their median
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toy import golden

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"quick": 1.5, "full": 4.0}


def find_calib() -> Path | None:
    """The calibration script: ``$MINIPREF_CALIB`` if set (any script that prints seconds last), else the
    repository's own workload ``toy/calib.py`` (``python -m toy.calib``; it imports only torch, so it runs as a file
    too). None when the file named is missing."""
    override = os.environ.get("MINIPREF_CALIB")
    path = Path(override) if override else REPO / "toy" / "calib.py"
    return path if path.is_file() else None


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds of ``command`` in a fresh process (from the repository root), the CPU seconds of that process
    and its workers (less sensitive to other jobs than the wall time), and its stdout."""
    start, cpu = time.perf_counter(), children_cpu()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"toy.bench: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds, children_cpu() - cpu, result.stdout


def calibrate(calib: Path) -> float:
    return float(timed([sys.executable, str(calib)])[2].split()[-1])


def verdict(label: str, ratio: float) -> str:
    target = TARGETS[label]
    return f"{ratio:.2f} calibration units (target <= {target}: {'met' if ratio <= target else 'NOT met'})"


def report(label: str, process_s: float, cpu_s: float, calib_s: float, metrics: dict) -> None:
    print(f"\n{'python -m toy' + (' --quick' if label == 'quick' else '')}: {process_s:.1f} s process wall, "
          f"calib {calib_s:.2f} s -> {verdict(label, process_s / calib_s)}; CPU of the process and its workers "
          f"{cpu_s:.1f} s")
    print(f"  inside the run (metrics.json wall_s) {metrics['wall_s']:6.2f} s; start-up, imports and exit "
          f"{process_s - metrics['wall_s']:.2f} s")
    phases = metrics["phases_s"]
    finetune = {k.split("/", 1)[1]: v for k, v in phases.items() if k.startswith("finetune/")}
    for name in ("pretrain", "methods (wall)", "sample", "evaluate", "figures"):
        print(f"  {name:<26} {phases.get(name, 0.0):6.2f} s")
    print(f"  {'fine-tuning (sum)':<26} {sum(finetune.values()):6.2f} s")
    for name, seconds in finetune.items():
        print(f"    {name:<24} {seconds:6.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m toy.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("quick", "full"), help="run one configuration only")
    parser.add_argument("--check", action="store_true", help="compare metrics.json with the recorded seed-0 numbers")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure N back-to-back (calib, run) pairs per configuration; the target is judged on "
                             "the median ratio (default 1)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    calib = find_calib()
    if calib is None:
        where = os.environ.get("MINIPREF_CALIB")
        missing = f"MINIPREF_CALIB={where} is not a file" if where else "toy/calib.py is missing"
        sys.exit(f"toy.bench: calib.py not found: {missing}; unset MINIPREF_CALIB to use the repository's workload "
                 "(python -m toy.calib) or set MINIPREF_CALIB=/path/to/calib.py")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; calibration: {calib}")
    start_s, _, _ = timed([sys.executable, "-c", "import toy.cli, toy.run"])
    print(f"interpreter start + toy imports: {start_s:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("quick", "full"):
            if args.only not in (None, label):
                continue
            ratios = []
            for _ in range(args.repeat):
                calib_s = calibrate(calib)
                out = Path(tmp) / label
                command = [sys.executable, "-m", "toy", "--out", str(out), "--no_progress"]
                command += ["--quick"] if label == "quick" else []
                process_s, cpu_s, _ = timed(command)
                metrics = json.loads((out / "metrics.json").read_text())
                report(label, process_s, cpu_s, calib_s, metrics)
                if args.check:
                    golden.check(metrics, label)
                ratios.append(process_s / calib_s)
            if args.repeat > 1:
                print(f"\n{label}: ratios {', '.join(f'{r:.2f}' for r in ratios)}; median "
                      f"{verdict(label, statistics.median(ratios))}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (1-minute average; it includes these runs)")


if __name__ == "__main__":
    main()
