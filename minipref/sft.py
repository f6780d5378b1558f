"""SFT and CSFT: the supervised baselines every preference paper compares against.

SFT (baseline in Diffusion-KTO, paper 001 Sec. 5.1.2, arXiv:2404.04465; Diff-contrast, paper 002; DSPO, paper 004;
the papers of docs/methods.md, "Papers"): fine-tune on the preferred images only, with the plain denoising objective
of Ho et al.,

    L_SFT = E_{x0 ~ D_desirable, t, eps} || eps_theta(x_t, t, c) - eps ||^2  =  mean_i err_model_i  (i desirable)

CSFT, conditional SFT (paper 001 Sec. 5.1.2, after HPS v1): prefix every prompt with "good image" or
"bad image" according to its label, train on *all* images with the same plain objective, and sample with the
"good image" prefix. The loss is SFT with every weight 1; the only new part is the prompt.

Normalisation: ``sft_loss(err, weight=desirable)`` divides by the number of *desirable* samples, like the
Diffusion-DPO code's ``--sft`` (it feeds only the winners and takes ``F.mse_loss(..., reduction="mean")``). The
Diffusion-KTO code's ``--loss sft`` computes ``(model_losses * labels).mean()``: undesirable rows count as 0 and it
divides by the whole batch ``B``, so its loss (and gradient) is ``n_desirable / B`` times ours, a factor that changes
from batch to batch (0.8 on average at its desirable ratio 0.8). minipref keeps the per-desirable-sample mean, so
the learning rate means the same whatever the label mix; to reproduce the KTO code exactly, multiply the loss by
``n_desirable / B``.

Hyperparameters: paper 001 trains both baselines like Diffusion-KTO (SD v1.5, Adam, lr 1e-7, 1000 warmup,
10k steps, batch 2 x 16 GPUs, App. A).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .common import LossOutput, check_labels, check_per_sample, check_tensor

GOOD_PREFIX = "good image, "
BAD_PREFIX = "bad image, "


def sft_loss(err_model: Tensor, weight: Tensor | None = None) -> LossOutput:
    """``sum_i w_i err_i / sum_i w_i``: the mean error over the samples with weight 1 (all samples if ``weight`` is None).

    ``weight`` is a boolean mask (e.g. ``desirable``) or non-negative numbers. A batch with no weighted sample
    gives a zero loss that still belongs to the graph, so a data-parallel step never deadlocks on it.
    """
    batch = check_per_sample(err_model=err_model)
    if weight is None:
        weight = torch.ones_like(err_model)
    else:
        check_tensor(weight.float() if isinstance(weight, Tensor) and weight.dtype == torch.bool else weight, "weight")
        if weight.shape != (batch,):
            raise ValueError(f"weight must have shape ({batch},) to match err_model, got {tuple(weight.shape)}")
        weight = weight.to(err_model.dtype)
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError("weight must be finite and non-negative")
    total = weight.sum()
    # L = sum_i w_i err_i / sum_i w_i   (the Diffusion-KTO code's --loss sft is this times sum_i w_i / B)
    loss = (weight * err_model).sum() / total.clamp(min=torch.finfo(err_model.dtype).tiny)
    return LossOutput(loss, {"loss": loss.item(), "mse": err_model.detach().float().mean().item(), "n_weighted": total.item()})


def csft_prompts(prompts: Sequence[str], desirable) -> list[str]:
    """Paper 001 Sec. 5.1.2: ``"good image, " + prompt`` for desirable samples, ``"bad image, " + prompt`` otherwise.

    At sampling time use ``GOOD_PREFIX + prompt``.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    labels = check_labels(desirable, "desirable", len(prompts), torch.device("cpu"))
    return [(GOOD_PREFIX if good else BAD_PREFIX) + prompt for prompt, good in zip(prompts, labels.tolist())]
