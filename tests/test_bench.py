"""`python -m full.bench` (the per-step time and memory of every offline method) runs the trainer's own step end to
end: each method's objective on the tiny UNet, uncached and cached, with its figures written as JSON. The
replication table's step-cost claim reads these figures (full/lab/replicate_run.py, `step_benchmarks`), so a bench
that no longer runs the trainer's step must fail here, not in a 90-minute run. No timing is asserted: speed
targets live in the benchmark's own output (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_benchmark_runs_each_methods_training_step_and_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    methods = ["sft", "dpo", "dspo"]  # no reference, a reference forward, DSPO's score-matching form
    # a fresh process: the benchmark sets its torch threads, which must not leak into the test's
    done = subprocess.run([sys.executable, "-m", "full.bench", "--config", "tiny", "--batch_size", "1", "--steps", "1",
                           "--warmup", "0", "--methods", *methods, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["steps"]) == {f"{m}/{mode}" for m in methods for mode in ("uncached", "cached")}
    for key, row in figures["steps"].items():
        assert row["ms"] > 0 and row["peak_mb"] >= 0, key
    assert figures["clock"] == "thread CPU" and "x SFT" in done.stdout  # one thread: CPU time, and the table
