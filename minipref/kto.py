"""Diffusion-KTO: maximise human utility from per-image likes and dislikes, no pairs needed.

Paper 001, "Aligning Diffusion Models by Optimizing Human Utility" (Li et al. 2024, arXiv:2404.04465), Eq. (13)-(15),
Sec. 4.2-4.3.
Prospect theory says people value an outcome *relative to a reference point* and through a non-linear utility.
With the implicit reward ``r`` of each image (see ``common.py``) and a reference point ``z_ref``:

    u   = s * (r - z_ref),          s = +1 for a desirable image, -1 for an undesirable one
    L   = E[ lambda_y * (1 - U(u)) ]                                              (Eq. (14)-(15))

Three utilities ``U`` (Sec. 4.2.1-4.2.3, App. Fig. 8):

* ``kahneman_tversky``: ``U(u) = sigmoid(u)``, concave for gains and convex for losses: the paper's choice.
  Its gradient ``sigmoid'(u)`` fades both when a sample is already well fitted and when it is hopeless, which
  makes it robust to noisy labels.
* ``loss_averse``: ``U(u) = log sigmoid(u)``, concave. With a desirable winner only and ``z_ref = r_l`` (the reward of
  the paired loser, not detached) the loss is ``lambda_d * (1 - log sigmoid(r_w - r_l)) = lambda_d * (1 + L_DPO)``:
  Diffusion-DPO scaled by ``lambda_d`` plus the constant ``lambda_d`` (Sec. 4.2.1; with the default ``lambda_d = 1``,
  ``kto_loss - 1 == dpo_loss``, with ``lambda_d = 2`` it is twice DPO plus 2). Its gradient vanishes only for large
  *gains*, so it keeps pushing losses away.
* ``risk_seeking``: ``U(u) = -log sigmoid(-u)``, convex; ``U_rs(u) + U_la(u) = u``. Its gradient vanishes for large
  *losses*, so it ignores undesirable samples it already rates badly, much like SFT.

The convex ``risk_seeking`` above is unbounded below: an undesirable sample's loss ``1 - softplus(-(r - z_ref))`` falls
without limit as its reward goes to ``-inf``, i.e. as the model unlearns it, and on the toy it diverges
(docs/toy.md). The authors' code also has a bounded form (``risk_seeking_1`` there), offered here as

* ``risk_seeking_bounded``: ``U = risk_seeking`` on desirable samples and ``loss_averse`` on undesirable ones
  (``U(u) = -s log sigmoid(-s u)``). Desirable rewards are bounded above (``r <= beta/2 * err_ref`` as
  ``err_model >= 0``), so this loss is bounded below.

The reference point estimates the KL term of KTO, ``z_ref ~ KL(pi_theta || pi_ref)``:

* ``"batch"`` (default, the Diffusion-KTO code): ``clamp(mean_i r_i, min=0)``, detached. The authors' code averages
  over the global batch of all processes (``accelerator.reduce``); a data-parallel trainer that wants exactly that
  gathers the rewards, computes ``clamp(mean, 0).detach()`` itself and passes it as a tensor.
* ``"zero"``: ``z_ref = 0``.
* a tensor: the caller's own estimate, scalar or per-sample ``(B,)``, e.g. the mean reward of mismatched
  (prompt, image) pairs as in the paper and HALOs. Clamp it at 0 and detach it before passing; it is used as
  given, so that ``z_ref = r_l`` with gradient reproduces DPO exactly (docs/conventions.md I3).

Data: each training sample is desirable with probability ``gamma`` (Sec. 4.3; 0.8 in App. A), which the trainer's
sampler handles. Hyperparameters (App. A): SD v1.5, Adam, lr 1e-7, 1000 warmup, 10k iterations, batch 2 per GPU x 16,
beta 5000. The authors' logit ``beta_K * (err_ref - err_model)`` has no 1/2 (docs/conventions.md §2), so their beta is
half of ours: the paper's App. A value 5000 is our 10000 (the presets use it), and the code's default ``--beta_dpo
1000`` (``train_kto_sd_v1.5.py``; its example launcher ``exps/example.sh`` does not set it) is our 2000.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (
    LossOutput,
    check_choice,
    check_labels,
    check_number,
    check_per_sample,
    implicit_reward,
    masked_mean,
    pairwise_accuracy,
)


def kahneman_tversky(u: Tensor) -> Tensor:
    # U(u) = sigmoid(u)
    return torch.sigmoid(u)


def loss_averse(u: Tensor) -> Tensor:
    # U(u) = log sigmoid(u)
    return F.logsigmoid(u)


def risk_seeking(u: Tensor) -> Tensor:
    # U(u) = -log sigmoid(-u)
    return -F.logsigmoid(-u)


UTILITIES = {"kahneman_tversky": kahneman_tversky, "loss_averse": loss_averse, "risk_seeking": risk_seeking}
UTILITY_NAMES = tuple(UTILITIES) + ("risk_seeking_bounded",)  # the last depends on the label too
REFERENCE_POINTS = ("batch", "zero")


def kto_loss(
    err_model: Tensor,
    err_ref: Tensor,
    desirable,
    *,
    beta: float = 5000.0,
    utility: str = "kahneman_tversky",
    reference_point: str | Tensor = "batch",
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> LossOutput:
    """Eq. (14)-(15) of paper 001 on per-sample errors ``(B,)`` and labels ``desirable`` ``(B,)``."""
    batch = check_per_sample(err_model=err_model, err_ref=err_ref)
    beta = check_number(beta, "beta")
    check_choice(utility, "utility", UTILITY_NAMES)
    lambda_d = check_number(lambda_d, "lambda_d")
    lambda_u = check_number(lambda_u, "lambda_u")
    labels = check_labels(desirable, "desirable", batch, err_model.device)

    # r = -(beta/2)(err_model - err_ref)
    reward = implicit_reward(err_model, err_ref, beta)
    # z_ref ~ KL(pi_theta || pi_ref): clamp(mean r, 0) detached, 0, or the caller's tensor
    z_ref = _reference_point(reference_point, reward, batch)

    # s = +1 for a desirable sample, -1 for an undesirable one
    sign = labels.to(reward.dtype) * 2 - 1
    # u = s (r - z_ref): the gain (u > 0) or loss (u < 0) relative to the reference point
    u = sign * (reward - z_ref)
    # lambda_y = lambda_d for desirable, lambda_u for undesirable samples
    weight = torch.where(labels, reward.new_tensor(lambda_d), reward.new_tensor(lambda_u))
    if utility == "risk_seeking_bounded":
        # U(u) = -s log sigmoid(-s u): risk-seeking on desirable, loss-averse on undesirable samples
        value = torch.where(labels, risk_seeking(u), loss_averse(u))
    else:
        value = UTILITIES[utility](u)
    # Eq. (14)-(15):  L = mean_i lambda_y (1 - U(u_i))
    loss = (weight * (1 - value)).mean()

    return LossOutput(
        loss,
        {
            "loss": loss.item(),
            "kl": z_ref.detach().float().mean().item(),
            "implicit_acc": pairwise_accuracy(u),
            "reward_desirable": masked_mean(reward, labels),
            "reward_undesirable": masked_mean(reward, ~labels),
            "frac_desirable": labels.float().mean().item(),
            "mse": err_model.detach().float().mean().item(),
            "ref_mse": err_ref.detach().float().mean().item(),
        },
    )


def _reference_point(reference_point, reward: Tensor, batch: int) -> Tensor:
    if isinstance(reference_point, Tensor):
        if reference_point.shape not in ((), (1,), (batch,)):
            raise ValueError(
                f"reference_point tensor must be a scalar or have shape ({batch},), got {tuple(reference_point.shape)}"
            )
        return reference_point.to(reward.dtype)
    check_choice(reference_point, "reference_point", REFERENCE_POINTS + ("<a tensor>",))
    if reference_point == "zero":
        # z_ref = 0
        return torch.zeros((), dtype=reward.dtype, device=reward.device)
    # z_ref = max(0, mean_i r_i), detached: the KL estimate of the Diffusion-KTO code
    return reward.detach().mean().clamp(min=0)
