"""DSPO: direct score preference optimisation, preference alignment as score matching.

Paper 004, "DSPO: Direct Score Preference Optimization for Diffusion Model Alignment" (Zhu, Xiao and Honavar, ICLR
2025; no arXiv version), Eq. (13) and App. D.1. Instead of a classifier-style loss on the reward margin, DSPO
regresses the model's score onto the score of the preference-tilted distribution. In noise-prediction form, for the
*winner* of each pair:

    L_DSPO = || (eps_theta - eps) - lambda * gamma * (1 - sigmoid(r_w - r_l)) * (eps_theta - eps_ref) ||^2     (Eq. (13))

where ``I = r_w - r_l`` is the Diffusion-DPO margin (same beta as the implicit reward, ``lambda = beta``) and the
timestep weight ``A(t)`` is dropped as in DDPM and Diffusion-DPO. Reading it: the ordinary denoising residual,
corrected by how far the model has already moved from the reference, and the correction is switched off as the pair
becomes well separated (``sigmoid -> 1``). Consequences (docs/conventions.md I8):

* ``beta = 0`` makes it SFT on the winners, in value and gradient;
* at ``theta = ref`` the correction term is 0 and ``sigmoid(0) = 1/2``, so its gradient is
  ``(1 - beta * gamma / 2)`` times the SFT gradient on the winners.

Gradients flow through every term, the sigmoid included, as in the authors' code (huaishengzhu/DSPO ``train.py``,
which computes errors as means over C, H, W and the margin as ``-0.5 * beta_dpo * (model_diff - ref_diff)``:
exactly this module's convention, so the authors' ``--beta_dpo`` is this ``beta``). Four variants, one branch
each below, each with its equation:

* ``"dspo"``:      Eq. (13) as above; the authors' SD1.5 launcher uses it with beta 0.001.
* ``"dspo_e"``:    Eq. (45), the reward-gradient form without the sigmoid gate.
* ``"dspo_ref"``:  Eq. (47), ``mean((1 - sigmoid(I))^2)``: App. D.1's simplification for SDXL.
* ``"dspo_sdxl"``: what the authors' code actually trains on SDXL (``train.py`` with ``--sdxl``,
  ``launchers/sdxl.sh`` with ``--beta_dpo 5000``). **A heuristic of that code, not an equation of the paper.** With
  ``d_i = mean((eps_theta - eps_ref)^2)`` over the dimensions of winner ``i``, it switches the *whole batch*:

      mean_i (1 - sigmoid(I_i))^2 * d_i      if  mean_i d_i >= threshold  (0.1 in the code)
      mean_i (1 - sigmoid(I_i))^2            otherwise                     (= dspo_ref)

  The first line is Eq. (46) with its weight ``A(t) / sqrt(lambda gamma)`` and its ``B(t) / (lambda gamma)`` term
  dropped (App. D.1 calls that term small); the second is Eq. (47). The paper does not state the switch or its
  threshold: at the start ``d = 0``, so training begins on Eq. (47), and Eq. (46) takes over only once the model has
  drifted from the reference by 0.1 per element on average. The threshold is therefore a keyword, default 0.1.

Hyperparameters (App. D.3): SD1.5 lambda (= beta) 0.001, gamma 1, AdamW lr 2.048e-8, effective batch 2048 pairs
(4 pairs x 4 GPUs x 128 accumulation), 2000 warmup steps. The authors' README searches beta in {0.001, 0.01, 0.05} on
SD1.5 and {1000, ..., 5000} on SDXL. At beta 0.001 the margin is of order 1e-5, the gate sits at 1/2 and ``dspo``
is SFT on the winners to within ``beta * gamma`` (docs/methods.md, "DSPO").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import (
    LossOutput,
    check_choice,
    check_number,
    check_per_sample,
    check_same_shape,
    implicit_reward,
    pairwise_accuracy,
    per_sample_mse,
)

VARIANTS = ("dspo", "dspo_e", "dspo_ref", "dspo_sdxl")
SDXL_THRESHOLD = 0.1  # huaishengzhu/DSPO train.py, the --sdxl branch


def dspo_loss(
    pred_w: Tensor,
    ref_pred_w: Tensor,
    target_w: Tensor,
    err_l: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float = 0.001,
    gamma: float = 1.0,
    variant: str = "dspo",
    threshold: float = SDXL_THRESHOLD,
) -> LossOutput:
    """Eq. (13) / (45) / (47) of paper 004, or the authors' SDXL switch (``variant="dspo_sdxl"``, ``threshold``).

    ``pred_w``, ``ref_pred_w``, ``target_w``: full predictions for the winners, shape ``(B, ...)`` (the score
    matching needs the vectors, not just their errors). ``err_l``, ``ref_err_l``: per-sample errors of the losers ``(B,)``.
    """
    check_same_shape(pred_w=pred_w, ref_pred_w=ref_pred_w, target_w=target_w)
    check_per_sample(err_l=err_l, ref_err_l=ref_err_l)
    if pred_w.shape[0] != err_l.shape[0]:
        raise ValueError(f"err_l has batch size {err_l.shape[0]} but pred_w has {pred_w.shape[0]}; they must match")
    beta = check_number(beta, "beta", low_inclusive=True)  # beta = 0 is SFT, a valid limit
    gamma = check_number(gamma, "gamma", low_inclusive=True)
    check_choice(variant, "variant", VARIANTS)
    threshold = check_number(threshold, "threshold", low_inclusive=True)
    if threshold != SDXL_THRESHOLD and variant != "dspo_sdxl":
        raise ValueError(f"threshold is only used by variant 'dspo_sdxl', not {variant!r}")

    # err = mean_d (eps_theta - eps)^2, per winner (B,); the losers arrive already reduced
    err_w = per_sample_mse(pred_w, target_w)
    ref_err_w = per_sample_mse(ref_pred_w, target_w)
    # I = r_w - r_l,  r = -(beta/2)(err - err_ref): the Diffusion-DPO margin
    margin = implicit_reward(err_w, ref_err_w, beta) - implicit_reward(err_l, ref_err_l, beta)
    # 1 - sigmoid(I): how far the pair is from separated; 1/2 at theta = ref, -> 0 once the winner clearly wins
    gate = 1 - torch.sigmoid(margin)  # (B,)
    # d = mean_d (eps_theta - eps_ref)^2: how far the model has drifted from the reference, per winner (B,)
    drift = per_sample_mse(pred_w, ref_pred_w)
    per_sample = (-1,) + (1,) * (pred_w.ndim - 1)  # (B,) -> (B, 1, ..., 1) to broadcast over a sample

    if variant == "dspo":
        # Eq. (13):  L = mean || (eps_theta - eps) - beta gamma (1 - sigmoid(I)) (eps_theta - eps_ref) ||^2
        correction = (beta * gamma * gate).reshape(per_sample) * (pred_w - ref_pred_w)
        loss = per_sample_mse(pred_w - target_w, correction).mean()
    elif variant == "dspo_e":
        # Eq. (45):  L = mean || (eps_theta - eps) - gamma beta (eps_theta - eps_ref) ||^2     (no gate)
        correction = gamma * beta * (pred_w - ref_pred_w)
        loss = per_sample_mse(pred_w - target_w, correction).mean()
    elif variant == "dspo_ref":
        # Eq. (47):  L = mean (1 - sigmoid(I))^2
        loss = gate.pow(2).mean()
    else:
        # The authors' SDXL code: the batch mean of d picks one of two losses for the whole batch.
        above_threshold = bool(drift.detach().mean() >= threshold)
        if above_threshold:
            # Eq. (46) without A(t)/sqrt(lambda gamma) and B(t)/(lambda gamma):  L = mean_i (1 - sigmoid(I_i))^2 d_i
            loss = (gate.pow(2) * drift).mean()
        else:
            # Eq. (47):  L = mean (1 - sigmoid(I))^2
            loss = gate.pow(2).mean()

    metrics = {
        "loss": loss.item(),
        "implicit_acc": pairwise_accuracy(margin),
        "margin": margin.detach().float().mean().item(),
        "gate": gate.detach().float().mean().item(),
        "drift": drift.detach().float().mean().item(),
        "mse_w": err_w.detach().float().mean().item(),
        "ref_mse_w": ref_err_w.detach().float().mean().item(),
        "mse_l": err_l.detach().float().mean().item(),
        "ref_mse_l": ref_err_l.detach().float().mean().item(),
    }
    if variant == "dspo_sdxl":
        metrics["above_threshold"] = float(above_threshold)  # 1: this batch trained the Eq. (46) line
    return LossOutput(loss, metrics)
