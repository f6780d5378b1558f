"""The method table: one row per method, read by every trainer (the 2D toy, `full.train` / `full.spin` /
`full.spo`, the data readers, the latent cache, validation and the CPU lab). Nothing outside this file compares
method names: a trainer looks up its row and asks it.

A row says what a trainer must know to run the method:

* ``objective``: the minipref loss (``OBJECTIVES``), and through it the data kind (paired, binary, self_play,
  online) and the paper;
* ``options``: its own hyperparameters with defaults, choices and ranges (``full/`` turns each into a
  ``--flag`` and checks it at parse time; the toy sets them in its specs);
* ``reference``: whether a step needs the frozen reference's forward (a function of the options: BCE needs it
  only in its anchored form);
* ``trains_on`` ("desirable": SFT never reads an undesirable image), ``label_in_prompt`` (CSFT: the label is
  written into the prompt while training, and the model is sampled with the "good" prefix), ``needs_embeddings``
  (Diff-contrast's f(y, x));
* ``loss``: the adapter from one step's per-sample quantities (`StepErrors`) to the minipref call.

Adding a paired method touches its loss file, one `Method(...)` row here (or `register` at run time), its presets
and its docs row: docs/adding_a_method.md.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from torch import Tensor

from .bce import bce_loss
from .common import LossOutput, implicit_reward
from .contrast import contrast_loss
from .dpo import LOSS_TYPES, dpo_loss
from .dspo import SDXL_THRESHOLD, VARIANTS, dspo_loss
from .kto import REFERENCE_POINTS, UTILITY_NAMES, kto_loss
from .registry import OBJECTIVES, Objective
from .sft import sft_loss
from .spin import spin_loss

DATA_OF_KIND = {"paired": "pairs", "binary": "feedback", "self_play": "pairs", "online": None}
CONTRAST_EMBEDDINGS = ("image_text", "image", "text")  # halves of the stored CLIP f = [image, text]


@dataclass(frozen=True)
class Option:
    """A method's own hyperparameter: ``--name`` in full/, ``options[name]`` in the toy."""

    name: str
    default: Any
    help: str
    type: type = float
    choices: tuple | None = None
    low: float | None = None  # an interval for numbers; None: unbounded
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    family_default: dict | None = None  # full/: a default per model family (used when the value is None)

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed (a message naming --name), or None."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"--{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if self.type is float:
            return range_problem(self.name, value, self.low, self.high, low_open=self.low_open,
                                 high_open=self.high_open)
        return None


def range_problem(name: str, value: float, low: float | None, high: float | None, *, low_open: bool = False,
                  high_open: bool = False) -> str | None:
    """Why ``value`` of ``--name`` is outside [low, high] (open ends as given, None: unbounded), or None. The one
    range check of the options here and of `full.cli.check_range`."""
    low, high = -math.inf if low is None else low, math.inf if high is None else high
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        return f"--{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value}"
    return None


@dataclass
class StepErrors:
    """One step's per-sample quantities, whatever the model. With ``n == 2`` the first half of every batch axis is
    the winners (B) and the second the losers (B), sharing timestep and noise; with ``n == 1``, B single images."""

    err: Tensor  # (n*B,) per-sample error of the policy (minipref.per_sample_mse)
    ref_err: Tensor | None  # (n*B,) of the reference, None when the method needs no reference forward
    n: int
    desirable: Tensor | None = None  # (B,) bool, binary feedback
    pred: Tensor | None = None  # (n*B, ...) the policy's prediction (DSPO's score matching)
    ref_pred: Tensor | None = None
    target: Tensor | None = None
    emb_w: Tensor | None = None  # (B, E) f(y, x) of the winners (Diff-contrast)
    emb_l: Tensor | None = None

    def pairs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(err_w, err_l, ref_err_w, ref_err_l), each (B,)."""
        if self.n != 2:
            raise ValueError("this method trains on pairs; the step gave single images (n == 1)")
        err_w, err_l = self.err.chunk(2)
        ref_w, ref_l = self.ref_err.chunk(2)
        return err_w, err_l, ref_w, ref_l


class GlobalBatch(Protocol):
    """What a multi-process trainer offers for losses that look across the batch (full/run/global_batch.py)."""

    num_processes: int

    def global_mean(self, values: Tensor) -> Tensor: ...

    def gather_with_local_grad(self, *tensors: Tensor) -> tuple[Tensor, ...]: ...


Loss = Callable[[StepErrors, dict, "float | None", "GlobalBatch | None"], LossOutput]


@dataclass(frozen=True)
class Method:
    name: str
    objective: str  # the OBJECTIVES entry: the loss function, its data kind and paper
    loss: Loss | None  # None: online methods, whose trainers score step log-probabilities themselves
    options: tuple[Option, ...] = ()
    reference: Callable[[dict], bool] = field(default=lambda options: True)
    trains_on: str = "all"  # "desirable": the rows without a desirable label are dropped before training
    label_in_prompt: bool = False  # CSFT
    needs_embeddings: bool = False  # Diff-contrast's f(y, x)
    check: Callable[[dict], "str | None"] = field(default=lambda options: None)  # checks across options

    @property
    def data(self) -> str:
        return OBJECTIVES[self.objective].data

    @property
    def paper(self) -> str:
        return OBJECTIVES[self.objective].paper

    @property
    def beta(self) -> float | None:
        """The default beta of the loss function (None: the method has no beta)."""
        param = inspect.signature(OBJECTIVES[self.objective].fn).parameters.get("beta")
        return None if param is None else param.default

    def defaults(self) -> dict:
        return {option.name: option.default for option in self.options}


# ---------------------------------------------------------------------------------------------------------------
# The adapters: one step's quantities -> the minipref call
# ---------------------------------------------------------------------------------------------------------------


def _sft(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    # rows are desirable only (trains_on); a trainer that still passes labels weights by them
    return sft_loss(e.err) if e.desirable is None else sft_loss(e.err, weight=e.desirable.to(e.err.device))


def _csft(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    return sft_loss(e.err)  # the label is in the prompt; every sample is fitted


def _bce(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    return bce_loss(e.err, e.desirable, err_ref=e.ref_err if o["bce_reference"] else None, beta=beta)


def _kto(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    reference_point = o["reference_point"]
    if reference_point == "batch" and batch is not None:
        # z_ref = clamp(mean over the global batch of r, 0), detached: the authors' accelerator.reduce
        reference_point = batch.global_mean(implicit_reward(e.err, e.ref_err, beta)).clamp(min=0)
    return kto_loss(e.err, e.ref_err, e.desirable, beta=beta, utility=o["utility"], reference_point=reference_point,
                    lambda_d=o["lambda_d"], lambda_u=o["lambda_u"])


def _dpo(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    return dpo_loss(*e.pairs(), beta=beta, loss_type=o["dpo_loss_type"], label_smoothing=o["dpo_label_smoothing"])


def _spin(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    return spin_loss(*e.pairs(), beta=beta)  # winner = the real image, loser = the opponent's sample


def contrast_embedding(emb: Tensor, choice: str) -> Tensor:
    """The part of a stored CLIP ``f = [img/|img|, txt/|txt|]`` that Diff-contrast compares: cos of the whole is
    (cos_img + cos_txt) / 2 (image and prompt, the paper's f(y, x)); "image" and "text" keep one half. With "text"
    a pair's winner and loser share f (one prompt), as in the RPO authors' prompt-only code."""
    if choice == "image_text":
        return emb
    image, text = emb.chunk(2, dim=-1)
    return image if choice == "image" else text


def _contrast(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    choice = o["contrast_embedding"]
    parts = (*e.pairs(), contrast_embedding(e.emb_w, choice), contrast_embedding(e.emb_l, choice))
    if batch is None or batch.num_processes == 1:
        return contrast_loss(*parts, beta=beta, tau=o["tau"], weights_inside=o["contrast_weights_inside"])
    # all M = P*B pairs, the gradient through this process's rows; x P because DDP averages the P gradients, each
    # holding only its own rows' share (full/run/global_batch.py)
    out = contrast_loss(*batch.gather_with_local_grad(*parts), beta=beta, tau=o["tau"],
                        weights_inside=o["contrast_weights_inside"])
    return LossOutput(out.loss * batch.num_processes, out.metrics)


def _dspo(e: StepErrors, o: dict, beta, batch) -> LossOutput:
    _, err_l, _, ref_l = e.pairs()
    # paper 004 Theorem 1: gamma = 1 / (2 beta) aligns the gradient with the RLHF objective (the toy's choice)
    gamma = 1.0 / (2.0 * beta) if o["dspo_gamma"] is None else o["dspo_gamma"]
    threshold = {} if o["dspo_variant"] != "dspo_sdxl" else {
        "threshold": SDXL_THRESHOLD if o["dspo_threshold"] is None else o["dspo_threshold"]}
    return dspo_loss(e.pred.chunk(2)[0], e.ref_pred.chunk(2)[0], e.target.chunk(2)[0], err_l, ref_l, beta=beta,
                     gamma=gamma, variant=o["dspo_variant"], **threshold)


def _dpo_check(o: dict) -> str | None:
    if o["dpo_label_smoothing"] and o["dpo_loss_type"] not in ("cdpo", "robust"):
        return "--dpo_label_smoothing applies to --dpo_loss_type cdpo or robust"
    if o["dpo_loss_type"] in ("cdpo", "robust") and not 0 < o["dpo_label_smoothing"] < 0.5:
        return f"--dpo_loss_type {o['dpo_loss_type']} needs --dpo_label_smoothing in (0, 0.5)"
    return None


def _dspo_check(o: dict) -> str | None:
    if o["dspo_threshold"] is not None and o["dspo_variant"] != "dspo_sdxl":
        return "--dspo_threshold applies to --dspo_variant dspo_sdxl only"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------

METHODS: dict[str, Method] = {}


def register(method: Method, objective: Objective | None = None) -> Method:
    """Add a row (and, for a new loss, its ``OBJECTIVES`` entry): every trainer then accepts ``method.name``."""
    if objective is not None:
        OBJECTIVES[objective.name] = objective
    if method.objective not in OBJECTIVES:
        raise ValueError(f"method {method.name!r}: no objective {method.objective!r} in minipref.OBJECTIVES")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The row of ``name``; an unknown name raises ValueError listing every valid one."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


for _row in (
    Method("sft", "sft", _sft, trains_on="desirable", reference=lambda o: False),
    Method("csft", "csft", _csft, label_in_prompt=True, reference=lambda o: False),
    Method("bce", "bce", _bce, reference=lambda o: o["bce_reference"], options=(
        Option("bce_reference", False, "the implicit reward as the logit (anchored to the reference), not -beta * err",
               type=bool),)),
    Method("dpo", "dpo", _dpo, check=_dpo_check, options=(
        Option("beta_dpo", None, "the diffusers DPO scripts' beta: --beta 2B here for SD1.5 (that script drops the "
               "1/2), B for SDXL (full/ only)", low=0.0, low_open=True),
        Option("dpo_loss_type", "sigmoid", "sigmoid (Diffusion-DPO) or a variant", type=str, choices=LOSS_TYPES),
        Option("dpo_label_smoothing", 0.0, "label-noise rate e of cdpo / robust, in (0, 0.5)"))),  # _dpo_check
    Method("kto", "kto", _kto, options=(
        Option("utility", "kahneman_tversky", "the utility of the implicit reward", type=str, choices=UTILITY_NAMES),
        Option("reference_point", "batch", "z_ref: the clamped batch mean of the reward, or 0", type=str,
               choices=REFERENCE_POINTS),
        Option("lambda_d", 1.0, "weight of desirable samples", low=0.0, low_open=True),
        Option("lambda_u", 1.0, "weight of undesirable samples", low=0.0, low_open=True))),
    Method("spin", "spin", _spin),
    Method("contrast", "contrast", _contrast, needs_embeddings=True, options=(
        Option("tau", None, "temperature of the in-batch weights; default 0.01 (SD1.5) / 0.5 (SDXL)", low=0.0,
               low_open=True, family_default={"sd15": 0.01, "sdxl": 0.5}),
        Option("contrast_weights_inside", False, "the LLM-RPO form (weights inside the log-sigmoid)", type=bool),
        Option("contrast_embedding", "image_text", "what f(y, x) compares: CLIP image and prompt (the paper's), the "
               "image only, or the prompt only (the RPO authors' code); docs/methods.md", type=str,
               choices=CONTRAST_EMBEDDINGS),
        Option("clip_model_name_or_path", None, "CLIP model for f(image, prompt)", type=str),
        Option("embedding_column", None, "read f from columns <name>_0 / <name>_1", type=str),
        Option("embedding_cache_file", None, "default <output_dir>/clip_embeddings.safetensors", type=str))),
    Method("dspo", "dspo", _dspo, check=_dspo_check, options=(
        Option("dspo_variant", "dspo", "the paper's form, its ablations, or the authors' SDXL switch", type=str,
               choices=VARIANTS),
        Option("dspo_gamma", 1.0, "weight of the score-matching term (None: 1 / (2 beta), paper 004 Theorem 1)",
               low=0.0, low_open=True),
        Option("dspo_threshold", None, "dspo_sdxl: switch to the drift-weighted form when mean (pred - ref_pred)^2 "
               f">= this (default {SDXL_THRESHOLD}, the authors' SDXL code)", low=0.0, low_open=True))),
    Method("spo", "spo", None),
):
    register(_row)
