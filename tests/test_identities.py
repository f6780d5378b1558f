"""The identities I1-I9 of docs/conventions.md §8, as named property tests in float64.

Each identity is checked twice: on random tensors (gradients with respect to the error tensors) and through a
tiny random eps-model with a frozen copy as the reference (gradients with respect to the model parameters, by
real autograd). I10 (finiteness, gradcheck) lives in test_numerics.py.

Notation (docs/conventions.md §2): r = -(beta/2)(err_model - err_ref), DPO margin m = r_w - r_l,
L_DPO = mean softplus(-m). The expected sides below are written longhand from those formulas; they never call
the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import minipref
from minipref import (
    bce_loss,
    contrast_loss,
    contrast_weights,
    dpo_loss,
    dspo_loss,
    kto_loss,
    per_sample_mse,
    sft_loss,
    spin_loss,
    spo_loss,
)
from tests.core_helpers import (
    F64,
    FAST,
    MODEL,
    SAMPLE_SHAPE,
    assert_close,
    assert_grads_close,
    batch_sizes,
    betas,
    binary_errors,
    generator,
    grad_norm,
    input_grads,
    leaf,
    longhand_mse,
    make_models,
    pair_errors,
    pair_forward,
    param_grads,
    rand_errors,
    seeds,
    small_betas,
)

LOG2 = math.log(2.0)
UTILITY_NAMES = ["kahneman_tversky", "loss_averse", "risk_seeking"]


def reward(err_model, err_ref, beta):
    """docs/conventions.md §2, longhand: r = -(beta/2)(err_model - err_ref)."""
    return -(beta / 2.0) * (err_model - err_ref)


def random_labels(gen: torch.Generator, batch: int) -> torch.Tensor:
    return torch.rand(batch, generator=gen) < 0.5


lambdas = st.floats(min_value=0.1, max_value=10.0)


# ----------------------------------------------------------------------------------------------------------
# I1. DPO at err_model == err_ref: loss = log 2, implicit_acc = 0.5, grad = (beta/4)(grad err_w - grad err_l)
# ----------------------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_dpo_at_reference_is_log2_and_quarter_beta_sft_gradient(seed, batch, beta):
    gen = generator(seed)
    err_w, err_l = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    out = dpo_loss(err_w, err_l, err_w.detach().clone(), err_l.detach().clone(), beta=beta)

    assert_close(out.loss, LOG2)
    assert out.metrics["implicit_acc"] == 0.5
    grad_w, grad_l = input_grads(out.loss, [err_w, err_l])
    # d/d err_w of (beta/4) mean(err_w) is beta / (4B) per sample; minus that for the loser.
    assert_close(grad_w, torch.full((batch,), beta / (4 * batch), dtype=F64))
    assert_close(grad_l, torch.full((batch,), -beta / (4 * batch), dtype=F64))


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_dpo_at_reference_is_log2_and_quarter_beta_sft_gradient_through_tiny_model(seed, batch, beta):
    model, reference = make_models(seed)
    err_w, err_l, ref_err_w, ref_err_l = pair_errors(model, reference, seed, batch)
    assert torch.equal(err_w.detach(), ref_err_w) and torch.equal(err_l.detach(), ref_err_l)

    out = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
    assert_close(out.loss, LOG2)
    assert out.metrics["implicit_acc"] == 0.5
    expected = param_grads((beta / 4.0) * (err_w.mean() - err_l.mean()), model)
    assert grad_norm(expected) > 0
    assert_grads_close(param_grads(out.loss, model), expected, scale=beta)


@FAST
@given(
    seed=seeds,
    n_pos=st.integers(0, 4),
    n_neg=st.integers(0, 4),
    n_tie=st.integers(0, 4),
    beta=betas,
)
def test_dpo_implicit_accuracy_counts_ties_as_half(seed, n_pos, n_neg, n_tie, beta):
    n = n_pos + n_neg + n_tie
    assume(n > 0)
    gen = generator(seed)
    ref_err_w, ref_err_l = rand_errors(gen, n), rand_errors(gen, n)
    # Winner error moved down (positive margin), up (negative margin) or not at all (a tie: margin exactly 0).
    step = 0.1 + torch.rand(n, generator=gen, dtype=F64)
    sign = torch.tensor([-1.0] * n_pos + [1.0] * n_neg + [0.0] * n_tie, dtype=F64)
    err_w = ref_err_w + sign * step
    out = dpo_loss(err_w, ref_err_l.clone(), ref_err_w, ref_err_l, beta=beta)
    # metrics are logged numbers: float32 rounding (~1e-7) is fine, a tie counted as 0 or 1 is not
    assert out.metrics["implicit_acc"] == pytest.approx((n_pos + 0.5 * n_tie) / n, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# I2. DPO swap: L(-m) - L(m) = m; shifting both rewards by a constant changes nothing.
# ----------------------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_dpo_swap_changes_loss_by_the_margin(seed, batch, beta):
    gen = generator(seed)
    err_w, err_l = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    ref_err_w, ref_err_l = rand_errors(gen, batch), rand_errors(gen, batch)
    margin = reward(err_w, ref_err_w, beta) - reward(err_l, ref_err_l, beta)  # (B,)

    loss = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta).loss
    swapped = dpo_loss(err_l, err_w, ref_err_l, ref_err_w, beta=beta).loss
    # softplus(m) - softplus(-m) = m, averaged over the batch.
    assert_close(swapped - loss, margin.mean(), atol=1e-12 * max(1.0, beta))
    assert_grads_close(
        input_grads(swapped - loss, [err_w, err_l]), input_grads(margin.mean(), [err_w, err_l]), scale=beta
    )


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_dpo_swap_changes_loss_by_the_margin_through_tiny_model(seed, batch, beta):
    model, reference = make_models(seed, perturb=0.05)
    err_w, err_l, ref_err_w, ref_err_l = pair_errors(model, reference, seed, batch)
    margin = reward(err_w, ref_err_w, beta) - reward(err_l, ref_err_l, beta)

    diff = dpo_loss(err_l, err_w, ref_err_l, ref_err_w, beta=beta).loss - dpo_loss(
        err_w, err_l, ref_err_w, ref_err_l, beta=beta
    ).loss
    assert_close(diff, margin.mean(), atol=1e-12 * max(1.0, beta))
    assert_grads_close(param_grads(diff, model), param_grads(margin.mean(), model), scale=beta)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, shift_ref=st.booleans())
def test_dpo_shifting_both_rewards_by_a_constant_changes_nothing(seed, batch, beta, shift_ref):
    gen = generator(seed)
    err_w, err_l = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    ref_err_w, ref_err_l = rand_errors(gen, batch), rand_errors(gen, batch)
    delta = torch.randn(batch, generator=gen, dtype=F64)  # one constant per pair, added to r_w and r_l alike

    base = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
    if shift_ref:  # r = -(beta/2)(err - ref): raising both reference errors by delta raises both rewards
        shifted = dpo_loss(err_w, err_l, ref_err_w + delta, ref_err_l + delta, beta=beta)
    else:  # raising both model errors by delta lowers both rewards by (beta/2) delta
        shifted = dpo_loss(err_w + delta, err_l + delta, ref_err_w, ref_err_l, beta=beta)

    assert_close(shifted.loss, base.loss, rtol=1e-9, atol=1e-12 * max(1.0, beta))
    assert shifted.metrics["margin"] == pytest.approx(base.metrics["margin"], rel=1e-6, abs=1e-6)
    assert_grads_close(
        input_grads(shifted.loss, [err_w, err_l]), input_grads(base.loss, [err_w, err_l]), scale=beta, rtol=1e-7
    )


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=small_betas)
def test_dpo_shifting_both_rewards_by_a_constant_changes_nothing_through_tiny_model(seed, batch, beta):
    model, reference = make_models(seed, perturb=0.05)
    err_w, err_l, ref_err_w, ref_err_l = pair_errors(model, reference, seed, batch)
    delta = torch.randn(batch, generator=generator(seed + 9), dtype=F64)
    base = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta).loss
    shifted = dpo_loss(err_w + delta, err_l + delta, ref_err_w, ref_err_l, beta=beta).loss
    assert_close(shifted, base)
    assert_grads_close(param_grads(shifted, model), param_grads(base, model), rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# I3. KTO -> DPO (Diffusion-KTO Sec. 4.2.1): loss_averse, desirable winners only, reference point r_l (kept in
#    the graph): kto_loss == lambda_d * (1 + dpo_loss), in value and in gradient (lambda_d = 1: kto - 1 == dpo).
# ----------------------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_kto_loss_averse_with_loser_reference_equals_dpo(seed, batch, beta):
    gen = generator(seed)
    err_w, err_l = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    ref_err_w, ref_err_l = rand_errors(gen, batch), rand_errors(gen, batch)
    r_l = reward(err_l, ref_err_l, beta)  # NOT detached: the loser's gradient flows through the reference point

    kto = kto_loss(
        err_w, ref_err_w, torch.ones(batch, dtype=torch.bool), beta=beta, utility="loss_averse", reference_point=r_l
    )
    dpo = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
    assert_close(kto.loss - 1.0, dpo.loss, atol=1e-12 * max(1.0, beta))
    grads_dpo = input_grads(dpo.loss, [err_w, err_l])
    margin = (reward(err_w, ref_err_w, beta) - reward(err_l, ref_err_l, beta)).detach()
    unsaturated = margin.abs() < 500  # beyond that sigmoid(-m) underflows and every gradient is exactly 0
    assert bool((grads_dpo[1][unsaturated] != 0).all())  # the loser really is in play
    assert_grads_close(input_grads(kto.loss, [err_w, err_l]), grads_dpo, scale=beta)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, lambda_d=lambdas.filter(lambda x: abs(x - 1.0) > 0.05))
def test_kto_loss_averse_with_loser_reference_is_lambda_d_times_dpo_plus_lambda_d(seed, batch, beta, lambda_d):
    gen = generator(seed)
    err_w, err_l = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    ref_err_w, ref_err_l = rand_errors(gen, batch), rand_errors(gen, batch)
    r_l = reward(err_l, ref_err_l, beta)
    kto = kto_loss(
        err_w,
        ref_err_w,
        torch.ones(batch, dtype=torch.bool),
        beta=beta,
        utility="loss_averse",
        reference_point=r_l,
        lambda_d=lambda_d,
        lambda_u=3.0,  # no undesirable sample: lambda_u must not matter
    )
    dpo = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
    # lambda_d (1 - logsigmoid(m)) = lambda_d (1 + softplus(-m)): kto_loss = lambda_d (1 + dpo_loss)
    assert_close(kto.loss, lambda_d * (1.0 + dpo.loss), atol=1e-11 * max(1.0, beta))
    assert_grads_close(
        input_grads(kto.loss, [err_w, err_l]), [lambda_d * g for g in input_grads(dpo.loss, [err_w, err_l])], scale=beta
    )


def test_kto_to_dpo_identity_scales_with_lambda_d_and_is_not_kto_minus_lambda_d():
    """The identity has power: at lambda_d = 2 and theta == ref (DPO loss log 2) KTO is 2 (1 + log 2) = 3.386,
    while the lambda_d-free reading ``kto_loss - lambda_d == dpo_loss`` would predict 2 + log 2 = 2.693."""
    err = torch.tensor([0.3, 0.7, 0.2], dtype=F64)
    kto = kto_loss(err, err, torch.ones(3, dtype=torch.bool), beta=1.0, utility="loss_averse",
                   reference_point=torch.zeros(3, dtype=F64), lambda_d=2.0)
    dpo = dpo_loss(err, err, err, err, beta=1.0)
    assert_close(dpo.loss, LOG2)
    assert_close(kto.loss, 2.0 * (1.0 + LOG2))
    assert abs(float(kto.loss - 2.0 - dpo.loss)) > 0.69  # the lambda_d-free identity misses by (lambda_d - 1) * log 2


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_kto_loss_averse_with_loser_reference_equals_dpo_through_tiny_model(seed, batch, beta):
    model, reference = make_models(seed, perturb=0.05)
    err_w, err_l, ref_err_w, ref_err_l = pair_errors(model, reference, seed, batch)
    r_l = reward(err_l, ref_err_l, beta)
    kto = kto_loss(
        err_w, ref_err_w, torch.ones(batch, dtype=torch.bool), beta=beta, utility="loss_averse", reference_point=r_l
    )
    dpo = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
    assert_close(kto.loss - 1.0, dpo.loss, atol=1e-12 * max(1.0, beta))
    assert_grads_close(param_grads(kto.loss, model), param_grads(dpo.loss, model), scale=beta)


# ----------------------------------------------------------------------------------------------------------
# I4. KTO utilities.
# ----------------------------------------------------------------------------------------------------------
def _both_ways_batch(err: torch.Tensor, ref: torch.Tensor):
    """Every sample twice: once labelled desirable, once undesirable. (2B,) tensors and labels."""
    batch = err.shape[0]
    labels = torch.cat([torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)])
    return torch.cat([err, err]), torch.cat([ref, ref]), labels


@FAST
@given(
    seed=seeds,
    batch=batch_sizes,
    beta=betas,
    lam=lambdas,
    reference_point=st.sampled_from(["zero", "batch", "tensor"]),
)
def test_kto_sample_labelled_both_desirable_and_undesirable_contributes_a_constant(
    seed, batch, beta, lam, reference_point
):
    """Kahneman-Tversky utility: lam (1 - sigmoid(u)) + lam (1 - sigmoid(-u)) = lam, whatever u is."""
    gen = generator(seed)
    err = leaf(rand_errors(gen, batch))
    err_all, ref_all, labels = _both_ways_batch(err, rand_errors(gen, batch))
    point = torch.randn((), generator=gen, dtype=F64) if reference_point == "tensor" else reference_point
    out = kto_loss(
        err_all, ref_all, labels, beta=beta, utility="kahneman_tversky", reference_point=point, lambda_d=lam, lambda_u=lam
    )
    assert_close(out.loss, lam / 2.0)  # lam per pair of rows, averaged over 2B rows
    (grad,) = input_grads(out.loss, [err])
    assert_close(grad, torch.zeros_like(grad), atol=1e-12 * max(1.0, beta) * lam)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, lam=lambdas, reference_point=st.sampled_from(["zero", "tensor"]))
def test_kto_sample_labelled_both_ways_is_not_a_constant_for_loss_averse_and_risk_seeking(
    seed, batch, beta, lam, reference_point
):
    """The other half of I4: only Kahneman-Tversky makes a both-ways sample a constant. With u = r - z_ref,
    loss-averse contributes lam (2 + softplus(u) + softplus(-u)) and risk-seeking lam (2 - softplus(u) - softplus(-u))
    per sample, so d/du is +lam tanh(u/2) and -lam tanh(u/2): a gradient, of opposite signs."""
    gen = generator(seed)
    err, ref = leaf(rand_errors(gen, batch)), rand_errors(gen, batch)
    err_all, ref_all, labels = _both_ways_batch(err, ref)
    point = torch.randn((), generator=gen, dtype=F64) if reference_point == "tensor" else reference_point
    u = reward(err, ref, beta) - (point if isinstance(point, torch.Tensor) else 0.0)
    pair_sum = F.softplus(u) + F.softplus(-u)
    expected = {"loss_averse": lam * (2 + pair_sum), "risk_seeking": lam * (2 - pair_sum)}
    for utility, sign in (("loss_averse", 1.0), ("risk_seeking", -1.0)):
        out = kto_loss(err_all, ref_all, labels, beta=beta, utility=utility, reference_point=point, lambda_d=lam,
                       lambda_u=lam)
        assert_close(out.loss, expected[utility].sum() / (2 * batch), atol=1e-12 * max(1.0, beta) * lam)
        (grad,) = input_grads(out.loss, [err])
        # d/d err_i = (1 / 2B) * sign * lam * tanh(u_i / 2) * du/derr, with du/derr = -beta/2
        longhand = sign * lam * torch.tanh(u.detach() / 2) * (-beta / 2) / (2 * batch)
        assert_close(grad, longhand, atol=1e-12 * max(1.0, beta) * lam)
    if float(u.detach().abs().max()) > 1e-3:
        assert float(grad.abs().max()) > 0.0  # not a constant: a both-ways sample still pulls the model


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas, reference_point=st.sampled_from(["zero", "batch"]))
def test_kto_sample_labelled_both_ways_contributes_a_constant_through_tiny_model(seed, batch, beta, reference_point):
    model, reference = make_models(seed, perturb=0.05)
    err, ref = binary_errors(model, reference, seed, batch)
    err_all, ref_all, labels = _both_ways_batch(err, ref)
    out = kto_loss(err_all, ref_all, labels, beta=beta, utility="kahneman_tversky", reference_point=reference_point)
    assert_close(out.loss, 0.5)
    grads = param_grads(out.loss, model)
    assert_grads_close(grads, [torch.zeros_like(g) for g in grads], scale=beta)


@FAST
@given(
    seed=seeds,
    batch=batch_sizes,
    beta=betas,
    lambda_d=lambdas,
    lambda_u=lambdas,
    reference_point=st.sampled_from(["zero", "batch"]),
)
def test_kto_loss_averse_and_risk_seeking_gradients_equal_at_init_and_kahneman_tversky_half(
    seed, batch, beta, lambda_d, lambda_u, reference_point
):
    """At init r = 0 and z = 0, so u = 0: U_la'(0) = U_rs'(0) = 1/2 and sigmoid'(0) = 1/4."""
    gen = generator(seed)
    err = leaf(rand_errors(gen, batch))
    labels = random_labels(gen, batch)
    outs = {
        name: kto_loss(
            err,
            err.detach().clone(),
            labels,
            beta=beta,
            utility=name,
            reference_point=reference_point,
            lambda_d=lambda_d,
            lambda_u=lambda_u,
        )
        for name in UTILITY_NAMES
    }
    lam = torch.where(labels, torch.tensor(lambda_d, dtype=F64), torch.tensor(lambda_u, dtype=F64))
    # Values at init: lam (1 - U(0)) with U_kt(0) = 1/2, U_la(0) = -log 2, U_rs(0) = log 2.
    assert_close(outs["kahneman_tversky"].loss, (lam * 0.5).mean())
    assert_close(outs["loss_averse"].loss, (lam * (1 + LOG2)).mean())
    assert_close(outs["risk_seeking"].loss, (lam * (1 - LOG2)).mean())
    # Gradients: d/d err of lam (1 - U(s * r)) = lam * s * U'(0) * beta / 2, averaged over B.
    sign = labels.to(F64) * 2 - 1
    (g_la,) = input_grads(outs["loss_averse"].loss, [err])
    (g_rs,) = input_grads(outs["risk_seeking"].loss, [err])
    (g_kt,) = input_grads(outs["kahneman_tversky"].loss, [err])
    assert_close(g_la, lam * sign * 0.5 * beta / 2 / batch)
    assert_close(g_rs, g_la)
    assert_close(g_kt, 0.5 * g_la)


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas, reference_point=st.sampled_from(["zero", "batch"]))
def test_kto_loss_averse_and_risk_seeking_gradients_equal_at_init_and_kahneman_tversky_half_through_tiny_model(
    seed, batch, beta, reference_point
):
    model, reference = make_models(seed)
    err, ref = binary_errors(model, reference, seed, batch)
    labels = random_labels(generator(seed + 5), batch)
    grads = {
        name: param_grads(
            kto_loss(err, ref, labels, beta=beta, utility=name, reference_point=reference_point).loss, model
        )
        for name in UTILITY_NAMES
    }
    assert grad_norm(grads["loss_averse"]) > 0
    assert_grads_close(grads["risk_seeking"], grads["loss_averse"], scale=beta)
    assert_grads_close(grads["kahneman_tversky"], [0.5 * g for g in grads["loss_averse"]], scale=beta)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_kto_risk_seeking_plus_loss_averse_utility_is_the_identity_via_losses(seed, batch, beta):
    """U_rs(x) + U_la(x) = x, read off the losses: (1 - L_la) + (1 - L_rs) = mean(s * r) with z = 0, lambda = 1."""
    gen = generator(seed)
    err, ref = leaf(rand_errors(gen, batch)), rand_errors(gen, batch)
    labels = random_labels(gen, batch)
    la = kto_loss(err, ref, labels, beta=beta, utility="loss_averse", reference_point="zero").loss
    rs = kto_loss(err, ref, labels, beta=beta, utility="risk_seeking", reference_point="zero").loss
    signed_reward = ((labels.to(F64) * 2 - 1) * reward(err, ref, beta)).mean()
    total = (1 - la) + (1 - rs)
    assert_close(total, signed_reward, atol=1e-11 * max(1.0, beta))
    assert_grads_close(input_grads(total, [err]), input_grads(signed_reward, [err]), scale=beta)


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_kto_risk_seeking_plus_loss_averse_utility_is_the_identity_through_tiny_model(seed, batch, beta):
    model, reference = make_models(seed, perturb=0.05)
    err, ref = binary_errors(model, reference, seed, batch)
    labels = random_labels(generator(seed + 5), batch)
    la = kto_loss(err, ref, labels, beta=beta, utility="loss_averse", reference_point="zero").loss
    rs = kto_loss(err, ref, labels, beta=beta, utility="risk_seeking", reference_point="zero").loss
    signed_reward = ((labels.to(F64) * 2 - 1) * reward(err, ref, beta)).mean()
    total = (1 - la) + (1 - rs)
    assert_close(total, signed_reward, atol=1e-11 * max(1.0, beta))
    assert_grads_close(param_grads(total, model), param_grads(signed_reward, model), scale=beta)


@FAST
@given(x=st.lists(st.floats(min_value=-700, max_value=700), min_size=1, max_size=8))
def test_kto_utility_functions_risk_seeking_plus_loss_averse_is_identity(x):
    """If the implementation exposes its utilities (minipref.kto.UTILITIES), check them pointwise too."""
    utilities = getattr(getattr(minipref, "kto", None), "UTILITIES", None)
    if utilities is None:
        pytest.skip("minipref.kto.UTILITIES not exposed; covered through the losses above")
    assert set(UTILITY_NAMES) <= set(utilities)
    xs = torch.tensor(x, dtype=F64)
    u_la, u_rs, u_kt = utilities["loss_averse"](xs), utilities["risk_seeking"](xs), utilities["kahneman_tversky"](xs)
    assert_close(u_rs + u_la, xs, atol=1e-12)
    assert_close(u_kt, torch.sigmoid(xs), atol=1e-15)  # Kahneman-Tversky value function is the sigmoid
    assert_close(u_la, torch.nn.functional.logsigmoid(xs), atol=1e-12)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_kto_batch_reference_point_is_the_detached_clamped_batch_mean(seed, batch, beta):
    """reference_point='batch' == a constant tensor clamp(mean r, min=0): same value, same gradient."""
    gen = generator(seed)
    err, ref = leaf(rand_errors(gen, batch)), rand_errors(gen, batch)
    labels = random_labels(gen, batch)
    z = reward(err, ref, beta).detach().mean().clamp(min=0)
    for name in UTILITY_NAMES:
        batch_out = kto_loss(err, ref, labels, beta=beta, utility=name, reference_point="batch")
        fixed_out = kto_loss(err, ref, labels, beta=beta, utility=name, reference_point=z.clone())
        assert_close(batch_out.loss, fixed_out.loss, atol=1e-12 * max(1.0, beta))
        assert_grads_close(input_grads(batch_out.loss, [err]), input_grads(fixed_out.loss, [err]), scale=beta)


# ----------------------------------------------------------------------------------------------------------
# I5. BCE with err_ref == loss_averse KTO with reference_point="zero", minus 1.
# ----------------------------------------------------------------------------------------------------------
@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_bce_with_reference_equals_loss_averse_kto_at_zero_minus_one(seed, batch, beta):
    gen = generator(seed)
    err, ref = leaf(rand_errors(gen, batch)), rand_errors(gen, batch)
    labels = random_labels(gen, batch)
    bce = bce_loss(err, labels, err_ref=ref, beta=beta)
    kto = kto_loss(err, ref, labels, beta=beta, utility="loss_averse", reference_point="zero")
    assert_close(bce.loss, kto.loss - 1.0, atol=1e-12 * max(1.0, beta))
    assert_grads_close(input_grads(bce.loss, [err]), input_grads(kto.loss, [err]), scale=beta)


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_bce_with_reference_equals_loss_averse_kto_at_zero_minus_one_through_tiny_model(seed, batch, beta):
    model, reference = make_models(seed, perturb=0.05)
    err, ref = binary_errors(model, reference, seed, batch)
    labels = random_labels(generator(seed + 5), batch)
    bce = bce_loss(err, labels, err_ref=ref, beta=beta)
    kto = kto_loss(err, ref, labels, beta=beta, utility="loss_averse", reference_point="zero")
    assert_close(bce.loss, kto.loss - 1.0, atol=1e-12 * max(1.0, beta))
    assert_grads_close(param_grads(bce.loss, model), param_grads(kto.loss, model), scale=beta)


# ----------------------------------------------------------------------------------------------------------
# I6. SPIN-Diffusion on the same tensors is Diffusion-DPO.
# ----------------------------------------------------------------------------------------------------------
def _assert_spin_equals_dpo(spin, dpo, grads_spin, grads_dpo, beta):
    assert_close(spin.loss, dpo.loss, atol=1e-12 * max(1.0, beta))
    assert_grads_close(grads_spin, grads_dpo, scale=beta)
    for key in set(spin.metrics) & set(dpo.metrics):  # metrics both report must agree too
        assert spin.metrics[key] == pytest.approx(dpo.metrics[key], rel=1e-6, abs=1e-6), key


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_spin_equals_dpo_on_same_tensors(seed, batch, beta):
    gen = generator(seed)
    err_real, err_gen = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    opp_real, opp_gen = rand_errors(gen, batch), rand_errors(gen, batch)
    spin = spin_loss(err_real, err_gen, opp_real, opp_gen, beta=beta)
    dpo = dpo_loss(err_real, err_gen, opp_real, opp_gen, beta=beta)
    inputs = [err_real, err_gen]
    _assert_spin_equals_dpo(spin, dpo, input_grads(spin.loss, inputs), input_grads(dpo.loss, inputs), beta)


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_spin_equals_dpo_on_same_tensors_through_tiny_model(seed, batch, beta):
    model, opponent = make_models(seed, perturb=0.05)  # the frozen copy plays the opponent theta_k
    err_real, err_gen, opp_real, opp_gen = pair_errors(model, opponent, seed, batch)
    spin = spin_loss(err_real, err_gen, opp_real, opp_gen, beta=beta)
    dpo = dpo_loss(err_real, err_gen, opp_real, opp_gen, beta=beta)
    _assert_spin_equals_dpo(spin, dpo, param_grads(spin.loss, model), param_grads(dpo.loss, model), beta)


# ----------------------------------------------------------------------------------------------------------
# I7. Diff-contrast: W = I gives DPO exactly; tau -> 0 gives W -> I; tau -> inf gives uniform W; rows sum to 1.
# ----------------------------------------------------------------------------------------------------------
def _one_hot_embeddings(gen: torch.Generator, batch: int, dim: int = 8):
    """Orthogonal rows with random positive scales (cosine ignores scale): 1 - cos is 0 on the diagonal, 1 off it."""
    basis = torch.eye(batch, dim, dtype=F64)
    return basis * (0.5 + torch.rand(batch, 1, generator=gen, dtype=F64)), basis * (
        0.5 + torch.rand(batch, 1, generator=gen, dtype=F64)
    )


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_contrast_with_identity_weights_equals_dpo(seed, batch, beta):
    gen = generator(seed)
    err_w, err_l = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    ref_err_w, ref_err_l = rand_errors(gen, batch), rand_errors(gen, batch)
    emb_w, emb_l = _one_hot_embeddings(gen, batch)
    tau = 1e-3  # off-diagonal weight exp(-1/tau) = exp(-1000) underflows to exactly 0 in float64

    assert_close(contrast_weights(emb_w, emb_l, tau=tau), torch.eye(batch, dtype=F64), atol=1e-15)
    contrast = contrast_loss(err_w, err_l, ref_err_w, ref_err_l, emb_w, emb_l, beta=beta, tau=tau)
    dpo = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
    assert_close(contrast.loss, dpo.loss, rtol=1e-12, atol=1e-13)
    inputs = [err_w, err_l]
    assert_grads_close(input_grads(contrast.loss, inputs), input_grads(dpo.loss, inputs), scale=beta, rtol=1e-11)


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_contrast_with_identity_weights_equals_dpo_through_tiny_model(seed, batch, beta):
    model, reference = make_models(seed, perturb=0.05)
    err_w, err_l, ref_err_w, ref_err_l = pair_errors(model, reference, seed, batch)
    emb_w, emb_l = _one_hot_embeddings(generator(seed + 7), batch)
    contrast = contrast_loss(err_w, err_l, ref_err_w, ref_err_l, emb_w, emb_l, beta=beta, tau=1e-3)
    dpo = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
    assert_close(contrast.loss, dpo.loss, rtol=1e-12, atol=1e-13)
    assert_grads_close(param_grads(contrast.loss, model), param_grads(dpo.loss, model), scale=beta, rtol=1e-11)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, D), (M, D) -> (M, M) cosine similarities, longhand."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return a @ b.T


@FAST
@given(seed=seeds, batch=st.integers(2, 6), dim=st.integers(2, 12))
def test_contrast_weights_tend_to_identity_as_tau_goes_to_zero(seed, batch, dim):
    gen = generator(seed)
    emb_w = torch.randn(batch, dim, generator=gen, dtype=F64)
    emb_l = emb_w + 0.01 * torch.randn(batch, dim, generator=gen, dtype=F64)  # loser image near its own prompt
    cos = _cosine(emb_w, emb_l)
    off = cos - 2.0 * torch.eye(batch, dtype=F64)  # knock the diagonal out of the row max
    gap = float((cos.diagonal() - off.max(dim=1).values).min())
    assume(gap > 1e-3)  # each winner's nearest loser is its own pair (distinct embeddings)
    tau = gap / 50.0  # every off-diagonal entry <= exp(-50)
    weights = contrast_weights(emb_w, emb_l, tau=tau)
    assert weights.shape == (batch, batch)
    assert_close(weights, torch.eye(batch, dtype=F64), atol=1e-20 * batch + 1e-20, rtol=0)


@FAST
@given(seed=seeds, batch=st.integers(1, 6), dim=st.integers(2, 12))
def test_contrast_weights_tend_to_uniform_as_tau_goes_to_infinity(seed, batch, dim):
    gen = generator(seed)
    emb_w = torch.randn(batch, dim, generator=gen, dtype=F64)
    emb_l = torch.randn(batch, dim, generator=gen, dtype=F64)
    weights = contrast_weights(emb_w, emb_l, tau=1e9)  # exp(-(1 - cos)/1e9) = 1 - O(2e-9)
    assert_close(weights, torch.full((batch, batch), 1.0 / batch, dtype=F64), atol=1e-8, rtol=0)


@FAST
@given(
    seed=seeds,
    batch=st.integers(1, 6),
    dim=st.integers(2, 12),
    log_tau=st.floats(min_value=-4.0, max_value=4.0),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_contrast_weights_rows_always_sum_to_one(seed, batch, dim, log_tau, dtype):
    gen = generator(seed)
    emb_w = torch.randn(batch, dim, generator=gen, dtype=F64).to(dtype)
    emb_l = torch.randn(batch, dim, generator=gen, dtype=F64).to(dtype)
    weights = contrast_weights(emb_w, emb_l, tau=10.0**log_tau)
    assert weights.shape == (batch, batch)
    assert bool(torch.isfinite(weights).all()), "weights must never be NaN/Inf (a row must not underflow to 0)"
    assert bool((weights >= 0).all())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(weights.sum(dim=1), torch.ones(batch, dtype=F64), atol=tol, rtol=0)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=small_betas, weights_inside=st.booleans())
def test_contrast_weights_are_detached_from_the_embeddings(seed, batch, beta, weights_inside):
    gen = generator(seed)
    err_w, err_l = leaf(rand_errors(gen, batch)), leaf(rand_errors(gen, batch))
    ref_err_w, ref_err_l = rand_errors(gen, batch), rand_errors(gen, batch)
    emb_w = leaf(torch.randn(batch, 5, generator=gen, dtype=F64))
    emb_l = leaf(torch.randn(batch, 5, generator=gen, dtype=F64))
    out = contrast_loss(
        err_w, err_l, ref_err_w, ref_err_l, emb_w, emb_l, beta=beta, tau=0.5, weights_inside=weights_inside
    )
    grads = torch.autograd.grad(out.loss, [emb_w, emb_l], allow_unused=True)
    for g in grads:
        assert g is None or float(g.abs().max()) == 0.0


# ----------------------------------------------------------------------------------------------------------
# I8. DSPO: beta = 0 is SFT on winners; at theta == ref the gradient is (1 - beta*gamma/2) x the SFT gradient
#    (sigmoid(I) = 1/2 at init, and the (pred_w - ref_pred_w) factor kills the gradient through I).
# ----------------------------------------------------------------------------------------------------------
def _dspo_tensors(gen: torch.Generator, batch: int):
    shape = (batch, *SAMPLE_SHAPE)
    pred_w = leaf(torch.randn(shape, generator=gen, dtype=F64))
    ref_pred_w = torch.randn(shape, generator=gen, dtype=F64)
    target_w = torch.randn(shape, generator=gen, dtype=F64)
    return pred_w, ref_pred_w, target_w, leaf(rand_errors(gen, batch)), rand_errors(gen, batch)


@FAST
@given(
    seed=seeds,
    batch=batch_sizes,
    gamma=st.floats(min_value=0.0, max_value=5.0),
    variant=st.sampled_from(["dspo", "dspo_e"]),
)
def test_dspo_with_zero_beta_equals_sft_on_winners(seed, batch, gamma, variant):
    pred_w, ref_pred_w, target_w, err_l, ref_err_l = _dspo_tensors(generator(seed), batch)
    out = dspo_loss(pred_w, ref_pred_w, target_w, err_l, ref_err_l, beta=0.0, gamma=gamma, variant=variant)
    sft = sft_loss(per_sample_mse(pred_w, target_w))
    longhand = ((pred_w - target_w) ** 2).mean()  # plain epsilon-prediction loss on the winners
    assert_close(out.loss, longhand)
    assert_close(out.loss, sft.loss)
    inputs = [pred_w, err_l]
    grads = input_grads(out.loss, inputs)
    assert_grads_close(grads, input_grads(sft.loss, inputs))
    assert float(grads[1].abs().max()) == 0.0  # the loser cannot matter when beta = 0


@MODEL
@given(seed=seeds, batch=batch_sizes, variant=st.sampled_from(["dspo", "dspo_e"]))
def test_dspo_with_zero_beta_equals_sft_on_winners_through_tiny_model(seed, batch, variant):
    model, reference = make_models(seed, perturb=0.05)
    pred, ref_pred, target = pair_forward(model, reference, seed, batch)
    err_l, ref_err_l = longhand_mse(pred[batch:], target[batch:]), longhand_mse(ref_pred[batch:], target[batch:])
    out = dspo_loss(pred[:batch], ref_pred[:batch], target[:batch], err_l, ref_err_l, beta=0.0, variant=variant)
    sft = sft_loss(per_sample_mse(pred[:batch], target[:batch]))
    assert_close(out.loss, sft.loss)
    assert_grads_close(param_grads(out.loss, model), param_grads(sft.loss, model))


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, gamma=st.floats(min_value=0.01, max_value=2.0))
def test_dspo_at_reference_gradient_is_one_minus_half_beta_gamma_times_sft(seed, batch, beta, gamma):
    pred_w, _, target_w, err_l, _ = _dspo_tensors(generator(seed), batch)
    ref_pred_w, ref_err_l = pred_w.detach().clone(), err_l.detach().clone()  # theta == ref
    out = dspo_loss(pred_w, ref_pred_w, target_w, err_l, ref_err_l, beta=beta, gamma=gamma, variant="dspo")
    sft = ((pred_w - target_w) ** 2).mean()
    assert_close(out.loss, sft)  # the correction term is 0 at init
    factor = 1.0 - beta * gamma / 2.0
    grad_pred, grad_err_l = input_grads(out.loss, [pred_w, err_l])
    (grad_sft,) = input_grads(sft, [pred_w])
    assert_close(grad_pred, factor * grad_sft, atol=1e-12 * max(1.0, beta * gamma))
    assert float(grad_err_l.abs().max()) == 0.0


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas, gamma=st.floats(min_value=0.01, max_value=2.0))
def test_dspo_at_reference_gradient_is_one_minus_half_beta_gamma_times_sft_through_tiny_model(
    seed, batch, beta, gamma
):
    model, reference = make_models(seed)
    pred, ref_pred, target = pair_forward(model, reference, seed, batch)
    err_l, ref_err_l = longhand_mse(pred[batch:], target[batch:]), longhand_mse(ref_pred[batch:], target[batch:])
    out = dspo_loss(pred[:batch], ref_pred[:batch], target[:batch], err_l, ref_err_l, beta=beta, gamma=gamma)
    sft = ((pred[:batch] - target[:batch]) ** 2).mean()
    factor = 1.0 - beta * gamma / 2.0
    assert_close(out.loss, sft)
    assert_grads_close(
        param_grads(out.loss, model), [factor * g for g in param_grads(sft, model)], scale=beta * gamma
    )


@FAST
@given(seed=seeds, batch=batch_sizes, beta=small_betas, gamma=st.floats(min_value=0.01, max_value=2.0))
def test_dspo_e_at_reference_gradient_is_one_minus_beta_gamma_times_sft(seed, batch, beta, gamma):
    """Eq. (45) of DSPO: the same argument without the sigmoid gives the factor (1 - gamma*beta)."""
    pred_w, _, target_w, err_l, _ = _dspo_tensors(generator(seed), batch)
    out = dspo_loss(
        pred_w, pred_w.detach().clone(), target_w, err_l, err_l.detach().clone(), beta=beta, gamma=gamma, variant="dspo_e"
    )
    sft = ((pred_w - target_w) ** 2).mean()
    assert_close(out.loss, sft)
    (grad_pred,) = input_grads(out.loss, [pred_w])
    (grad_sft,) = input_grads(sft, [pred_w])
    assert_close(grad_pred, (1.0 - beta * gamma) * grad_sft, atol=1e-12 * max(1.0, beta * gamma))


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_dspo_ref_at_reference_is_quarter_with_half_the_dpo_gradient_through_tiny_model(seed, batch, beta):
    """Eq. (47): mean((1 - sigmoid(I))^2) = 1/4 at I = 0, and its slope -1/4 per unit of I is half of DPO's -1/2."""
    model, reference = make_models(seed)
    pred, ref_pred, target = pair_forward(model, reference, seed, batch)
    err, ref_err = longhand_mse(pred, target), longhand_mse(ref_pred, target)
    out = dspo_loss(pred[:batch], ref_pred[:batch], target[:batch], err[batch:], ref_err[batch:], beta=beta, variant="dspo_ref")
    dpo = dpo_loss(err[:batch], err[batch:], ref_err[:batch], ref_err[batch:], beta=beta)
    assert_close(out.loss, 0.25)
    expected = [0.5 * g for g in param_grads(dpo.loss, model)]
    assert grad_norm(expected) > 0
    assert_grads_close(param_grads(out.loss, model), expected, scale=beta)


# ----------------------------------------------------------------------------------------------------------
# I9. SPO: log 2 at theta == ref; swapping winner and loser negates the logit; no gradient outside the clip.
# ----------------------------------------------------------------------------------------------------------
def _clamped_log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor, clip: float) -> torch.Tensor:
    """log clamp(exp(logp - ref_logp), 1 - clip, 1 + clip), longhand (clamping commutes with the monotone log)."""
    return (logp - ref_logp).clamp(math.log(1.0 - clip), math.log(1.0 + clip))


clips = st.floats(min_value=0.01, max_value=0.5)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, clip=clips)
def test_spo_at_reference_is_log2(seed, batch, beta, clip):
    gen = generator(seed)
    logp_w = leaf(-5.0 * torch.rand(batch, generator=gen, dtype=F64))
    logp_l = leaf(-5.0 * torch.rand(batch, generator=gen, dtype=F64))
    out = spo_loss(logp_w, logp_w.detach().clone(), logp_l, logp_l.detach().clone(), beta=beta, clip=clip)
    assert_close(out.loss, LOG2)
    grad_w, grad_l = input_grads(out.loss, [logp_w, logp_l])
    # d softplus(-beta (lw - ll)) at 0 is -beta/2 per unit of lw, averaged over B.
    assert_close(grad_w, torch.full((batch,), -beta / (2 * batch), dtype=F64))
    assert_close(grad_l, torch.full((batch,), beta / (2 * batch), dtype=F64))


def _gaussian_log_prob(sample, mean, std):
    """Longhand: mean over non-batch dims of log N(sample; mean, std^2)."""
    logp = -((sample - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.reshape(sample.shape[0], -1).mean(dim=1)


def _spo_step(model, reference, seed, batch, std, winner_from_model=False, loser_from_model=False):
    """A shared x_t, two candidates x_{t-1} (winner, loser) drawn around the reference's (or model's) mean."""
    gen = generator(seed + 4)
    x_t = torch.randn(batch, *SAMPLE_SHAPE, generator=gen, dtype=F64)
    t = torch.randint(0, 750, (batch,), generator=gen)
    mean = model(x_t, t)
    with torch.no_grad():
        ref_mean = reference(x_t, t)
    centre_w = mean.detach() if winner_from_model else ref_mean
    centre_l = mean.detach() if loser_from_model else ref_mean
    x_w = centre_w + std * torch.randn(x_t.shape, generator=gen, dtype=F64)
    x_l = centre_l + std * torch.randn(x_t.shape, generator=gen, dtype=F64)
    return (
        _gaussian_log_prob(x_w, mean, std),
        _gaussian_log_prob(x_w, ref_mean, std),
        _gaussian_log_prob(x_l, mean, std),
        _gaussian_log_prob(x_l, ref_mean, std),
    )


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas, clip=clips)
def test_spo_at_reference_is_log2_through_tiny_model(seed, batch, beta, clip):
    model, reference = make_models(seed)
    logp_w, ref_logp_w, logp_l, ref_logp_l = _spo_step(model, reference, seed, batch, std=0.1)
    out = spo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=beta, clip=clip)
    assert_close(out.loss, LOG2)
    expected = param_grads(-(beta / 2.0) * (logp_w.mean() - logp_l.mean()), model)
    assert grad_norm(expected) > 0
    assert_grads_close(param_grads(out.loss, model), expected, scale=beta)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, clip=clips)
def test_spo_swapping_winner_and_loser_negates_the_logit(seed, batch, beta, clip):
    gen = generator(seed)
    ref_logp_w, ref_logp_l = -5.0 * torch.rand(batch, generator=gen, dtype=F64), -5.0 * torch.rand(
        batch, generator=gen, dtype=F64
    )
    # log-ratios in [-0.6, 0.6]: some inside the clip range, some outside
    logp_w = leaf(ref_logp_w + 1.2 * torch.rand(batch, generator=gen, dtype=F64) - 0.6)
    logp_l = leaf(ref_logp_l + 1.2 * torch.rand(batch, generator=gen, dtype=F64) - 0.6)
    logit = beta * (_clamped_log_ratio(logp_w, ref_logp_w, clip) - _clamped_log_ratio(logp_l, ref_logp_l, clip))

    loss = spo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=beta, clip=clip).loss
    swapped = spo_loss(logp_l, ref_logp_l, logp_w, ref_logp_w, beta=beta, clip=clip).loss
    # softplus(x) - softplus(-x) = x: the swap turns softplus(-logit) into softplus(+logit).
    assert_close(swapped - loss, logit.mean(), atol=1e-11 * max(1.0, beta))
    assert_grads_close(
        input_grads(swapped - loss, [logp_w, logp_l]), input_grads(logit.mean(), [logp_w, logp_l]), scale=beta
    )


@FAST
@given(
    seed=seeds,
    batch=batch_sizes,
    beta=betas,
    clip=clips,
    winner_above=st.booleans(),
    loser_above=st.booleans(),
    loser_inside=st.booleans(),
)
def test_spo_gradient_is_exactly_zero_outside_the_clip_range(
    seed, batch, beta, clip, winner_above, loser_above, loser_inside
):
    gen = generator(seed)
    ref_logp_w, ref_logp_l = -5.0 * torch.rand(batch, generator=gen, dtype=F64), -5.0 * torch.rand(
        batch, generator=gen, dtype=F64
    )

    def outside(above: bool) -> torch.Tensor:
        excess = 1e-3 + torch.rand(batch, generator=gen, dtype=F64)  # strictly beyond the boundary
        return math.log(1 + clip) + excess if above else math.log(1 - clip) - excess

    logp_w = leaf(ref_logp_w + outside(winner_above))
    if loser_inside:  # log-ratio strictly inside (log(1-clip), log(1+clip))
        inside = (torch.rand(batch, generator=gen, dtype=F64) - 0.5) * math.log(1 + clip)
        logp_l = leaf(ref_logp_l + inside)
    else:
        logp_l = leaf(ref_logp_l + outside(loser_above))

    out = spo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=beta, clip=clip)
    grad_w, grad_l = input_grads(out.loss, [logp_w, logp_l])
    assert torch.count_nonzero(grad_w) == 0
    if loser_inside:  # only the clamped side is cut off: d/d logp_l softplus(-x) = beta * sigmoid(-x) / B
        logit = beta * (_clamped_log_ratio(logp_w, ref_logp_w, clip) - (logp_l - ref_logp_l)).detach()
        assert_close(grad_l, beta * torch.sigmoid(-logit) / batch, atol=1e-300)
    else:
        assert torch.count_nonzero(grad_l) == 0


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas, clip=clips)
def test_spo_gradient_is_exactly_zero_outside_the_clip_range_through_tiny_model(seed, batch, beta, clip):
    model, reference = make_models(seed)
    with torch.no_grad():  # move the model's mean 3 units away: with std 0.1 every log-ratio is far outside
        model.net[-1].bias.add_(3.0)
    # winner drawn around the reference (model finds it unlikely: ratio << 1), loser around the model (ratio >> 1)
    logp_w, ref_logp_w, logp_l, ref_logp_l = _spo_step(model, reference, seed, batch, std=0.1, loser_from_model=True)
    assert bool((logp_w - ref_logp_w < math.log(1 - clip)).all())
    assert bool((logp_l - ref_logp_l > math.log(1 + clip)).all())
    out = spo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=beta, clip=clip)
    assert torch.isfinite(out.loss)
    for g in param_grads(out.loss, model):
        assert torch.count_nonzero(g) == 0
