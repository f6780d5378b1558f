"""Pretraining the toy diffusion model, and fine-tuning a copy of it with one objective.

Pretraining is Ho et al.'s plain denoising loss on the pretraining Gaussian (paper 001 Sec. 7). Fine-tuning starts
from an exact copy of the pretrained model, which stays frozen as the reference, and runs one ``MethodSpec``
(toy/methods.py) with Adam and a cosine-decayed learning rate. Every ``curve_every`` steps the held-out pairwise
implicit accuracy is measured on a small fixed set of fresh pairs, so every method, the ones whose loss has no
reward (SFT, CSFT, BCE) included, gets the same training curve.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import PRETRAIN, PreferenceData
from .evaluate import HeldOutPairs, implicit_accuracy
from .context import FineTuneContext
from .methods import MethodSpec, step_for
from .model import EpsMLP, condition, denoising_error, draw_t_and_noise
from .optim import Adam, clip_grad_norm, warmup_cosine
from .schedule import DDIMSteps, DPMSolver, NoiseSchedule


MAX_GRAD_NORM = 1.0  # as the Diffusion-DPO / Diffusion-KTO training scripts (max_grad_norm = 1.0)
CURVE_POINTS = 20  # held-out measurements per training curve (and one at the end)
CURVE_SAMPLES = 256  # samples drawn at each curve point to follow the sample mean (the drift) during training


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch: int = 512
    lr: float = 3e-3
    n_data: int = 20000  # a finite pretraining set, as a real one is
    hidden: int = 64
    depth: int = 2


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """toy/optim.py's ``warmup_cosine`` for a ``torch.optim`` optimiser (the tutorials train with one)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps, warmup))


def pretrain(
    config: PretrainConfig, scheduler: NoiseSchedule, generator: torch.Generator, progress: bool = True, *,
    model_class=EpsMLP, error=None, desc: str = "pretrain",
) -> tuple[EpsMLP, list[float]]:
    """Train a ``model_class`` (``EpsMLP``) on the pretraining Gaussian; returns the frozen model and its loss per
    step. ``error(model, x0, t, noise)``: the per-sample loss (default: the denoising error; the flow toy passes its
    velocity error, toy/flow.py)."""
    model = model_class(hidden=config.hidden, depth=config.depth)
    data = PRETRAIN.sample(config.n_data, generator)
    optimizer = Adam(model.parameters(), config.lr, config.steps, warmup=config.steps // 20)
    losses = []
    for _ in tqdm(range(config.steps), desc=desc, disable=not progress, leave=False):
        x0 = data[torch.randint(len(data), (config.batch,), generator=generator)]
        t, noise = draw_t_and_noise(config.batch, generator)
        err = error(model, x0, t, noise) if error else denoising_error(model, scheduler, x0, t, noise)[0]
        loss = err.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.requires_grad_(False).eval(), losses


@dataclass
class History:
    """Training curves: every metric the loss reports, per step; the held-out implicit accuracy every few steps."""

    loss: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # e.g. implicit_acc, margin, clip_frac
    heldout_step: list[int] = field(default_factory=list)
    heldout_implicit_acc: list[float] = field(default_factory=list)
    sample_mean_y: list[float] = field(default_factory=list)  # mean y of CURVE_SAMPLES samples at each held-out step
    diverged_at_step: int | None = None  # the step whose loss was NaN/Inf, where training stopped

    def record(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        self.loss.append(loss)
        for key, value in metrics.items():
            self.metrics.setdefault(key, [float("nan")] * step).append(value)
        for values in self.metrics.values():  # a metric a step did not report (SPO without pairs) reads NaN
            if len(values) < step + 1:
                values.append(float("nan"))

    def as_dict(self) -> dict:
        return dict(vars(self))


def finetune(
    spec: MethodSpec,
    reference: nn.Module,
    data: PreferenceData,
    scheduler: NoiseSchedule,
    sampler: DPMSolver,
    ddim: DDIMSteps,
    generator: torch.Generator,
    curve_pairs: HeldOutPairs,
    curve_points: int = CURVE_POINTS,
    progress: bool = True,
) -> tuple[nn.Module, History]:
    """Fine-tune a copy of ``reference`` with ``spec``; returns the frozen fine-tuned model and its history."""
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    ctx = FineTuneContext(spec, policy, reference, scheduler, sampler, ddim, data, generator)
    optimizer = Adam(policy.parameters(), spec.lr, spec.steps, warmup=max(1, spec.steps // 20))
    cond = condition(spec.sample_condition, 1)
    curve_every = max(1, spec.steps // curve_points)
    history = History()
    method_step = step_for(spec)  # by the row's data kind (toy/methods.py)

    def record_heldout(step: int) -> None:
        history.heldout_step.append(step)
        history.heldout_implicit_acc.append(implicit_accuracy(policy, scheduler, curve_pairs, cond)["pairwise_implicit_acc"])
        # The same starting noise at every curve point (its own generator: the training draws are untouched).
        x_T = torch.randn(CURVE_SAMPLES, 2, generator=torch.Generator().manual_seed(0))
        samples = sampler.sample(policy, x_T, None if cond is None else cond.expand(CURVE_SAMPLES, -1))
        history.sample_mean_y.append(samples[:, 1].mean().item())

    for step in tqdm(range(spec.steps), desc=spec.name, disable=not progress, leave=False):
        if step % curve_every == 0:
            record_heldout(step)
        out = method_step(ctx, step)
        if not torch.isfinite(out.loss):  # keep the last finite weights and report it, rather than stop the comparison
            history.diverged_at_step = step
            break
        optimizer.zero_grad()
        out.loss.backward()
        clip_grad_norm(optimizer.params, MAX_GRAD_NORM)
        optimizer.step()
        history.record(step, out.metrics.get("loss", out.loss.item()), out.metrics)
    record_heldout(len(history.loss))
    return policy.requires_grad_(False).eval(), history
