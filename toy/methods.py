"""Every objective as one fine-tuning step on the toy: draw a batch, run the models, call the method's row.

A toy method is a row of minipref's method table (``minipref.METHODS``: the loss adapter, its options, whether it
needs the reference, which samples it trains on, the label as a condition) plus the toy's own hyperparameters
(``MethodSpec``). The step is chosen by the row's data kind (paired, binary, self_play, online), never by name,
and ends in the row's ``loss``, the same adapter ``full.train`` calls; this file only builds its inputs, the way a
full-scale trainer does:

* errors come from ``per_sample_mse(eps_pred, eps)`` (``toy.model.denoising_error``);
* the reference (the frozen pretrained model; for SPIN the frozen previous iterate) runs under ``torch.no_grad()``;
* a winner and its loser share ``t`` and ``eps``: one forward over the concatenated ``2B`` batch.

``METHODS`` lists the toy's methods with their hyperparameters and the reason for each (docs/toy.md has the
table). Beta follows docs/conventions.md §2, ``r = -(beta/2)(err_model - err_ref)``, and its natural scale here is not SD's
5000. The DDPM bound makes the log-likelihood ratio of two models ``-T * E_t[k_t * d_err_t]`` (2 coordinates, so
``||d||^2 = 2 err``), with ``T k_t = T beta_t / (alpha_t (1 - abar_{t-1}))`` running from ~1000 near ``t = 0`` to
~10-20 for large ``t`` on this schedule; a uniform-``t`` reward matches it when ``beta / 2`` is in that range. We use
beta = 500 for every reward-based method (DPO, the three KTOs, SPIN, Diff-contrast, DSPO); docs/toy.md shows a
sweep from 100 to 5000.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from minipref import LossOutput, get_method
from minipref.methods import Method, StepErrors

from .model import condition, denoising_error, draw_t_and_noise

from .context import FineTuneContext


@dataclass(frozen=True)
class MethodSpec:
    """A toy method: its row of the method table, how its batch is drawn, and its hyperparameters."""

    name: str  # the key in metrics.json
    method: str  # the row of minipref.METHODS (its loss, options and needs)
    family: str  # the row of the samples figure and the colour of the curves (toy/plots.py)
    beta: float | None  # None: the objective has no beta (SFT, CSFT)
    lr: float
    steps: int
    batch: int
    options: dict = field(default_factory=dict)  # the row's options this method sets, and the toy's own
    why: str = ""

    @property
    def row(self) -> Method:
        return get_method(self.method)

    @property
    def objective(self) -> str:
        """The minipref loss (metrics.json's "objective")."""
        return self.row.objective

    @property
    def row_options(self) -> dict:
        """The options the row's loss reads: its defaults, with this method's settings."""
        return {**self.row.defaults(), **self.options}

    @property
    def sample_condition(self) -> str | None:
        """The condition the model is sampled and evaluated with: "good" when training wrote the label in."""
        return "good" if self.row.label_in_prompt else None

    def with_overrides(
        self, *, beta: float | None = None, steps: int | None = None, lr: float | None = None, **options
    ) -> "MethodSpec":
        """A copy with ``beta``/``steps``/``lr`` replaced and any of this method's ``options`` set (None = keep)."""
        new = self
        if beta is not None and self.beta is not None:
            new = replace(new, beta=beta)
        if steps is not None:
            new = replace(new, steps=steps)
        if lr is not None:
            new = replace(new, lr=lr)
        known = {k: v for k, v in options.items() if k in self.options and v is not None}
        return replace(new, options={**self.options, **known}) if known else new


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def pair_forward(ctx: FineTuneContext, x_w: Tensor, x_l: Tensor, reference=None) -> StepErrors:
    """One policy forward (with grad) and one reference forward (no grad) over the concatenated 2B batch: the
    step's per-sample quantities, winners first (``StepErrors``, what full.train's step hands the same row)."""
    reference = ctx.reference if reference is None else reference
    t, noise = draw_t_and_noise(len(x_w), ctx.generator)
    x0, t2, noise2 = torch.cat([x_w, x_l]), torch.cat([t, t]), torch.cat([noise, noise])  # (2B, 2), (2B,), (2B, 2)
    err, pred = denoising_error(ctx.policy, ctx.scheduler, x0, t2, noise2)
    with torch.no_grad():
        ref_err, ref_pred = denoising_error(reference, ctx.scheduler, x0, t2, noise2)
    return StepErrors(err, ref_err, 2, pred=pred, ref_pred=ref_pred, target=noise2)


def paired_batch(ctx: FineTuneContext) -> tuple[Tensor, Tensor]:
    """B desirable winners and B undesirable losers from the training set (the toy's preference pairs)."""
    b = ctx.spec.batch
    return ctx.data.batch(b, ctx.generator, desirable=True), ctx.data.batch(b, ctx.generator, desirable=False)


def row_loss(ctx: FineTuneContext, errors: StepErrors) -> LossOutput:
    """The row's adapter (minipref/methods.py), as full.train calls it; one process, so no global batch."""
    return ctx.spec.row.loss(errors, ctx.spec.row_options, ctx.spec.beta, None)


# ----------------------------------------------------------------------------------------------------------------
# Binary feedback: SFT, CSFT, BCE, KTO
# ----------------------------------------------------------------------------------------------------------------


def binary_step(ctx: FineTuneContext, step: int) -> LossOutput:
    """Unpaired samples. A row that trains on desirable samples only (SFT) draws only those; the others draw
    desirable ones with probability ``gamma`` (the toy's option; Diffusion-KTO Sec. 4.3), 0.5 by default. A row that
    writes the label into the prompt (CSFT) gets it as the toy's one-hot "good" / "bad" condition."""
    row, spec = ctx.spec.row, ctx.spec
    if row.trains_on == "desirable":
        x0, desirable = ctx.data.batch(spec.batch, ctx.generator, desirable=True), None
    else:
        x0, desirable = ctx.data.binary_batch(spec.batch, ctx.generator, gamma=spec.options.get("gamma", 0.5))
    cond = None
    if row.label_in_prompt:  # the toy's stand-in for csft_prompts' "good image, " / "bad image, " prefixes
        cond = torch.where(desirable[:, None], condition("good", len(x0)), condition("bad", len(x0)))  # (B, 2)
    t, noise = draw_t_and_noise(len(x0), ctx.generator)
    err, _ = denoising_error(ctx.policy, ctx.scheduler, x0, t, noise, cond)
    ref_err = None
    if row.reference(spec.row_options):
        with torch.no_grad():
            ref_err, _ = denoising_error(ctx.reference, ctx.scheduler, x0, t, noise)
    return row_loss(ctx, StepErrors(err, ref_err, 1, None if row.label_in_prompt else desirable))


# ----------------------------------------------------------------------------------------------------------------
# Paired preferences: DPO, Diff-contrast, DSPO
# ----------------------------------------------------------------------------------------------------------------


def paired_step(ctx: FineTuneContext, step: int) -> LossOutput:
    """A desirable winner against an undesirable loser, shared t and noise; Diff-contrast also gets f(y, x)."""
    x_w, x_l = paired_batch(ctx)
    errors = pair_forward(ctx, x_w, x_l)
    if ctx.spec.row.needs_embeddings:
        errors.emb_w, errors.emb_l = fourier_embedding(x_w, ctx), fourier_embedding(x_l, ctx)
    return row_loss(ctx, errors)


def fourier_embedding(x: Tensor, ctx: FineTuneContext) -> Tensor:
    """Random Fourier features ``sqrt(2/D) cos(W x + b)``, ``(B, 2) -> (B, D)``: the toy's CLIP embedding f(y, x).

    With ``W ~ N(0, 1/l^2)`` the dot product of two embeddings approximates the RBF kernel
    ``exp(-|x - y|^2 / (2 l^2))`` (Rahimi & Recht 2007), and the norms are ~1, so ``cos(f(a), f(b))`` is ~1 for
    nearby points and ~0 for far ones: what a similarity of image content should do. ``l`` is the data's 0.1.
    """
    if "rff" not in ctx.state:
        g = torch.Generator().manual_seed(12345)  # fixed: the embedding is part of the setup, not of the run
        dim, length = 256, ctx.spec.options["length_scale"]
        ctx.state["rff"] = (torch.randn(2, dim, generator=g) / length, 2 * math.pi * torch.rand(dim, generator=g))
    weight, bias = ctx.state["rff"]
    return math.sqrt(2.0 / weight.shape[1]) * torch.cos(x @ weight + bias)  # (B, 2) @ (2, D) -> (B, D)


# ----------------------------------------------------------------------------------------------------------------
# Self-play: SPIN-Diffusion
# ----------------------------------------------------------------------------------------------------------------


def self_play_step(ctx: FineTuneContext, step: int) -> LossOutput:
    """SPIN-Diffusion (paper 000 Sec. 3.2 (iii)): real desirable data vs the frozen opponent's own samples.

    The run is split into ``iterations`` equal parts; at the start of each the opponent becomes a frozen copy of
    the current model, draws a pool of samples, and serves as the reference of the loss.
    """
    opts = ctx.spec.options
    per_iteration = max(1, ctx.spec.steps // opts["iterations"])
    if step % per_iteration == 0 and step // per_iteration < opts["iterations"]:
        from .sampling import sample  # local: sampling is only needed by the self-play and online methods

        opponent = copy.deepcopy(ctx.policy).requires_grad_(False).eval()
        ctx.state["opponent"] = opponent
        ctx.state["pool"] = sample(opponent, ctx.sampler, opts["pool"], ctx.generator)
        ctx.state["iteration"] = step // per_iteration
    pool = ctx.state["pool"]
    x_real = ctx.data.batch(ctx.spec.batch, ctx.generator, desirable=True)
    x_generated = pool[torch.randint(len(pool), (ctx.spec.batch,), generator=ctx.generator)]
    out = row_loss(ctx, pair_forward(ctx, x_real, x_generated, reference=ctx.state["opponent"]))
    out.metrics["iteration"] = float(ctx.state["iteration"])
    return out


def online_step(ctx: FineTuneContext, step: int) -> LossOutput:
    from .spo import spo_step  # the online rollout (SPO) lives in its own file

    return spo_step(ctx, step)


STEPS = {"binary": binary_step, "paired": paired_step, "self_play": self_play_step, "online": online_step}


def step_for(spec: MethodSpec) -> Callable[[FineTuneContext, int], LossOutput]:
    """The step of ``spec``: by its row's data kind."""
    return STEPS[spec.row.data]


# ----------------------------------------------------------------------------------------------------------------
# The table. Order = the figure's order.
# ----------------------------------------------------------------------------------------------------------------

KTO_WHY = "Diffusion-KTO, gamma = 0.8 (Sec. 4.3), batch-mean reference point (authors' code); same beta as DPO"

SUPERVISED, PAIRED, BINARY, ONLINE = "supervised", "paired preferences", "binary feedback", "self-play and online"
FAMILIES = (SUPERVISED, PAIRED, BINARY, ONLINE)  # the samples figure's rows, in order (toy/plots.py)

METHODS: dict[str, MethodSpec] = {}


def add(spec: MethodSpec) -> MethodSpec:
    """Add a toy method (a row of minipref.METHODS plus its toy hyperparameters); figure and CLI follow."""
    if spec.family not in FAMILIES:
        raise ValueError(f"{spec.name}: family {spec.family!r} is not one of {FAMILIES}")
    spec.row  # an unknown row fails now, listing the valid ones
    METHODS[spec.name] = spec
    return spec


for _spec in (
    MethodSpec("sft", "sft", SUPERVISED, None, 1e-3, 600, 256, why="the supervised baseline; desirable data only"),
    MethodSpec("csft", "csft", SUPERVISED, None, 1e-3, 600, 256,
               why="all data, good/bad condition; sampled with 'good'"),
    MethodSpec("bce", "bce", BINARY, 1.0, 1e-3, 600, 256, {"bce_reference": False},
               why="paper 000 Eq. (3) as written: reference-free, beta = 1"),
    MethodSpec("dpo", "dpo", PAIRED, 500.0, 1e-3, 600, 256,
               why="beta * d_err / 2 ~ 1 at d_err ~ 0.1 (see the module docstring)"),
    MethodSpec("kto_kahneman_tversky", "kto", BINARY, 500.0, 1e-3, 600, 256,
               {"utility": "kahneman_tversky", "gamma": 0.8, "reference_point": "batch"}, why=KTO_WHY),
    MethodSpec("kto_loss_averse", "kto", BINARY, 500.0, 1e-3, 600, 256,
               {"utility": "loss_averse", "gamma": 0.8, "reference_point": "batch"}, why=KTO_WHY),
    MethodSpec("kto_risk_seeking", "kto", BINARY, 500.0, 1e-3, 600, 256,
               {"utility": "risk_seeking", "gamma": 0.8, "reference_point": "batch"}, why=KTO_WHY),
    MethodSpec("kto_risk_seeking_bounded", "kto", BINARY, 500.0, 1e-3, 600, 256,
               {"utility": "risk_seeking_bounded", "gamma": 0.8, "reference_point": "batch"},
               why=KTO_WHY + "; the authors' bounded risk-seeking form (risk_seeking_1 in their code)"),
    MethodSpec("spin", "spin", ONLINE, 500.0, 1e-3, 600, 256, {"iterations": 2, "pool": 4096},
               why="2 self-play iterations, as DPO otherwise"),
    MethodSpec("contrast", "contrast", PAIRED, 500.0, 1e-3, 600, 256, {"tau": 0.5, "length_scale": 0.1},
               why="tau 0.5 (paper 002, SDXL); embedding = random Fourier features of the point"),
    MethodSpec("dspo", "dspo", PAIRED, 500.0, 1e-3, 600, 256, {"dspo_gamma": None},
               why="beta as DPO; gamma = 1/(2 beta), paper 004 Theorem 1 (so beta * gamma = 1/2)"),
    MethodSpec("spo", "spo", ONLINE, 10.0, 1e-5, 300, 128,
               {"candidates": 4, "threshold": 0.3, "t_max": 750, "oracle": False},
               why="paper 003: beta 10, clip 0.1, 4 candidates, threshold 0.3, t < 750, DDIM 20 steps; lr 1e-5 "
                   "(trust region, see docs)"),
):
    add(_spec)


def resolve(names: list[str] | None) -> list[MethodSpec]:
    """The specs for ``names`` (all if None); an unknown name raises ValueError listing the valid ones."""
    if names is None:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods listed twice: {names}")
    return [METHODS[n] for n in names]
