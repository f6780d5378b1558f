"""BCE LoRA: the minimal binary preference baseline of the LoRA study.

Paper 000, "Aligning Text-to-Image Diffusion Models using Reinforcement Learning from Human Utility" (Yin and Zhang,
Stanford; a project report without an arXiv id), Eq. (3):

    L_pref = BCE( -MSE(eps_theta, eps), y ),     y = 1 for a liked ("exclusive win") image, 0 otherwise

i.e. binary cross-entropy with logits on ``logit = -beta * err_model`` (the paper writes it with beta = 1).
Read as a classifier, ``P(liked) = sigmoid(-beta * err) <= 1/2`` for every image because ``err >= 0``: the model can
never say "liked" with confidence, and the only way to lower the loss on a liked image is to denoise it better,
on a disliked one to denoise it *worse*, with nothing anchoring the model to where it started. That is part of
why the paper saw BCE LoRA fall below the base model (PickScore 20.74 vs 21.25, Table 1).

With ``err_ref`` given, the logit becomes the implicit reward ``r = -(beta/2)(err_model - err_ref)``: a
reference-anchored BCE, which equals loss-averse Diffusion-KTO with reference point 0, minus 1 (docs/conventions.md I5).

Hyperparameters (paper 000 Sec. 4): SD v1.5, LoRA rank 8 on to_q/to_k/to_v/to_out.0, AdamW lr 1e-4, 500 warmup,
10k steps.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .common import LossOutput, check_labels, check_number, check_per_sample, implicit_reward, masked_mean


def bce_loss(err_model: Tensor, desirable, *, err_ref: Tensor | None = None, beta: float = 1.0) -> LossOutput:
    """Eq. (3) of paper 000: ``BCE_with_logits(logit, y)`` with ``logit = -beta * err_model`` (or the implicit reward)."""
    if err_ref is None:
        batch = check_per_sample(err_model=err_model)
        beta = check_number(beta, "beta")
        # Eq. (3): logit = -beta * MSE(eps_theta, eps)   (<= 0, so P(liked) <= 1/2)
        logit = -beta * err_model
    else:
        batch = check_per_sample(err_model=err_model, err_ref=err_ref)
        beta = check_number(beta, "beta")
        # anchored: logit = r = -(beta/2)(err_model - err_ref)
        logit = implicit_reward(err_model, err_ref, beta)
    labels = check_labels(desirable, "desirable", batch, err_model.device)
    # L = mean_i -[y_i log sigmoid(logit_i) + (1 - y_i) log sigmoid(-logit_i)]
    loss = F.binary_cross_entropy_with_logits(logit, labels.to(logit.dtype))

    signed = logit.detach() * (labels.float() * 2 - 1)  # > 0 when the logit agrees with the label
    metrics = {
        "loss": loss.item(),
        "accuracy": ((signed > 0).float().mean() + 0.5 * (signed == 0).float().mean()).item(),
        "logit_desirable": masked_mean(logit, labels),
        "logit_undesirable": masked_mean(logit, ~labels),
        "mse": err_model.detach().float().mean().item(),
    }
    if err_ref is not None:
        metrics["ref_mse"] = err_ref.detach().float().mean().item()
    return LossOutput(loss, metrics)
