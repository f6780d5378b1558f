"""The whole comparison: pretrain, fine-tune one copy per method, sample, evaluate, write the outputs.

``run(RunConfig(...))`` is what ``python -m toy`` and ``python -m toy.bench`` call. Outputs in ``config.out``:

* ``samples.png``: the five methods of paper 001's Fig. 7 (reference, SFT, DPO, KTO Kahneman-Tversky and
  risk-seeking bounded) as scatter plots; ``samples_all.png``: every method, one row per family;
* ``curves.png``: held-out implicit accuracy, sample mean y and normalised loss against training progress, as small
  multiples: one row per metric, one column per family (``curves.json``: the numbers);
* ``metrics.json`` and ``metrics.md``: the numbers (other tools read ``metrics.json``: keep its shape);
* ``samples.npz``: the samples themselves, one array per method.

``run_seeds`` repeats ``run`` per seed (``seed_<n>/``) and writes ``summary.json`` / ``summary.md`` (mean +- std).

Determinism: every random draw comes from a ``torch.Generator`` seeded from ``(seed, phase name)``; a method's
generator depends only on the seed and the method's name, so ``--methods dpo`` reproduces the ``dpo`` numbers of
a full run, and ``method_job`` (one method's fine-tuning, sampling and evaluation) gives the same result in a
worker process as in this one (toy/parallel.py). Same seed, same ``metrics.json`` (timings aside).
"""

from __future__ import annotations

import importlib
import json
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .seeding import generator_for  # noqa: F401  (also the tutorials' and train_dpo.py's)
from .data import DESIRABLE, PreferenceData, bayes_ceilings
from .evaluate import HeldOutPairs, implicit_accuracy, mean_within, sample_metrics
from .flow import FlowSchedule, flow_method_names, flow_record, make_euler_sampler, pretrain_flow
from .methods import MethodSpec, resolve
from .model import condition
from .parallel import default_workers, run_jobs
from .sampling import SPO_CHAIN_STEPS, make_sampler, sample
from .schedule import DDIMSteps, DPMSolver, NoiseSchedule
from .train import CURVE_POINTS, PretrainConfig, finetune, pretrain

REFERENCE = "reference"  # the pretrained model's key in metrics.json
QUICK_STEP_FACTOR = 0.25  # --quick: each method runs a quarter of its steps
# Points on each training curve. Each costs the same at any step count (held-out pairs and 256 samples), so --quick,
# a quarter of the steps, draws half as many: coarser curves, the same metrics.json (a curve draws its own noise).
QUICK_CURVE_POINTS = CURVE_POINTS // 2


@dataclass
class RunConfig:
    out: Path
    seed: int = 0
    methods: list[str] | None = None  # None: all
    quick: bool = False
    steps: int | None = None  # override every method's fine-tuning steps
    beta: float | None = None  # override every method's beta (methods without one ignore it)
    lr: float | None = None  # override every method's learning rate
    tau: float | None = None  # Diff-contrast temperature
    spin_iterations: int | None = None
    spo_oracle: bool = False  # SPO scores candidates with the exact log-density ratio instead of a learned SPM
    n_samples: int = 3500
    n_train: int = 2000  # fine-tuning set size per side (desirable, undesirable)
    eval_pairs: int = 2000
    eval_draws: int = 32
    progress: bool = True
    figures: bool = True
    workers: int | None = None  # processes for the methods' jobs (None: 2 where there are 2 cores; 1: this process)
    flow: bool = False  # the rectified-flow toy (toy/flow.py, python -m toy --flow); it skips SPO

    def method_specs(self) -> list[MethodSpec]:
        """The selected methods with this run's overrides applied."""
        specs = []
        for spec in resolve(flow_method_names(self.methods) if self.flow else self.methods):  # flow: SPO refused
            steps = self.steps
            if steps is None and self.quick:
                steps = max(1, round(spec.steps * QUICK_STEP_FACTOR))
            specs.append(spec.with_overrides(
                beta=self.beta, steps=steps, lr=self.lr, tau=self.tau, iterations=self.spin_iterations,
                oracle=self.spo_oracle or None,
            ))
        return specs


class Timer:
    """Accumulates wall time per named phase."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Shared:
    """What every method's job reads: built once after pretraining (worker processes inherit it)."""

    config: RunConfig
    reference: torch.nn.Module
    data: PreferenceData
    scheduler: NoiseSchedule
    sampler: DPMSolver
    ddim: DDIMSteps
    heldout: HeldOutPairs  # the evaluation pairs
    curve_pairs: HeldOutPairs  # the smaller set the training curves are measured on
    desirable_reference: torch.Tensor  # a fixed desirable sample: the energy distance compares against it
    reference_within: float  # its within-sample term, computed once
    n_samples: int


def method_job(shared: Shared, spec: MethodSpec | None) -> dict:
    """One method from start to finish: fine-tune a copy of the reference, sample it, evaluate it.

    ``spec=None`` is the reference itself (sampled and evaluated, not trained). The result depends only on the
    seed and the method's name, so it is the same in any process and any order (toy/parallel.py).
    """
    config, seconds = shared.config, {}
    name, model, history = REFERENCE, shared.reference, None
    if spec is not None:
        start = time.perf_counter()
        torch.manual_seed(zlib.crc32(f"{config.seed}/{spec.name}".encode()))  # weights a method creates (SPO's SPM)
        model, history = finetune(
            spec, shared.reference, shared.data, shared.scheduler, shared.sampler, shared.ddim,
            generator_for(config.seed, spec.name), shared.curve_pairs,
            curve_points=QUICK_CURVE_POINTS if config.quick else CURVE_POINTS,
            progress=config.progress and config.workers == 1,
        )
        name, seconds[f"finetune/{spec.name}"] = spec.name, time.perf_counter() - start
    cond = condition(None if spec is None else spec.sample_condition, 1)  # (1, 2) or None
    start = time.perf_counter()
    batch_cond = None if cond is None else cond.expand(shared.n_samples, -1)
    samples = sample(model, shared.sampler, shared.n_samples, generator_for(config.seed, f"samples/{name}"), batch_cond)
    seconds["sample"], start = time.perf_counter() - start, time.perf_counter()
    metrics = sample_metrics(samples, shared.desirable_reference, shared.reference_within)
    metrics.update(implicit_accuracy(model, shared.scheduler, shared.heldout, cond))
    seconds["evaluate"] = time.perf_counter() - start
    metrics["train_s"] = seconds.get(f"finetune/{name}", 0.0)
    metrics["diverged_at_step"] = None if history is None else history.diverged_at_step
    return {"name": name, "metrics": metrics, "samples": samples,
            "history": None if history is None else history.as_dict(), "seconds": seconds}


def figure_job(outputs: tuple, filename: str) -> None:
    """Draw one figure into the output directory (matplotlib is imported only when drawing)."""
    from .plots import plot_curves, plot_hero, plot_samples

    samples, results, histories, out = outputs
    if filename == "samples.png":
        plot_hero(samples, results, out / filename)
    elif filename == "samples_all.png":
        plot_samples(samples, results, out / filename)
    else:
        plot_curves(histories, out / filename)


def prepare(config: RunConfig, timer: Timer) -> tuple[Shared, list[float]]:
    """Pretrain the reference and draw everything the methods share; returns it and the pretraining losses."""
    n_samples = min(config.n_samples, 1000) if config.quick else config.n_samples
    eval_pairs, eval_draws = (500, 16) if config.quick else (config.eval_pairs, config.eval_draws)
    scheduler = NoiseSchedule()  # diffusers' DDPMScheduler numbers, without importing diffusers (toy/schedule.py)
    pretrain_model, make_evaluation_sampler = pretrain, make_sampler
    if config.flow:  # same data, network and metrics; the flow toy's forward process, loss and sampler
        scheduler, pretrain_model, make_evaluation_sampler = FlowSchedule(), pretrain_flow, make_euler_sampler
    with timer.phase("pretrain"):
        torch.manual_seed(config.seed)  # the model's initial weights
        pre_config = PretrainConfig(steps=600) if config.quick else PretrainConfig()
        reference, pretrain_losses = pretrain_model(pre_config, scheduler, generator_for(config.seed, "pretrain"),
                                                    config.progress)
    with timer.phase("evaluate"):
        desirable_reference = DESIRABLE.sample(n_samples, generator_for(config.seed, "desirable reference"))
        shared = Shared(
            config, reference, PreferenceData.draw(config.n_train, generator_for(config.seed, "preference data")),
            scheduler, make_evaluation_sampler(scheduler),
            None if config.flow else DDIMSteps(scheduler, SPO_CHAIN_STEPS),  # the flow toy has no stochastic steps
            HeldOutPairs.draw(reference, scheduler, eval_pairs, eval_draws,
                              generator_for(config.seed, "held-out pairs")),
            HeldOutPairs.draw(reference, scheduler, 256, 8, generator_for(config.seed, "curve pairs")),
            desirable_reference, mean_within(desirable_reference), n_samples,  # the energy distance's fixed term
        )
    return shared, pretrain_losses


def run(config: RunConfig) -> dict:
    """Run the comparison described by ``config``; returns the ``metrics.json`` dictionary."""
    started = time.perf_counter()
    if config.workers is None:
        config = replace(config, workers=default_workers())
    specs = config.method_specs()
    timer = Timer()
    overall = tqdm(total=len(specs) + 2, desc="toy", unit="phase", disable=not config.progress)
    overall.set_postfix_str("pretrain")
    shared, pretrain_losses = prepare(config, timer)
    quick, n_samples = config.quick, shared.n_samples
    eval_pairs, eval_draws = shared.heldout.n_pairs, shared.heldout.draws
    pre_steps = len(pretrain_losses)
    overall.update()

    # The longest job first, so that the other worker fills the remaining time with the short ones.
    jobs = sorted(specs, key=lambda spec: spec.row.data != "online") + [None]
    done = {}
    overall.set_postfix_str(f"fine-tune, sample, evaluate ({config.workers} workers)")
    with timer.phase("methods (wall)"):
        # Meanwhile this process imports matplotlib, so the figure workers forked later start with it.
        import_plots = (lambda: importlib.import_module(".plots", __package__)) if config.figures else None
        for result in run_jobs(method_job, shared, jobs, config.workers, while_waiting=import_plots):
            done[result["name"]] = result
            for phase, seconds in result["seconds"].items():
                timer.phases[phase] = timer.phases.get(phase, 0.0) + seconds
            overall.update()
    overall.close()
    order = [REFERENCE] + [spec.name for spec in specs]  # metrics.json keeps the table's order
    results = {name: done[name]["metrics"] for name in order}
    samples = {name: done[name]["samples"] for name in order}
    histories = {name: done[name]["history"] for name in order[1:]}

    output = {
        "wall_s": 0.0,
        "methods": results,
        "seed": config.seed,
        "quick": quick,
        "n_samples": n_samples,
        "eval": {"pairs": eval_pairs, "draws": eval_draws},
        "bayes_ceilings": dict(zip(("pointwise", "pairwise"), bayes_ceilings())),
        "hyperparameters": {
            spec.name: {"objective": spec.objective, "beta": spec.beta, "lr": spec.lr, "steps": spec.steps,
                        "batch": spec.batch, **spec.options}
            for spec in specs
        },
        "pretrain": {"steps": pre_steps, "final_loss": float(np.mean(pretrain_losses[-50:]))},
    }
    if config.flow:  # only then, so that the diffusion toy's metrics.json keeps its shape
        flow_record(output, config.methods, pretrain_losses)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.figures:
        with timer.phase("figures"):  # each figure in its own worker: matplotlib is slow at laying out axes
            figures = ["samples_all.png", "samples.png"] + (["curves.png"] if histories else [])
            list(run_jobs(figure_job, (samples, results, histories, out), figures, config.workers))
    np.savez_compressed(out / "samples.npz", **{k: v.numpy() for k, v in samples.items()})
    output["phases_s"] = timer.phases
    output["wall_s"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(output, indent=2))
    (out / "curves.json").write_text(json.dumps(histories))
    (out / "metrics.md").write_text(markdown_table(output))
    return output


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------

COLUMNS = (  # (metrics.json key, column title, digits)
    ("desirable_frac", "in desirable", 3),
    ("undesirable_frac", "in undesirable", 3),
    ("energy_distance", "energy dist. to desirable", 4),
    ("mean", "mean x", 3),
    ("mean", "mean y", 3),
    ("pairwise_implicit_acc", "pairwise implicit acc.", 3),
    ("train_s", "train s", 1),
)


def _cell(values: list[float], digits: int) -> str:
    """One number, or ``mean +- std`` over seeds."""
    values = [v for v in values if v is not None]
    mean = float(np.mean(values))
    if not math.isfinite(mean):
        return "nan"
    if abs(mean) >= 1000:
        return f"{mean:.3g}" if len(values) == 1 else f"{mean:.3g} +- {np.std(values):.2g}"
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {float(np.std(values)):.{digits}f}"


def _rows(outputs: list[dict]) -> list[str]:
    header = "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for name in outputs[0]["methods"]:
        cells = []
        seen_mean = 0
        for key, _, digits in COLUMNS:
            if key == "mean":
                values = [o["methods"][name]["mean"][seen_mean] for o in outputs]
                seen_mean += 1
            else:
                values = [o["methods"][name][key] for o in outputs]
            cells.append(_cell(values, digits))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(output: dict) -> str:
    ceilings = output["bayes_ceilings"]
    lines = _rows([output]) + [
        "",
        f"seed {output['seed']}{' (--quick)' if output['quick'] else ''}, {output['n_samples']} samples per method; "
        f"implicit accuracy on {output['eval']['pairs']} fresh pairs x {output['eval']['draws']} shared (t, noise) "
        f"draws (Bayes ceiling {ceilings['pairwise']:.3f}); wall time {output['wall_s']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def run_seeds(config: RunConfig, seeds: list[int]) -> dict:
    """``run`` once per seed into ``out/seed_<n>``; write ``summary.json`` and ``summary.md`` (mean +- std)."""
    outputs = [run(replace(config, seed=seed, out=Path(config.out) / f"seed_{seed}")) for seed in seeds]
    keys = [key for key, _, _ in COLUMNS if key != "mean"] + ["mean"]
    summary = {
        "seeds": seeds,
        "quick": config.quick,
        "wall_s": [o["wall_s"] for o in outputs],
        "methods": {
            name: {
                key: {
                    "mean": np.mean([o["methods"][name][key] for o in outputs], axis=0).tolist(),
                    "std": np.std([o["methods"][name][key] for o in outputs], axis=0).tolist(),
                }
                for key in keys
            }
            for name in outputs[0]["methods"]
        },
    }
    out = Path(config.out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = _rows(outputs) + [
        "",
        f"mean +- std over seeds {', '.join(map(str, seeds))}{' (--quick)' if config.quick else ''}; "
        f"{outputs[0]['n_samples']} samples per method and seed; implicit accuracy on "
        f"{outputs[0]['eval']['pairs']} fresh pairs x {outputs[0]['eval']['draws']} draws "
        f"(Bayes ceiling {outputs[0]['bayes_ceilings']['pairwise']:.3f}); "
        f"wall time per seed {np.mean(summary['wall_s']):.1f} s.",
    ]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    return summary
