"""What SPO does with preference scores: PickScore's pair loss (training the SPM), the pair rule (best and worst
of k candidates, kept above a gap), and the path from a noisy latent to the SPM's input (DDIM's x0 prediction, VAE
decode, CLIP preprocessing). Paper 003, Sec. 4.2-4.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minipref import LossOutput, pairwise_accuracy

# SPO keeps a pair only when preference_gap exceeds this (docs/conventions.md §7)
THRESHOLD = {"sd15": 0.3, "sdxl": 0.4}


def _get(size, key):
    """``size["key"]`` for a dict (transformers 4.x) or a SizeDict (5.x); None when absent."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

# ----------------------------------------------------------------------------------------------------------------
# The PickScore loss and the SPO pair rule
# ----------------------------------------------------------------------------------------------------------------


def pair_preference_loss(scores_w: Tensor, scores_l: Tensor, label_w: Tensor | None = None) -> LossOutput:
    """PickScore's loss (Kirstain et al.; paper 003 Sec. 4.2): cross-entropy of ``softmax([s_w, s_l])`` to the label.

    ``label_w`` is the probability that the first image is preferred: 1 (default) for a clean win, 0.5 for a tie.
    The entropy of the label is subtracted (the authors' code adds ``log 0.5`` for ties), so the loss is the KL
    divergence: exactly the cross-entropy for hard labels, and 0 at the ideal prediction for ties too.
    """
    if not (isinstance(scores_w, Tensor) and isinstance(scores_l, Tensor)) or scores_w.ndim != 1 \
            or scores_w.shape != scores_l.shape or scores_w.shape[0] == 0:
        raise ValueError("scores_w and scores_l must be non-empty tensors of the same shape (B,), got "
                         f"{getattr(scores_w, 'shape', scores_w)} and {getattr(scores_l, 'shape', scores_l)}")
    if label_w is None:
        label_w = torch.ones_like(scores_w)
    label_w = torch.as_tensor(label_w, dtype=scores_w.dtype, device=scores_w.device)
    if label_w.shape != scores_w.shape or label_w.min() < 0 or label_w.max() > 1:
        raise ValueError(f"label_w must have shape {tuple(scores_w.shape)} with values in [0, 1]")
    log_probs = torch.stack([scores_w, scores_l], dim=-1).log_softmax(-1)  # (B, 2)
    target = torch.stack([label_w, 1 - label_w], dim=-1)
    per_pair = (torch.xlogy(target, target) - target * log_probs).sum(-1)
    loss = per_pair.mean()
    prob_w = log_probs[:, 0].exp().detach()
    decided = label_w != 0.5
    # margin towards the labelled winner; equal scores count half (docs/conventions.md §5), so an untrained model
    # reads 0.5
    margin = ((scores_w - scores_l) * torch.sign(label_w - 0.5)).detach()
    accuracy = pairwise_accuracy(margin[decided]) if decided.any() else float("nan")
    return LossOutput(loss, {"loss": loss.item(), "accuracy": accuracy, "prob_w": prob_w.mean().item(),
                             "margin": (scores_w - scores_l).mean().item()})


def preference_gap(scores_best: Tensor, scores_worst: Tensor) -> Tensor:
    """``|softmax([s_best, s_worst])_0 - softmax(...)_1|`` = ``|tanh((s_best - s_worst) / 2)|`` (SPO's pair filter)."""
    return torch.tanh((scores_best - scores_worst) / 2).abs()


def best_worst_pair(scores: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """SPO's pair rule (Sec. 4.1, authors' ``preference_score_compare``) over ``k`` candidates per prompt.

    ``scores`` ``(k, B)`` -> ``best (B,)``, ``worst (B,)`` candidate indices and ``keep (B,)``: the pair is used only
    if its :func:`preference_gap` exceeds ``threshold`` (0.3 for SD1.5, 0.4 for SDXL, :data:`THRESHOLD`).
    """
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[0] < 2:
        raise ValueError(f"scores must have shape (k, B) with k >= 2 candidates, got {getattr(scores, 'shape', None)}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    best, worst = scores.argmax(0), scores.argmin(0)
    columns = torch.arange(scores.shape[1], device=scores.device)
    keep = preference_gap(scores[best, columns], scores[worst, columns]) > threshold
    return best, worst, keep


# ----------------------------------------------------------------------------------------------------------------
# From a noisy latent to the SPM's input: DDIM's x0 prediction, VAE decode, CLIP preprocessing
# ----------------------------------------------------------------------------------------------------------------


def predicted_x0(x_t: Tensor, model_output: Tensor, timesteps, scheduler) -> Tensor:
    """DDIM's "predicted x_0" (Song et al. Eq. (12); ``DDIMScheduler.step(...).pred_original_sample``), batched over t.

    ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` for epsilon prediction, ``sqrt(abar_t) x_t -
    sqrt(1 - abar_t) v`` for v-prediction. diffusers' ``step`` takes one scalar timestep and needs
    ``set_timesteps``; here each sample has its own ``t`` (SPM training draws one per pair). Honours the
    scheduler's ``clip_sample`` (False for Stable Diffusion); dynamic thresholding is not supported.
    """
    if x_t.shape != model_output.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and model_output {tuple(model_output.shape)} must match")
    t = torch.as_tensor(timesteps, device=x_t.device).long()
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    alphas_cumprod = scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32)
    if t.shape != (x_t.shape[0],) or t.min() < 0 or t.max() >= alphas_cumprod.shape[0]:
        raise ValueError(f"timesteps must be (B,) = ({x_t.shape[0]},) in [0, {alphas_cumprod.shape[0]})")
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("schedulers with dynamic thresholding are not supported")
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    abar = alphas_cumprod[t].view(shape)
    x, out = x_t.float(), model_output.float()
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        x0 = (x - (1 - abar).sqrt() * out) / abar.sqrt()
    elif prediction == "v_prediction":
        x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
    elif prediction == "sample":
        x0 = out
    else:
        raise ValueError(f"unknown prediction_type {prediction!r}")
    if getattr(scheduler.config, "clip_sample", False):
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    return x0.to(x_t.dtype)


def decode_latents(vae, latents: Tensor) -> Tensor:
    """VAE latents (scaled as the UNet sees them) -> images in about ``[-1, 1]`` (not clamped)."""
    latents = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample


def clip_pixel_values(images: Tensor, size, crop_size, mean, std) -> Tensor:
    """The ``CLIPImageProcessor`` recipe in batched torch ops: resize (bicubic, antialiased), centre crop, normalise.

    ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``. ``size`` is ``{"shortest_edge": s}`` (resize the shorter side to s)
    or ``{"height", "width"}``; ``crop_size`` is ``{"height", "width"}``. Differentiable; runs where ``images`` are.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {getattr(images, 'shape', type(images))}")
    height, width = images.shape[-2:]
    shortest = _get(size, "shortest_edge")
    if shortest:
        scale = shortest / min(height, width)
        new_size = (max(shortest, round(height * scale)), max(shortest, round(width * scale)))
    else:
        new_size = (_get(size, "height"), _get(size, "width"))
    x = images.float()
    if tuple(new_size) != (height, width):
        x = F.interpolate(x, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    crop_h, crop_w = _get(crop_size, "height"), _get(crop_size, "width")
    if crop_h and crop_w and (crop_h, crop_w) != tuple(x.shape[-2:]):
        top, left = (x.shape[-2] - crop_h) // 2, (x.shape[-1] - crop_w) // 2
        x = x[..., top:top + crop_h, left:left + crop_w]
    x = ((x + 1) / 2).clamp(0, 1)
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).to(images.dtype)

