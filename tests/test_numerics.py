"""docs/conventions.md I10: every loss is finite (value, gradients, metrics) for errors up to 1e4 and beta up to
1e5 in float32 and bfloat16, and passes torch.autograd.gradcheck in float64. Plus the saturated asymptotes:
a stable log-sigmoid gives exactly |m| for a hopeless margin m, where a naive log(sigmoid(m)) gives inf.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from minipref import (
    bce_loss,
    contrast_loss,
    contrast_weights,
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
from tests.core_helpers import F64, generator, seeds, settings

B = 4
LABELS = torch.tensor([True, False, True, False])


# ----------------------------------------------------------------------------------------------------------
# Each case: build(gen, dtype, max_err) -> (leaf inputs that need gradients, call(beta) -> LossOutput)
# ----------------------------------------------------------------------------------------------------------
def _errors(gen, dtype, max_err, n=B):
    """Errors in [0, max_err] with both extremes present: 0 and max_err exactly."""
    e = torch.rand(n, generator=gen, dtype=F64) * max_err
    e[0], e[-1] = 0.0, max_err
    return e.to(dtype)


def _pair(gen, dtype, max_err):
    err_w, err_l = _errors(gen, dtype, max_err), _errors(gen, dtype, max_err).flip(0)  # saturate both ways
    ref_w, ref_l = _errors(gen, dtype, max_err).flip(0), _errors(gen, dtype, max_err)
    return err_w.requires_grad_(), err_l.requires_grad_(), ref_w, ref_l


def _emb(gen, dtype, n=B):
    return torch.randn(n, 8, generator=gen, dtype=F64).to(dtype)


def build_sft(gen, dtype, max_err):
    err = _errors(gen, dtype, max_err).requires_grad_()
    return [err], lambda beta: sft_loss(err)


def build_bce(gen, dtype, max_err):
    err = _errors(gen, dtype, max_err).requires_grad_()
    return [err], lambda beta: bce_loss(err, LABELS, beta=beta)


def build_bce_ref(gen, dtype, max_err):
    err, ref = _errors(gen, dtype, max_err).requires_grad_(), _errors(gen, dtype, max_err).flip(0)
    return [err], lambda beta: bce_loss(err, LABELS, err_ref=ref, beta=beta)


def build_dpo(gen, dtype, max_err):
    err_w, err_l, ref_w, ref_l = _pair(gen, dtype, max_err)
    return [err_w, err_l], lambda beta: dpo_loss(err_w, err_l, ref_w, ref_l, beta=beta)


def build_spin(gen, dtype, max_err):
    err_w, err_l, ref_w, ref_l = _pair(gen, dtype, max_err)
    return [err_w, err_l], lambda beta: spin_loss(err_w, err_l, ref_w, ref_l, beta=beta)


def make_build_kto(utility, reference_point):
    def build(gen, dtype, max_err):
        err, ref = _errors(gen, dtype, max_err).requires_grad_(), _errors(gen, dtype, max_err).flip(0)
        return [err], lambda beta: kto_loss(
            err, ref, LABELS, beta=beta, utility=utility, reference_point=reference_point
        )

    return build


def make_build_contrast(tau, weights_inside):
    def build(gen, dtype, max_err):
        err_w, err_l, ref_w, ref_l = _pair(gen, dtype, max_err)
        emb_w, emb_l = _emb(gen, dtype), _emb(gen, dtype)
        return [err_w, err_l], lambda beta: contrast_loss(
            err_w, err_l, ref_w, ref_l, emb_w, emb_l, beta=beta, tau=tau, weights_inside=weights_inside
        )

    return build


def make_build_dspo(variant, threshold=0.1):
    def build(gen, dtype, max_err):
        scale = math.sqrt(max_err)  # so that per-sample errors reach max_err
        target = torch.randn(B, 2, 3, generator=gen, dtype=F64)
        pred = (target + scale * torch.randn(B, 2, 3, generator=gen, dtype=F64)).to(dtype).requires_grad_()
        ref_pred = (target + scale * torch.randn(B, 2, 3, generator=gen, dtype=F64)).to(dtype)
        err_l, ref_l = _errors(gen, dtype, max_err).requires_grad_(), _errors(gen, dtype, max_err).flip(0)
        return [pred, err_l], lambda beta: dspo_loss(
            pred, ref_pred, target.to(dtype), err_l, ref_l, beta=beta, variant=variant, threshold=threshold
        )

    return build


def build_spo(gen, dtype, max_err):
    # Log-probabilities of magnitude up to max_err: log-ratios far outside the clip range, both signs.
    logp_w, logp_l = (-_errors(gen, dtype, max_err)).requires_grad_(), (-_errors(gen, dtype, max_err)).requires_grad_()
    ref_w, ref_l = -_errors(gen, dtype, max_err).flip(0), -_errors(gen, dtype, max_err).flip(0)
    return [logp_w, logp_l], lambda beta: spo_loss(logp_w, ref_w, logp_l, ref_l, beta=beta)


BUILDERS = {
    "sft": build_sft,
    "bce": build_bce,
    "bce_with_ref": build_bce_ref,
    "dpo": build_dpo,
    "spin": build_spin,
    **{
        f"kto-{u}-{p}": make_build_kto(u, p)
        for u in ("kahneman_tversky", "loss_averse", "risk_seeking")
        for p in ("batch", "zero")
    },
    "contrast-outside-tau0.01": make_build_contrast(0.01, False),
    "contrast-outside-tau0.5": make_build_contrast(0.5, False),
    "contrast-inside-tau0.01": make_build_contrast(0.01, True),
    **{f"dspo-{v}": make_build_dspo(v) for v in ("dspo", "dspo_e", "dspo_ref")},
    # the authors' SDXL switch on both of its lines: drift above any threshold here, and below a huge one
    "dspo-dspo_sdxl-above": make_build_dspo("dspo_sdxl", threshold=0.0),
    "dspo-dspo_sdxl-below": make_build_dspo("dspo_sdxl", threshold=1e30),
    "spo": build_spo,
}

FINITE = settings(max_examples=12, deadline=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(BUILDERS))
@FINITE
@given(seed=seeds, log_err=st.floats(-3.0, 4.0), log_beta=st.floats(-3.0, 5.0))
@example(seed=0, log_err=4.0, log_beta=5.0)  # the corner I10 names: errors 1e4, beta 1e5
def test_every_loss_is_finite_for_large_errors_and_beta(name, dtype, seed, log_err, log_beta):
    inputs, call = BUILDERS[name](generator(seed), dtype, 10.0**log_err)
    out = call(10.0**log_beta)
    assert out.loss.dim() == 0
    assert bool(torch.isfinite(out.loss)), f"{name}: loss {out.loss} not finite"
    grads = torch.autograd.grad(out.loss, inputs, allow_unused=True)
    for i, g in enumerate(grads):
        assert g is None or bool(torch.isfinite(g).all()), f"{name}: gradient of input {i} has NaN/Inf: {g}"
    for key, value in out.metrics.items():
        assert math.isfinite(value), f"{name}: metric {key} = {value}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tau", [1e-3, 0.01, 0.5])
def test_contrast_weights_finite_in_low_precision_for_far_apart_embeddings(dtype, tau):
    # Each winner points away from every loser (cosine -1 to -0.9): exp(-(1 - cos)/tau) underflows unless the
    # implementation normalises stably (a softmax), and a row of zeros would divide 0 by 0.
    base = torch.randn(B, 8, generator=generator(3), dtype=F64)
    emb_w = base.to(dtype)
    emb_l = (-base + 0.1 * torch.randn(B, 8, generator=generator(4), dtype=F64)).to(dtype)
    weights = contrast_weights(emb_w, emb_l, tau=tau)
    assert bool(torch.isfinite(weights).all())
    torch.testing.assert_close(weights.double().sum(dim=1), torch.ones(B, dtype=F64), atol=2e-2, rtol=0)


def test_per_sample_mse_and_gaussian_log_prob_finite_in_low_precision():
    for dtype in (torch.float32, torch.bfloat16):
        target = torch.randn(B, 2, 3, generator=generator(1), dtype=F64)
        pred = (target + 100.0 * torch.randn(B, 2, 3, generator=generator(2), dtype=F64)).to(dtype).requires_grad_()
        err = per_sample_mse(pred, target.to(dtype))
        logp = gaussian_step_log_prob(pred, target.to(dtype), torch.tensor(0.01, dtype=dtype))
        (g,) = torch.autograd.grad(err.sum() + logp.sum(), [pred])
        assert bool(torch.isfinite(err).all() and torch.isfinite(logp).all() and torch.isfinite(g).all())


# ----------------------------------------------------------------------------------------------------------
# Saturation: the exact asymptotes of a numerically stable log-sigmoid.
# ----------------------------------------------------------------------------------------------------------
def test_saturated_losses_have_exact_asymptotes():
    zero, big = torch.tensor([0.0], dtype=F64), torch.tensor([1.0], dtype=F64)
    beta = 2e6  # margin = -(beta/2)(1 - 0) = -1e6 for a winner that got much worse
    assert float(dpo_loss(big, zero, zero, zero, beta=beta).loss) == pytest.approx(1e6, rel=1e-12)
    assert float(dpo_loss(zero, big, zero, zero, beta=beta).loss) == pytest.approx(0.0, abs=1e-12)
    # loss-averse KTO, desirable, z = 0: 1 - logsigmoid(-1e6) = 1 + 1e6
    kto = kto_loss(big, zero, torch.tensor([True]), beta=beta, utility="loss_averse", reference_point="zero")
    assert float(kto.loss) == pytest.approx(1.0 + 1e6, rel=1e-12)
    # risk-seeking: 1 + logsigmoid(-u) = 1 + logsigmoid(1e6) -> 1
    kto = kto_loss(big, zero, torch.tensor([True]), beta=beta, utility="risk_seeking", reference_point="zero")
    assert float(kto.loss) == pytest.approx(1.0, abs=1e-12)
    # BCE, reference-free: logit -beta * err = -2e6 with label 1 -> loss 2e6
    assert float(bce_loss(big, torch.tensor([True]), beta=beta).loss) == pytest.approx(2e6, rel=1e-12)
    # SPO far outside the clip: log-ratios pinned at log(0.9) and log(1.1)
    spo = spo_loss(torch.tensor([-1e4], dtype=F64), zero, zero, torch.tensor([-1e4], dtype=F64), beta=10.0, clip=0.1)
    assert float(spo.loss) == pytest.approx(math.log1p(math.exp(10.0 * (math.log(1.1) - math.log(0.9)))), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# gradcheck in float64 for every loss (inputs away from kinks: clip boundaries, the clamp of the KTO batch
# reference point, which is detached on purpose and must stay at its clamped value 0 here).
# ----------------------------------------------------------------------------------------------------------
def _x(values):
    return torch.tensor(values, dtype=F64, requires_grad=True)


ERR_W, ERR_L = [0.31, 0.72, 0.15, 0.48], [0.55, 0.20, 0.38, 0.61]
REF_W, REF_L = [0.29, 0.80, 0.11, 0.50], [0.50, 0.26, 0.40, 0.55]
EMB_W = torch.randn(4, 6, generator=generator(11), dtype=F64)
EMB_L = torch.randn(4, 6, generator=generator(12), dtype=F64)
PRED = torch.randn(4, 2, 3, generator=generator(13), dtype=F64)
TARGET = torch.randn(4, 2, 3, generator=generator(14), dtype=F64)
REF_PRED = PRED + 0.1 * torch.randn(4, 2, 3, generator=generator(15), dtype=F64)

GRADCHECKS = {
    "per_sample_mse": (lambda p, q: per_sample_mse(p, q), [PRED, TARGET]),
    "implicit_reward": (lambda a, b: implicit_reward(a, b, 3.0), [ERR_W, REF_W]),
    "gaussian_step_log_prob": (
        lambda x, m, s: gaussian_step_log_prob(x, m, s),
        [PRED, TARGET, 0.5 + torch.rand(4, 1, 1, generator=generator(16), dtype=F64)],
    ),
    "sft": (lambda e: sft_loss(e, weight=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)).loss, [ERR_W]),
    "bce": (lambda e: bce_loss(e, LABELS, beta=2.0).loss, [ERR_W]),
    "bce_with_ref": (lambda e, r: bce_loss(e, LABELS, err_ref=r, beta=3.0).loss, [ERR_W, REF_W]),
    "dpo": (lambda a, b, c, d: dpo_loss(a, b, c, d, beta=7.0).loss, [ERR_W, ERR_L, REF_W, REF_L]),
    "spin": (lambda a, b, c, d: spin_loss(a, b, c, d, beta=7.0).loss, [ERR_W, ERR_L, REF_W, REF_L]),
    **{
        f"kto-{u}-{p}": (
            # err_ref 0.1 below err_model: every r < 0, so the batch point is clamped to 0 and locally constant
            lambda e, r, u=u, p=p: kto_loss(e, r, LABELS, beta=5.0, utility=u, reference_point=p,
                                            lambda_d=0.8, lambda_u=1.2).loss,
            [ERR_W, [v - 0.1 for v in ERR_W]],
        )
        for u in ("kahneman_tversky", "loss_averse", "risk_seeking")
        for p in ("batch", "zero")
    },
    **{
        f"kto-{u}-tensor": (
            lambda e, r, z, u=u: kto_loss(e, r, LABELS, beta=5.0, utility=u, reference_point=z).loss,
            [ERR_W, REF_W, [0.05, -0.1, 0.2, 0.0]],
        )
        for u in ("kahneman_tversky", "loss_averse", "risk_seeking")
    },
    **{
        f"contrast-inside={inside}": (
            lambda a, b, c, d, inside=inside: contrast_loss(
                a, b, c, d, EMB_W, EMB_L, beta=7.0, tau=0.5, weights_inside=inside
            ).loss,
            [ERR_W, ERR_L, REF_W, REF_L],
        )
        for inside in (False, True)
    },
    **{
        f"dspo-{v}": (
            lambda p, rp, t, el, rl, v=v: dspo_loss(p, rp, t, el, rl, beta=2.0, gamma=0.7, variant=v).loss,
            [PRED, REF_PRED, TARGET, ERR_L, REF_L],
        )
        for v in ("dspo", "dspo_e", "dspo_ref")
    },
    # REF_PRED is PRED + 0.1 noise, so the drift is ~0.01 per element: threshold 0.001 takes the Eq. (46) line
    **{
        f"dspo-dspo_sdxl-threshold{th}": (
            lambda p, rp, t, el, rl, th=th: dspo_loss(p, rp, t, el, rl, beta=2.0, variant="dspo_sdxl", threshold=th).loss,
            [PRED, REF_PRED, TARGET, ERR_L, REF_L],
        )
        for th in (0.001, 0.1)
    },
    # log-ratios within +-0.05, well inside the clip range (log 0.9, log 1.1)
    "spo": (
        lambda a, b, c, d: spo_loss(a, b, c, d, beta=10.0, clip=0.1).loss,
        [[-1.00, -2.0, -0.5, -3.0], [-1.03, -1.98, -0.54, -3.01], [-1.2, -0.8, -3.0, -0.1], [-1.18, -0.84, -3.02, -0.15]],
    ),
}


@pytest.mark.parametrize("name", list(GRADCHECKS))
def test_gradcheck_float64(name):
    fn, raw = GRADCHECKS[name]
    inputs = tuple(
        (r.clone() if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=F64)).requires_grad_(True) for r in raw
    )
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
