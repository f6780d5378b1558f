"""Diffusion-DPO: preference pairs through the implicit reward.

Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization" (CVPR 2024, arXiv:2311.12908), as
written in paper 000 Eq. (4), paper 002 Eq. (14) and paper 004 Eq. (7) (the papers of docs/methods.md, "Papers"):

    L_DPO = -log sigmoid( r(x_w) - r(x_l) ),      r(x) = -(beta/2) (||eps_theta(x_t) - eps||^2 - ||eps_ref(x_t) - eps||^2)

The winner ``x_w`` and loser ``x_l`` of a pair share the prompt, the timestep ``t`` and the noise ``eps``
(one forward over the concatenated 2B batch). Since ``-log sigmoid(m) = softplus(-m)``:

    margin = r_w - r_l,       loss = mean(softplus(-margin))

At the start ``theta = ref``, so ``margin = 0``, the loss is ``log 2 ~ 0.693`` and the implicit accuracy is 0.5. The
gradient there is ``(beta/4)(grad err_w - grad err_l)``: a quarter-beta SFT step on the winner minus one on the
loser. With beta = 5000 the margin moves by thousands of units per unit error, so a loss that sits near 0.693 for
a while, while the accuracy creeps up, is normal.

Hyperparameters: Diffusion-DPO uses beta 5000 on SD1.5 and SDXL (our convention; the authors' launchers
``launchers/sd15.sh`` and ``sdxl.sh`` pass ``--beta_dpo 5000``; the diffusers SD1.5 script's default 2500 is the same
run, its SDXL script's default 5000 too, docs/conventions.md), AdamW, an effective batch of 2048 pairs, lr 2.048e-8
(restated in paper 004 App. D.3), 2000 steps with 500 warm-up steps on SD1.5 and 200 on SDXL (the launchers; the
2000-step warm-up of paper 004 App. D.3 is DSPO's own recipe). Paper 000 trains a rank-8 LoRA with AdamW lr 1e-4,
500 warmup and 10k steps, and reports trying beta in {0.8, 0.9, 0.99, 1.0} (Sec. 4.2): a convention in which the
1/2, the timestep weight and the dimension count are not folded into beta, so those values do not transfer to ours.

``loss_type`` offers the LLM-DPO variants (as TRL does), all on the same margin ``m = r_w - r_l`` and its
unscaled log-ratio ``h = m / beta``:

* ``"sigmoid"``: DPO (Rafailov et al. 2023, Eq. (7)).
* ``"hinge"``: SLiC-HF (Zhao et al. 2023), ``relu(1 - m)``.
* ``"ipo"``: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", Eq. (17)), ``(h - 1/(2 beta))^2``.
* ``"cdpo"``: conservative DPO (Mitchell 2023), labels flipped with probability ``label_smoothing``:
  ``(1 - e) softplus(-m) + e softplus(m)``.
* ``"robust"``: Chowdhury et al. 2024, "Provably Robust DPO", Eq. (8): the unbiased loss under label noise ``e``,
  ``((1 - e) softplus(-m) - e softplus(m)) / (1 - 2e)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .common import LossOutput, check_choice, check_number, check_per_sample, implicit_reward, pairwise_accuracy

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "cdpo", "robust")


def dpo_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Diffusion-DPO on per-sample errors of shape ``(B,)`` (winners ``w``, losers ``l``, model and reference)."""
    check_per_sample(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    beta = check_number(beta, "beta")
    check_choice(loss_type, "loss_type", LOSS_TYPES)
    label_smoothing = check_number(label_smoothing, "label_smoothing", low_inclusive=True, high=0.5)
    if label_smoothing > 0 and loss_type not in ("cdpo", "robust"):
        raise ValueError(f"label_smoothing is only used by loss_type 'cdpo' and 'robust', not {loss_type!r}")

    # r = -(beta/2)(err - err_ref), for the winners and the losers
    reward_w = implicit_reward(err_w, ref_err_w, beta)
    reward_l = implicit_reward(err_l, ref_err_l, beta)
    # m = r_w - r_l
    margin = reward_w - reward_l

    if loss_type == "sigmoid":
        # DPO:    -log sigmoid(m)   (= softplus(-m), without softplus' linear cut-off above 20)
        losses = -F.logsigmoid(margin)
    elif loss_type == "hinge":
        # SLiC:   max(0, 1 - m)
        losses = F.relu(1.0 - margin)
    elif loss_type == "ipo":
        # IPO:    (h - 1/(2 beta))^2,  h = m / beta
        losses = (margin / beta - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "cdpo":
        # cDPO:   -(1 - e) log sigmoid(m) - e log sigmoid(-m)
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    else:
        # robust: (-(1 - e) log sigmoid(m) + e log sigmoid(-m)) / (1 - 2e)
        losses = (-(1 - label_smoothing) * F.logsigmoid(margin) + label_smoothing * F.logsigmoid(-margin)) / (
            1 - 2 * label_smoothing
        )
    # L = mean over the pairs
    loss = losses.mean()
    return LossOutput(loss, pair_metrics(loss, margin, reward_w, reward_l, err_w, err_l, ref_err_w, ref_err_l))


def pair_metrics(loss, margin, reward_w, reward_l, err_w, err_l, ref_err_w, ref_err_l) -> dict[str, float]:
    """The numbers a pairwise run is judged by; shared with SPIN and Diff-contrast."""

    def mean(x: Tensor) -> float:
        return x.detach().float().mean().item()

    return {
        "loss": loss.item(),
        "implicit_acc": pairwise_accuracy(margin),
        "reward_w": mean(reward_w),
        "reward_l": mean(reward_l),
        "margin": mean(margin),
        "mse_w": mean(err_w),
        "mse_l": mean(err_l),
        "ref_mse_w": mean(ref_err_w),
        "ref_mse_l": mean(ref_err_l),
    }
