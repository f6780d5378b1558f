"""Golden values: every objective recomputed LONGHAND from its paper's equation on fixed small tensors.

The expected side uses plain Python floats and the `math` module only (scalar helpers in core_helpers), never
the function under test or any minipref helper. Conventions are those of docs/conventions.md §1-§2:
err = mean over non-batch dims of (pred - target)^2, r = -(beta/2)(err_model - err_ref).
"""

from __future__ import annotations

import math

import pytest
import torch

from minipref import (
    bce_loss,
    contrast_loss,
    contrast_weights,
    csft_prompts,
    dpo_loss,
    dspo_loss,
    gaussian_step_log_prob,
    implicit_reward,
    kto_loss,
    per_sample_mse,
    sft_loss,
    spin_loss,
    spo_loss,
)
from tests.core_helpers import F64, logsigmoid, mean, sigmoid, softplus

RTOL, ATOL = 1e-10, 1e-12
# Metrics are logged floats (dict[str, float]); float32 rounding of a logged number is acceptable, a wrong formula
# is not. The losses themselves are held to RTOL/ATOL.
METRIC_REL, METRIC_ABS = 1e-6, 1e-7


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual, expected) -> None:
    """Tight comparison of a tensor (or float) against plain-Python numbers."""
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), t(expected), rtol=RTOL, atol=ATOL)


def r_longhand(err_model, err_ref, beta):
    """docs/conventions.md §2 (paper 002 eq. 8, paper 004 eq. 11 with the timestep factor folded into beta)."""
    return [-(beta / 2.0) * (e - e_ref) for e, e_ref in zip(err_model, err_ref)]


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------
def test_golden_per_sample_mse():
    # err_i = mean over non-batch dims of (pred - target)^2; shapes (2, 2, 2) -> (2,)
    pred = [[[0.5, -1.0], [2.0, 0.0]], [[1.5, 1.5], [-0.5, 0.25]]]
    target = [[[0.0, -1.0], [1.0, 1.0]], [[1.0, 2.5], [0.5, 0.0]]]
    expected = []
    for p_i, t_i in zip(pred, target):
        diffs = [(p - q) ** 2 for p_row, q_row in zip(p_i, t_i) for p, q in zip(p_row, q_row)]
        expected.append(sum(diffs) / len(diffs))
    out = per_sample_mse(t(pred), t(target))
    assert out.shape == (2,)
    close(out, expected)
    close(out, [2.25 / 4, 2.3125 / 4])  # a mean over the 4 entries, not a sum


def test_golden_implicit_reward():
    # r = -(beta/2)(err_model - err_ref)   (docs/conventions.md §2)
    err_model, err_ref, beta = [0.3, 0.5, 0.2], [0.4, 0.5, 0.1], 3.0
    close(implicit_reward(t(err_model), t(err_ref), beta), r_longhand(err_model, err_ref, beta))
    close(implicit_reward(t(err_model), t(err_ref), beta), [0.15, 0.0, -0.15])


def test_golden_gaussian_step_log_prob_scalar_std():
    # log N(x; mu, s^2) = -(x - mu)^2 / (2 s^2) - log s - log(2 pi)/2, averaged over non-batch dims (SPO Sec. 4)
    sample = [[0.1, -0.3, 0.7], [1.2, 0.0, -0.4]]
    mu = [[0.0, -0.1, 0.5], [1.0, 0.3, -0.4]]
    std = 0.5
    expected = [
        mean(-((x - m) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi) for x, m in zip(xs, ms))
        for xs, ms in zip(sample, mu)
    ]
    close(gaussian_step_log_prob(t(sample), t(mu), torch.tensor(std, dtype=F64)), expected)


@pytest.mark.parametrize("std_layout", ["per_sample_broadcast", "full"])
def test_golden_gaussian_step_log_prob_per_sample_std(std_layout):
    sample = [[0.1, -0.3, 0.7], [1.2, 0.0, -0.4]]
    mu = [[0.0, -0.1, 0.5], [1.0, 0.3, -0.4]]
    stds = [0.5, 0.2]  # one std per sample, as a DDIM step with eta = 1 gives at different t
    expected = [
        mean(-((x - m) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi) for x, m in zip(xs, ms))
        for xs, ms, s in zip(sample, mu, stds)
    ]
    std = t([[s] for s in stds]) if std_layout == "per_sample_broadcast" else t([[s] * 3 for s in stds])
    close(gaussian_step_log_prob(t(sample), t(mu), std), expected)


# ----------------------------------------------------------------------------------------------------------
# SFT and CSFT (Diffusion-KTO Sec. 5.1.2)
# ----------------------------------------------------------------------------------------------------------
def test_golden_sft_all_samples():
    err = [0.3, 0.5, 0.2, 0.9]
    out = sft_loss(t(err))
    close(out.loss, sum(err) / 4)


def test_golden_sft_weighted_to_winners():
    # SFT baseline: mean err over the desirable / winning samples only (weight 1), others ignored.
    err, weight = [0.3, 0.5, 0.2, 0.9], [1.0, 0.0, 1.0, 0.0]
    out = sft_loss(t(err), weight=t(weight))
    close(out.loss, (0.3 + 0.2) / 2)


def test_golden_sft_normalisation_differs_from_the_kto_code_by_n_desirable_over_batch():
    # Diffusion-DPO --sft: mean over the winners (what sft_loss computes). Diffusion-KTO --loss sft:
    # (model_losses * labels).mean(), i.e. divided by the whole batch; the ratio is n_desirable / B = 3/5 here.
    err, labels = [0.3, 0.5, 0.2, 0.9, 0.4], [True, False, True, False, True]
    kto_code = sum(e * float(y) for e, y in zip(err, labels)) / len(err)
    out = sft_loss(t(err), weight=torch.tensor(labels))
    close(out.loss, (0.3 + 0.2 + 0.4) / 3)
    close(out.loss * 3 / 5, kto_code)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_golden_csft_prompts(as_tensor):
    # CSFT (Diffusion-KTO Sec. 5.1.2): condition on a "good image" / "bad image" prefix by label.
    prompts = ["a cat", "a red car on a hill", "a dog"]
    desirable = [True, False, True]
    labels = torch.tensor(desirable) if as_tensor else desirable
    out = csft_prompts(prompts, labels)
    assert out == ["good image, a cat", "bad image, a red car on a hill", "good image, a dog"]
    assert prompts == ["a cat", "a red car on a hill", "a dog"]  # input list not mutated


# ----------------------------------------------------------------------------------------------------------
# BCE LoRA (LoRA study eq. 3)
# ----------------------------------------------------------------------------------------------------------
def _bce(logits, labels):
    # BCE_with_logits(l, y) = -[y log sigmoid(l) + (1 - y) log sigmoid(-l)], averaged over the batch
    return mean(-(y * logsigmoid(l) + (1 - y) * logsigmoid(-l)) for l, y in zip(logits, labels))


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_golden_bce_reference_free(beta):
    # Eq. (3) of the LoRA study: logit = -beta * err_model (the paper writes it with beta = 1).
    err, labels = [0.3, 1.2, 0.05, 0.6], [1, 0, 1, 0]
    expected = _bce([-beta * e for e in err], labels)
    out = bce_loss(t(err), torch.tensor([bool(y) for y in labels]), beta=beta)
    close(out.loss, expected)


def test_golden_bce_with_reference():
    # With err_ref the logit is the implicit reward r = -(beta/2)(err - err_ref).
    err, err_ref, labels, beta = [0.3, 1.2, 0.05, 0.6], [0.35, 1.0, 0.05, 0.7], [1, 0, 1, 0], 4.0
    expected = _bce(r_longhand(err, err_ref, beta), labels)
    out = bce_loss(t(err), torch.tensor([bool(y) for y in labels]), err_ref=t(err_ref), beta=beta)
    close(out.loss, expected)


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO (LoRA study eq. 4; Diff-contrast eq. 14; DSPO eq. 7) and SPIN-Diffusion (LoRA study Sec. 3.2)
# ----------------------------------------------------------------------------------------------------------
DPO_CASE = dict(
    err_w=[0.30, 0.52, 0.11],
    err_l=[0.41, 0.50, 0.20],
    ref_err_w=[0.31, 0.50, 0.12],
    ref_err_l=[0.40, 0.53, 0.19],
    beta=50.0,
)


def _dpo_longhand(err_w, err_l, ref_err_w, ref_err_l, beta):
    r_w = r_longhand(err_w, ref_err_w, beta)
    r_l = r_longhand(err_l, ref_err_l, beta)
    margin = [a - b for a, b in zip(r_w, r_l)]
    loss = mean(softplus(-m) for m in margin)  # -log sigmoid(m) = softplus(-m)
    acc = mean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margin)
    return loss, r_w, r_l, margin, acc


def test_golden_dpo():
    loss, r_w, r_l, margin, acc = _dpo_longhand(**DPO_CASE)
    c = DPO_CASE
    out = dpo_loss(t(c["err_w"]), t(c["err_l"]), t(c["ref_err_w"]), t(c["ref_err_l"]), beta=c["beta"])
    assert out.loss.dim() == 0
    close(out.loss, loss)
    assert out.metrics["implicit_acc"] == pytest.approx(acc, abs=METRIC_ABS)
    assert acc == pytest.approx(2 / 3)  # margins are [0.5, -1.25, 0.5]
    assert out.metrics["reward_w"] == pytest.approx(mean(r_w), rel=METRIC_REL, abs=METRIC_ABS)
    assert out.metrics["reward_l"] == pytest.approx(mean(r_l), rel=METRIC_REL, abs=METRIC_ABS)
    assert out.metrics["margin"] == pytest.approx(mean(margin), rel=METRIC_REL, abs=METRIC_ABS)


def test_golden_dpo_default_beta_is_5000():
    c = dict(DPO_CASE, err_w=[0.3000, 0.5200], err_l=[0.4100, 0.5000], ref_err_w=[0.3001, 0.5199], ref_err_l=[0.4100, 0.5002])
    c["beta"] = 5000.0
    loss = _dpo_longhand(**c)[0]
    out = dpo_loss(t(c["err_w"]), t(c["err_l"]), t(c["ref_err_w"]), t(c["ref_err_l"]))
    close(out.loss, loss)


def test_golden_spin():
    # SPIN-Diffusion: Diffusion-DPO with winner = real image, loser = the opponent's own sample,
    # reference = the opponent theta_k.
    err_real, err_gen, opp_real, opp_gen, beta = [0.2, 0.7], [0.5, 0.3], [0.25, 0.6], [0.45, 0.35], 30.0
    loss = _dpo_longhand(err_real, err_gen, opp_real, opp_gen, beta)[0]
    out = spin_loss(t(err_real), t(err_gen), t(opp_real), t(opp_gen), beta=beta)
    close(out.loss, loss)


# ----------------------------------------------------------------------------------------------------------
# Diffusion-KTO (Diffusion-KTO eq. 13-15, Sec. 4.2-4.3)
# ----------------------------------------------------------------------------------------------------------
UTILITY = {
    "kahneman_tversky": sigmoid,  # Sec. 4.2.3
    "loss_averse": logsigmoid,  # Sec. 4.2.1 (concave)
    "risk_seeking": lambda u: -logsigmoid(-u),  # Sec. 4.2.2 (convex)
}
KTO_LABELS = [True, False, True, False]
KTO_ERR = [0.30, 0.52, 0.11, 0.70]
KTO_REF_POSITIVE_MEAN = [0.34, 0.50, 0.15, 0.69]  # r = [0.4, -0.2, 0.4, -0.1] at beta 20: mean 0.125 > 0
KTO_REF_NEGATIVE_MEAN = [0.28, 0.50, 0.15, 0.65]  # r = [-0.2, -0.2, 0.4, -0.5]: mean -0.125, clamped to 0
REFERENCE_POINTS = {
    "batch_positive_mean": ("batch", KTO_REF_POSITIVE_MEAN),
    "batch_clamped_to_zero": ("batch", KTO_REF_NEGATIVE_MEAN),
    "zero": ("zero", KTO_REF_POSITIVE_MEAN),
    "scalar_tensor": (0.05, KTO_REF_POSITIVE_MEAN),
    "per_sample_tensor": ([0.1, -0.1, 0.0, 0.2], KTO_REF_POSITIVE_MEAN),
}


@pytest.mark.parametrize("utility", list(UTILITY))
@pytest.mark.parametrize("point_case", list(REFERENCE_POINTS))
def test_golden_kto(utility, point_case):
    beta, lambda_d, lambda_u = 20.0, 0.7, 1.3
    point, err_ref = REFERENCE_POINTS[point_case]
    r = r_longhand(KTO_ERR, err_ref, beta)
    if point == "batch":
        z = [max(mean(r), 0.0)] * len(r)  # clamp(mean r over the batch, min=0)
        point_arg = "batch"
    elif point == "zero":
        z, point_arg = [0.0] * len(r), "zero"
    elif isinstance(point, float):
        z, point_arg = [point] * len(r), torch.tensor(point, dtype=F64)
    else:
        z, point_arg = point, t(point)
    # u = s (r - z_ref), s = +1 desirable / -1 undesirable; loss = lambda_y (1 - U(u)), averaged over samples.
    losses = []
    for r_i, z_i, y in zip(r, z, KTO_LABELS):
        s, lam = (1.0, lambda_d) if y else (-1.0, lambda_u)
        losses.append(lam * (1.0 - UTILITY[utility](s * (r_i - z_i))))
    out = kto_loss(
        t(KTO_ERR),
        t(err_ref),
        torch.tensor(KTO_LABELS),
        beta=beta,
        utility=utility,
        reference_point=point_arg,
        lambda_d=lambda_d,
        lambda_u=lambda_u,
    )
    close(out.loss, mean(losses))
    assert out.metrics["reward_desirable"] == pytest.approx(mean(r[i] for i in (0, 2)), rel=METRIC_REL, abs=METRIC_ABS)
    assert out.metrics["reward_undesirable"] == pytest.approx(mean(r[i] for i in (1, 3)), rel=METRIC_REL, abs=METRIC_ABS)
    for key in ("kl", "implicit_acc"):
        assert math.isfinite(out.metrics[key])
    assert 0.0 <= out.metrics["implicit_acc"] <= 1.0


def test_golden_kto_risk_seeking_bounded_is_the_authors_risk_seeking_1():
    # Authors' code (train_kto_sd_v1.5.py, halo "risk_seeking_1"): h = -s * logsigmoid(-beta_K * g), with
    # s * beta_K * g = u, i.e. U(u) = -s log sigmoid(-s u): softplus(u) if desirable, log sigmoid(u) if not.
    beta = 20.0
    err_ref = [0.30, 0.52, 0.11, 0.26]
    r = r_longhand(KTO_ERR, err_ref, beta)
    losses = []
    for r_i, y in zip(r, KTO_LABELS):
        s = 1.0 if y else -1.0
        u = s * r_i  # reference point "zero"
        losses.append(1.0 - (-s * math.log(1.0 / (1.0 + math.exp(s * u)))))
    out = kto_loss(
        t(KTO_ERR), t(err_ref), torch.tensor(KTO_LABELS), beta=beta, utility="risk_seeking_bounded",
        reference_point="zero",
    )
    close(out.loss, mean(losses))


def test_golden_kto_defaults_are_kahneman_tversky_batch_beta_5000():
    err, err_ref = [0.3000, 0.5200, 0.1100], [0.3001, 0.5199, 0.1102]
    labels = [True, False, False]
    r = r_longhand(err, err_ref, 5000.0)
    z = max(mean(r), 0.0)
    expected = mean(1.0 - sigmoid((1.0 if y else -1.0) * (r_i - z)) for r_i, y in zip(r, labels))
    close(kto_loss(t(err), t(err_ref), torch.tensor(labels)).loss, expected)


# ----------------------------------------------------------------------------------------------------------
# Diff-contrast (Diff-contrast eq. 9 and Sec. 2.1; LLM-RPO variant: its appendix B.3 eq. 15)
# ----------------------------------------------------------------------------------------------------------
EMB_W = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0]]
EMB_L = [[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]]
CONTRAST_ERR = dict(
    err_w=[0.30, 0.52, 0.11], err_l=[0.41, 0.50, 0.20], ref_err_w=[0.31, 0.50, 0.12], ref_err_l=[0.40, 0.53, 0.19]
)


def _weights_longhand(emb_w, emb_l, tau):
    """W~_ij = exp(-(1 - cos(f_w_i, f_l_j)) / tau), each row normalised to sum 1."""
    rows = []
    for a in emb_w:
        raw = []
        for b in emb_l:
            cos = sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
            raw.append(math.exp(-(1.0 - cos) / tau))
        rows.append([w / sum(raw) for w in raw])
    return rows


@pytest.mark.parametrize("tau", [0.01, 0.5, 5.0])
def test_golden_contrast_weights(tau):
    out = contrast_weights(t(EMB_W), t(EMB_L), tau=tau)
    assert out.shape == (3, 3)
    close(out, _weights_longhand(EMB_W, EMB_L, tau))


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_golden_contrast_weights_outside(tau):
    # Eq. (9): loss = mean_i sum_j W_ij * softplus(-(r_w_i - r_l_j)); the weight multiplies OUTSIDE log-sigmoid.
    beta = 40.0
    r_w = r_longhand(CONTRAST_ERR["err_w"], CONTRAST_ERR["ref_err_w"], beta)
    r_l = r_longhand(CONTRAST_ERR["err_l"], CONTRAST_ERR["ref_err_l"], beta)
    W = _weights_longhand(EMB_W, EMB_L, tau)
    expected = mean(sum(W[i][j] * softplus(-(r_w[i] - r_l[j])) for j in range(3)) for i in range(3))
    args = [t(CONTRAST_ERR[k]) for k in ("err_w", "err_l", "ref_err_w", "ref_err_l")]
    out = contrast_loss(*args, t(EMB_W), t(EMB_L), beta=beta, tau=tau)
    close(out.loss, expected)


def test_golden_contrast_default_is_weights_outside():
    beta, tau = 40.0, 0.5
    args = [t(CONTRAST_ERR[k]) for k in ("err_w", "err_l", "ref_err_w", "ref_err_l")]
    default = contrast_loss(*args, t(EMB_W), t(EMB_L), beta=beta, tau=tau)
    outside = contrast_loss(*args, t(EMB_W), t(EMB_L), beta=beta, tau=tau, weights_inside=False)
    close(default.loss, float(outside.loss))


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_golden_contrast_weights_inside(tau):
    # LLM-RPO form (Diff-contrast appendix B.3 eq. 15): -(1/(M N)) sum_i sum_j log sigmoid(W_ij * (r_w_i - r_l_j)).
    beta = 40.0
    r_w = r_longhand(CONTRAST_ERR["err_w"], CONTRAST_ERR["ref_err_w"], beta)
    r_l = r_longhand(CONTRAST_ERR["err_l"], CONTRAST_ERR["ref_err_l"], beta)
    W = _weights_longhand(EMB_W, EMB_L, tau)
    expected = sum(softplus(-W[i][j] * (r_w[i] - r_l[j])) for i in range(3) for j in range(3)) / 9.0
    args = [t(CONTRAST_ERR[k]) for k in ("err_w", "err_l", "ref_err_w", "ref_err_l")]
    out = contrast_loss(*args, t(EMB_W), t(EMB_L), beta=beta, tau=tau, weights_inside=True)
    close(out.loss, expected)


# ----------------------------------------------------------------------------------------------------------
# DSPO (DSPO eq. 13; DSPO-E eq. 45; SDXL form eq. 46-47)
# ----------------------------------------------------------------------------------------------------------
DSPO_CASE = dict(
    pred_w=[[0.5, -0.2, 0.1], [1.0, 0.3, -0.7]],
    ref_pred_w=[[0.4, -0.1, 0.2], [1.1, 0.2, -0.5]],
    target_w=[[0.3, 0.0, 0.0], [0.9, 0.6, -0.6]],
    err_l=[0.35, 0.20],
    ref_err_l=[0.30, 0.28],
)


def _dspo_margin(c, beta):
    err_w = [mean((p - q) ** 2 for p, q in zip(ps, qs)) for ps, qs in zip(c["pred_w"], c["target_w"])]
    ref_err_w = [mean((p - q) ** 2 for p, q in zip(ps, qs)) for ps, qs in zip(c["ref_pred_w"], c["target_w"])]
    r_w = r_longhand(err_w, ref_err_w, beta)
    r_l = r_longhand(c["err_l"], c["ref_err_l"], beta)
    return [a - b for a, b in zip(r_w, r_l)]  # I = r_w - r_l, the DPO margin


def _dspo_longhand(variant, beta, gamma):
    c = DSPO_CASE
    margin = _dspo_margin(c, beta)
    if variant == "dspo_ref":  # eq. (47): || 1 - sigmoid(I) ||^2
        return mean((1.0 - sigmoid(m)) ** 2 for m in margin)
    terms = []
    for i, m in enumerate(margin):
        # eq. (13): coefficient lambda*gamma*(1 - sigmoid(I)); eq. (45): gamma*beta with no sigmoid
        coef = beta * gamma * (1.0 - sigmoid(m)) if variant == "dspo" else gamma * beta
        for p, q, p_ref in zip(c["pred_w"][i], c["target_w"][i], c["ref_pred_w"][i]):
            terms.append(((p - q) - coef * (p - p_ref)) ** 2)
    return mean(terms)


@pytest.mark.parametrize("variant", ["dspo", "dspo_e", "dspo_ref"])
@pytest.mark.parametrize("beta,gamma", [(0.8, 0.7), (5.0, 1.0)])
def test_golden_dspo(variant, beta, gamma):
    c = DSPO_CASE
    out = dspo_loss(
        t(c["pred_w"]), t(c["ref_pred_w"]), t(c["target_w"]), t(c["err_l"]), t(c["ref_err_l"]),
        beta=beta, gamma=gamma, variant=variant,
    )
    close(out.loss, _dspo_longhand(variant, beta, gamma))


def test_golden_dspo_defaults_are_variant_dspo_beta_0001_gamma_1():
    c = DSPO_CASE
    out = dspo_loss(t(c["pred_w"]), t(c["ref_pred_w"]), t(c["target_w"]), t(c["err_l"]), t(c["ref_err_l"]))
    close(out.loss, _dspo_longhand("dspo", 0.001, 1.0))


# The authors' SDXL branch (huaishengzhu/DSPO train.py with --sdxl), transcribed element by element: with
# pred2 = pred_w - ref_pred_w, if mean_i mean_d pred2^2 >= threshold the loss is mean_{i,d} ((1 - sigmoid(I_i)) pred2)^2,
# else mean_i mean_d (1 - sigmoid(I_i))^2 (the gate broadcast over the sample, as that code does).
DSPO_FAR_CASE = dict(DSPO_CASE, ref_pred_w=[[0.0, 0.3, -0.4], [1.5, -0.2, -0.2]])  # every |pred2| = 0.5: drift 0.25


def _dspo_sdxl_longhand(c, beta, threshold):
    margin = _dspo_margin(c, beta)
    pred2 = [[p - r for p, r in zip(ps, rs)] for ps, rs in zip(c["pred_w"], c["ref_pred_w"])]
    if mean(mean(x**2 for x in row) for row in pred2) >= threshold:
        return mean(((1.0 - sigmoid(m)) * x) ** 2 for m, row in zip(margin, pred2) for x in row)
    return mean((1.0 - sigmoid(m)) ** 2 for m, row in zip(margin, pred2) for _ in row)


@pytest.mark.parametrize(
    "case,threshold,above",
    [
        ("near", 0.1, False),  # drift mean 0.015 < 0.1: Eq. (47)
        ("near", 0.01, True),  # 0.015 >= 0.01: the Eq. (46) line
        ("near", 0.012, True),  # the batch mean decides for every sample: winner 0's own drift 0.01 is below 0.012
        ("far", 0.1, True),  # drift mean 0.25 >= 0.1
        ("far", 0.5, False),
    ],
)
@pytest.mark.parametrize("beta", [0.8, 5.0, 50.0])
def test_golden_dspo_sdxl(case, threshold, above, beta):
    c = DSPO_CASE if case == "near" else DSPO_FAR_CASE
    out = dspo_loss(
        t(c["pred_w"]), t(c["ref_pred_w"]), t(c["target_w"]), t(c["err_l"]), t(c["ref_err_l"]),
        beta=beta, variant="dspo_sdxl", threshold=threshold,
    )
    close(out.loss, _dspo_sdxl_longhand(c, beta, threshold))
    assert out.metrics["above_threshold"] == float(above)
    if not above:  # below the threshold the code's loss is Eq. (47), the dspo_ref variant
        close(out.loss, mean((1.0 - sigmoid(m)) ** 2 for m in _dspo_margin(c, beta)))


def test_golden_dspo_sdxl_default_threshold_is_the_authors_0_1():
    for c, above in ((DSPO_CASE, False), (DSPO_FAR_CASE, True)):
        args = [t(c[k]) for k in ("pred_w", "ref_pred_w", "target_w", "err_l", "ref_err_l")]
        out = dspo_loss(*args, beta=5.0, variant="dspo_sdxl")
        close(out.loss, _dspo_sdxl_longhand(c, 5.0, 0.1))
        assert out.metrics["above_threshold"] == float(above)


# ----------------------------------------------------------------------------------------------------------
# SPO (SPO Sec. 4.4): ratio = clamp(exp(logp - ref_logp), 1 - clip, 1 + clip),
# loss = mean softplus(-beta (log ratio_w - log ratio_l))
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta,clip", [(10.0, 0.1), (3.0, 0.25)])
def test_golden_spo(beta, clip):
    logp_w, ref_logp_w = [-1.00, -2.00, -0.50], [-1.05, -1.90, -0.70]  # log-ratios 0.05, -0.10, 0.20 (clamped)
    logp_l, ref_logp_l = [-1.20, -0.80, -3.00], [-1.10, -0.85, -2.70]  # log-ratios -0.10, 0.05, -0.30 (clamped)

    def log_ratio(lp, ref):
        ratio = min(max(math.exp(lp - ref), 1.0 - clip), 1.0 + clip)
        return math.log(ratio)

    expected = mean(
        softplus(-beta * (log_ratio(a, b) - log_ratio(c, d)))
        for a, b, c, d in zip(logp_w, ref_logp_w, logp_l, ref_logp_l)
    )
    out = spo_loss(t(logp_w), t(ref_logp_w), t(logp_l), t(ref_logp_l), beta=beta, clip=clip)
    close(out.loss, expected)


def test_golden_spo_defaults_are_beta_10_clip_01():
    logp_w, ref_logp_w, logp_l, ref_logp_l = [-1.0, -2.0], [-1.05, -1.90], [-1.2, -0.8], [-1.1, -0.85]
    expected = mean(
        softplus(-10.0 * (math.log(min(max(math.exp(a - b), 0.9), 1.1)) - math.log(min(max(math.exp(c - d), 0.9), 1.1))))
        for a, b, c, d in zip(logp_w, ref_logp_w, logp_l, ref_logp_l)
    )
    close(spo_loss(t(logp_w), t(ref_logp_w), t(logp_l), t(ref_logp_l)).loss, expected)
