"""Diff-contrast (Diffusion-RPO): every winner against every loser in the batch, weighted by similarity.

Paper 002, "Diffusion Preference Alignment via Relative Text-Image Contrast", Sec. 2.1 and Eq. (9): the double-blind
version of Diffusion-RPO (Gu et al. 2024, arXiv:2406.06382). Diffusion-DPO compares a winner only with its own loser.
Diff-contrast also compares winner ``i`` with the loser of pair ``j``, trusting that comparison in proportion to how
similar the two (image, prompt) pairs are. With embeddings ``f(y, x)`` of each (image, prompt) and a temperature
``tau``:

    d_ij  = 1 - cos(f(y_w_i, x_i), f(y_l_j, x_j))                       (the paper calls this "cos")
    W~_ij = exp(-d_ij / tau),      W_ij = W~_ij / sum_j' W~_ij'          (rows sum to 1; detached)
    L     = mean_i sum_j W_ij * softplus(-(r_w_i - r_l_j))               (Eq. (9))

with ``r`` the implicit reward of ``common.py``. **The weight multiplies outside the log-sigmoid**, as the paper
writes Eq. (9) (``-E[w_ij log sigma(...)]``). With ``W = I`` this is Diffusion-DPO exactly. As ``tau -> 0`` each row
puts all its weight on the most similar loser (the pair's own loser when its embedding is the nearest), and as
``tau -> inf`` the weights become uniform.

The LLM version, RPO (paper 002 App. B.3 Eq. (15), and the RPO authors' code), scales each margin *inside* the
log-sigmoid and averages over all ``M x M`` comparisons; ``weights_inside=True`` gives it:

    L_RPO = (1 / M^2) sum_ij softplus(-W_ij (r_w_i - r_l_j))

It is not DPO at ``W = I``: each off-diagonal comparison then contributes ``softplus(0) = log 2``.

Hyperparameters (paper 002): tau 0.01 on SD1.5 and 0.5 on SDXL (the caption of Table 1, Sec. 4.2; Table 3 in
Sec. 4.4 ablates tau on SD1.5 at beta 2000), beta 2000-5000 (App. D), batch size helps (2 -> 16 improved HPSv2,
App. C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import LossOutput, check_number, check_per_sample, check_tensor, implicit_reward
from .dpo import pair_metrics


def contrast_weights(emb_w: Tensor, emb_l: Tensor, *, tau: float) -> Tensor:
    """``W[i, j] = softmax_j( -(1 - cos(emb_w[i], emb_l[j])) / tau )``, shape ``(M, M)``, detached."""
    check_tensor(emb_w, "emb_w")
    check_tensor(emb_l, "emb_l")
    if emb_w.ndim != 2 or emb_l.ndim != 2:
        raise ValueError(
            f"emb_w and emb_l must be (M, D) embeddings, got {tuple(emb_w.shape)} and {tuple(emb_l.shape)}"
        )
    if emb_w.shape != emb_l.shape:
        raise ValueError(f"emb_l has shape {tuple(emb_l.shape)} but emb_w has {tuple(emb_w.shape)}; they must match")
    tau = check_number(tau, "tau")
    dtype = torch.promote_types(emb_w.dtype, torch.float32)  # half precision up to float32; float64 stays
    emb_w, emb_l = emb_w.detach().to(dtype), emb_l.detach().to(dtype)
    # cos_ij = f_w_i . f_l_j / (|f_w_i| |f_l_j|):  (M, D) @ (D, M) -> (M, M)
    cosine = F.normalize(emb_w, dim=-1) @ F.normalize(emb_l, dim=-1).T
    # W_ij = exp(-(1 - cos_ij)/tau) / sum_j' exp(-(1 - cos_ij')/tau): a row softmax, no overflow for tiny tau
    return torch.softmax(-(1.0 - cosine) / tau, dim=1)


def contrast_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    emb_w: Tensor | None,
    emb_l: Tensor | None,
    *,
    beta: float = 5000.0,
    tau: float = 0.5,
    weights_inside: bool = False,
    weights: Tensor | None = None,
) -> LossOutput:
    """Eq. (9) of paper 002 on per-sample errors ``(M,)`` and embeddings ``(M, D)``.

    ``weights`` (an ``(M, M)`` row-stochastic matrix) replaces the embedding weights when given, e.g. to check the
    reduction to DPO with ``W = I``; then ``emb_w``/``emb_l`` may be None.
    """
    batch = check_per_sample(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    beta = check_number(beta, "beta")
    if weights is None:
        if emb_w is None or emb_l is None:
            raise ValueError("emb_w and emb_l are required unless weights is given")
        if emb_w.ndim != 2 or emb_w.shape[0] != batch:
            raise ValueError(f"emb_w must have shape ({batch}, D) to match err_w, got {tuple(emb_w.shape)}")
        weights = contrast_weights(emb_w, emb_l, tau=tau).to(err_w.device)
    else:
        check_tensor(weights, "weights")
        if weights.shape != (batch, batch):
            raise ValueError(f"weights must have shape ({batch}, {batch}), got {tuple(weights.shape)}")
        weights = weights.detach()
    weights = weights.to(err_w.dtype)

    # r = -(beta/2)(err - err_ref)
    reward_w = implicit_reward(err_w, ref_err_w, beta)
    reward_l = implicit_reward(err_l, ref_err_l, beta)
    # m_ij = r_w_i - r_l_j, winner i against loser j:  (M, 1) - (1, M) -> (M, M)
    margins = reward_w[:, None] - reward_l[None, :]

    if weights_inside:
        # Eq. (15), LLM RPO:  L = (1 / M^2) sum_ij softplus(-W_ij m_ij)
        loss = -F.logsigmoid(weights * margins).mean()
    else:
        # Eq. (9):  L = mean_i sum_j W_ij softplus(-m_ij)
        loss = -(weights * F.logsigmoid(margins)).sum(dim=1).mean()

    metrics = pair_metrics(loss, margins.diagonal(), reward_w, reward_l, err_w, err_l, ref_err_w, ref_err_l)
    metrics["weight_diag"] = weights.diagonal().float().mean().item()
    return LossOutput(loss, metrics)
