"""What every lesson shares: quick mode, the output folder, the repo root on ``sys.path``, and checked claims.

Each lesson starts with ``import lesson``. That works when the lesson runs as a script
(``python tutorials/01_policy.py``: Python puts ``tutorials/`` first on ``sys.path``) and as a notebook opened in
``tutorials/`` (``jupytext --to notebook tutorials/01_policy.py``, then Jupyter's working directory is ``tutorials/``).

* ``QUICK``: ``MINIPREF_QUICK=1`` in the environment or ``--quick`` on the command line. Small sizes and few steps,
  the same code path; the test suite runs every lesson this way (tests/test_tutorials.py).
* ``OUT``: ``MINIPREF_TUTORIAL_OUT`` or ``tutorials/out/``. Figures are always saved there; in a notebook they are
  also shown inline.
* ``check(claim, ok, detail)``: print a claim with the numbers behind it, and stop the lesson if it is false, so a
  lesson whose text no longer matches the code fails in CI instead of rotting. ``check_close(claim, value, target,
  rel_tol=, abs_tol=)`` and ``check_range(claim, value, low=, high=)`` are the two shapes most claims take ("equals X to
  within a tolerance", "lies between a and b" or "is above a"); they print the value, the target and the tolerance
  themselves.
* ``save_results(name, dict)``: the key numbers of a lesson as ``OUT/<name>.json`` (the test reads them back).
* ``SOLUTIONS``: ``--solutions`` on the command line or ``MINIPREF_SOLUTIONS=1``. Each lesson ends with the solutions
  of its exercises, functions that state a prediction, run the experiment and check the prediction;
  ``run_solutions(name, *functions)`` runs them only in this mode and saves what they return as
  ``OUT/<name>_solutions.json``. The test suite runs every lesson with ``--quick --solutions``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parent
ROOT = TUTORIALS.parent
if str(ROOT) not in sys.path:  # `toy`, `full` and `tests.tiny_models` live at the repo root, next to minipref
    sys.path.insert(0, str(ROOT))

IN_NOTEBOOK = "ipykernel" in sys.modules
# Progress bars would bury a lesson's printed checks (and lesson 7's trainer, pipelines and model writers all draw
# them). tqdm >= 4.66 reads its defaults from TQDM_* variables when it is first imported, so this must come before
# anything imports tqdm; the Hub client has its own switch. Set TQDM_DISABLE=0 to see them.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
QUICK = os.environ.get("MINIPREF_QUICK", "") not in ("", "0") or "--quick" in sys.argv
SOLUTIONS = os.environ.get("MINIPREF_SOLUTIONS", "") not in ("", "0") or "--solutions" in sys.argv
OUT = Path(os.environ.get("MINIPREF_TUTORIAL_OUT") or TUTORIALS / "out")
OUT.mkdir(parents=True, exist_ok=True)

if not IN_NOTEBOOK:  # run as a script, headless: figures go to files (a backend the user set is kept)
    os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

# The toy MLPs and the tiny UNets are far too small for intra-op parallelism: one thread is the fastest, and it
# keeps a lesson from fighting other jobs for the cores (docs/toy.md measures this).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lessons build their models from configs: never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def banner(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 100 - len(title)), flush=True)


def check(claim: str, ok: bool, detail: str = "") -> None:
    """Print ``claim`` with its numbers; raise ``AssertionError`` if it does not hold."""
    print(f"[{'ok' if ok else 'FAILED'}] {claim}" + (f": {detail}" if detail else ""), flush=True)
    if not ok:
        raise AssertionError(f"{claim}: {detail}")


def check_close(claim: str, value: float, target: float, *, rel_tol: float = 0.0, abs_tol: float = 0.0,
                detail: str = "") -> None:
    """``check`` that ``|value - target| <= max(rel_tol * |target|, abs_tol)`` (``math.isclose``'s rule), printing
    both numbers and the tolerance."""
    tolerance = max(rel_tol * abs(target), abs_tol)
    gap = abs(value - target)
    numbers = f"{value:.6g} vs {target:.6g} (gap {gap:.2g}, tolerance {tolerance:.2g})"
    check(claim, gap <= tolerance, numbers + (f"; {detail}" if detail else ""))


def check_range(claim: str, value: float, low: float | None = None, high: float | None = None, detail: str = "") -> None:
    """``check`` that ``low < value < high`` (either bound may be omitted), printing the value and the bounds."""
    ok = (low is None or value > low) and (high is None or value < high)
    bounds = f"{'-inf' if low is None else f'{low:.6g}'} < {value:.6g} < {'inf' if high is None else f'{high:.6g}'}"
    check(claim, ok, bounds + (f"; {detail}" if detail else ""))


def save_figure(fig, name: str) -> Path:
    """Write ``OUT/<name>.png``; show it in a notebook, close it otherwise."""
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"figure: {path}", flush=True)
    if IN_NOTEBOOK:
        plt.show()
    else:
        plt.close(fig)
    return path


def save_results(name: str, results: dict) -> Path:
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    print(f"results: {path}", flush=True)
    return path


def run_solutions(name: str, *solutions) -> dict | None:
    """Run the exercises' solutions in order if ``SOLUTIONS`` is set (read at call time, so a notebook can set
    ``lesson.SOLUTIONS = True`` first); save what each returns as ``OUT/<name>_solutions.json``."""
    if not SOLUTIONS:
        print("solutions: not run (add --solutions, or set MINIPREF_SOLUTIONS=1)", flush=True)
        return None
    results = {}
    for number, solution in enumerate(solutions, start=1):
        banner(f"solution {number}")
        results[str(number)] = solution()
    save_results(f"{name}_solutions", {"quick": QUICK, "solutions": results})
    return results


def pretrained_toy(seed: int = 0):
    """The toy's pretrained model, exactly as ``python -m toy [--quick] --seed 0`` pretrains it.

    Returns ``(reference, scheduler, losses)``: the frozen epsilon-MLP, diffusers' ``DDPMScheduler`` (T = 1000) and
    its pretraining loss per step. Quick mode pretrains 600 steps (the toy's ``--quick``), otherwise 2000.
    """
    from toy.model import make_noise_scheduler
    from toy.run import generator_for
    from toy.train import PretrainConfig, pretrain

    scheduler = make_noise_scheduler()
    torch.manual_seed(seed)  # the initial weights, as toy/run.py seeds them
    config = PretrainConfig(steps=600) if QUICK else PretrainConfig()
    reference, losses = pretrain(config, scheduler, generator_for(seed, "pretrain"), progress=False)
    return reference, scheduler, losses


print(f"minipref tutorial: {'QUICK mode' if QUICK else 'full mode'}, figures in {OUT}", flush=True)
