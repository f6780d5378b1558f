"""DSPO beyond docs/conventions.md I8: the authors' SDXL switch (``variant="dspo_sdxl"``) and why beta 0.001 is SFT.

The SDXL switch (huaishengzhu/DSPO ``train.py --sdxl``): with ``d_i = mean_d (pred_w - ref_pred_w)^2``,
``L = mean_i (1 - sigmoid(I_i))^2 d_i`` when ``mean_i d_i >= threshold`` and ``mean_i (1 - sigmoid(I_i))^2`` (the
dspo_ref form, Eq. (47)) otherwise. Expected sides are written longhand from those formulas (docs/conventions.md §2 for the
margin ``I = r_w - r_l``), never by calling the function under test with another variant unless the property *is*
the equality of two variants. The golden values (transcribed element by element) are in test_golden.py.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from minipref import dpo_loss, dspo_loss
from tests.core_helpers import (
    F64,
    FAST,
    MODEL,
    SAMPLE_SHAPE,
    assert_close,
    assert_grads_close,
    batch_sizes,
    betas,
    generator,
    grad_norm,
    input_grads,
    leaf,
    longhand_mse,
    make_models,
    pair_forward,
    param_grads,
    rand_errors,
    seeds,
)


def _tensors(seed: int, batch: int, drift_scale: float = 1.0):
    """pred_w (a leaf), ref_pred_w = pred_w + drift_scale * noise, target_w, err_l (a leaf), ref_err_l."""
    gen = generator(seed)
    shape = (batch, *SAMPLE_SHAPE)
    pred_w = torch.randn(shape, generator=gen, dtype=F64)
    ref_pred_w = pred_w + drift_scale * torch.randn(shape, generator=gen, dtype=F64)
    target_w = torch.randn(shape, generator=gen, dtype=F64)
    return leaf(pred_w), ref_pred_w, target_w, leaf(rand_errors(gen, batch)), rand_errors(gen, batch)


def _margin(pred_w, ref_pred_w, target_w, err_l, ref_err_l, beta):
    """I = r_w - r_l with r = -(beta/2)(err - err_ref), err a mean over the sample (docs/conventions.md §1-§2)."""
    err_w, ref_err_w = longhand_mse(pred_w, target_w), longhand_mse(ref_pred_w, target_w)
    return -(beta / 2.0) * (err_w - ref_err_w) + (beta / 2.0) * (err_l - ref_err_l)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_dspo_sdxl_below_the_threshold_is_dspo_ref_in_value_and_gradient(seed, batch, beta):
    tensors = _tensors(seed, batch)
    drift = float(longhand_mse(tensors[0], tensors[1]).detach().mean())
    out = dspo_loss(*tensors, beta=beta, variant="dspo_sdxl", threshold=2.0 * drift)
    ref = dspo_loss(*tensors, beta=beta, variant="dspo_ref")
    assert out.metrics["above_threshold"] == 0.0
    assert_close(out.loss, ref.loss)
    inputs = [tensors[0], tensors[3]]
    assert_grads_close(input_grads(out.loss, inputs), input_grads(ref.loss, inputs), scale=beta)


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, drift_scale=st.floats(min_value=0.01, max_value=3.0))
def test_dspo_sdxl_above_the_threshold_is_the_squared_gate_times_the_drift(seed, batch, beta, drift_scale):
    pred_w, ref_pred_w, target_w, err_l, ref_err_l = _tensors(seed, batch, drift_scale)
    drift = longhand_mse(pred_w, ref_pred_w).detach()
    out = dspo_loss(
        pred_w, ref_pred_w, target_w, err_l, ref_err_l, beta=beta, variant="dspo_sdxl", threshold=0.5 * float(drift.mean())
    )
    # mean_{i,d} ((1 - sigmoid(I_i)) (pred_w - ref_pred_w))^2, the authors' expression, gradient through I included
    gate = 1 - torch.sigmoid(_margin(pred_w, ref_pred_w, target_w, err_l, ref_err_l, beta))
    expected = ((gate.reshape(-1, *([1] * len(SAMPLE_SHAPE))) * (pred_w - ref_pred_w)) ** 2).mean()
    assert out.metrics["above_threshold"] == 1.0
    assert_close(out.loss, expected)
    inputs = [pred_w, err_l]
    assert_grads_close(input_grads(out.loss, inputs), input_grads(expected, inputs), scale=beta)


def test_dspo_sdxl_switches_at_the_threshold_itself_and_for_the_whole_batch():
    """``>=`` as in the code, on a batch whose drift is exactly representable: every |pred_w - ref_pred_w| is 0.5
    in sample 0 and 0.25 in sample 1, so d = (0.25, 0.0625) and its mean is 0.15625 exactly."""
    batch_shape = (2, *SAMPLE_SHAPE)
    pred_w = leaf(torch.zeros(batch_shape, dtype=F64))
    ref_pred_w = torch.cat([torch.full((1, *SAMPLE_SHAPE), 0.5), torch.full((1, *SAMPLE_SHAPE), 0.25)]).to(F64)
    target_w = torch.ones(batch_shape, dtype=F64)
    err_l, ref_err_l = torch.tensor([0.3, 0.2], dtype=F64), torch.tensor([0.1, 0.4], dtype=F64)
    args = (pred_w, ref_pred_w, target_w, err_l, ref_err_l)
    at = dspo_loss(*args, beta=3.0, variant="dspo_sdxl", threshold=0.15625)
    just_above = dspo_loss(*args, beta=3.0, variant="dspo_sdxl", threshold=math.nextafter(0.15625, 1.0))
    assert at.metrics["above_threshold"] == 1.0 and just_above.metrics["above_threshold"] == 0.0
    gate = 1 - torch.sigmoid(_margin(*args, 3.0))
    # sample 1's own drift (0.0625) is below the threshold, but the batch mean decides: it is weighted by d too
    assert_close(at.loss, (gate**2 * torch.tensor([0.25, 0.0625], dtype=F64)).mean())
    assert_close(just_above.loss, (gate**2).mean())


@MODEL
@given(seed=seeds, batch=batch_sizes, beta=betas)
def test_dspo_sdxl_at_the_reference_trains_eq_47_because_eq_46_has_no_gradient_there(seed, batch, beta):
    """theta == ref: d = 0, so the default threshold picks Eq. (47) (loss 1/4, half the DPO gradient). Forcing the
    Eq. (46) line (threshold 0) gives loss 0 and a zero gradient: that line alone could never leave the reference,
    which is why the code starts on Eq. (47)."""
    model, reference = make_models(seed)
    pred, ref_pred, target = pair_forward(model, reference, seed, batch)
    err, ref_err = longhand_mse(pred, target), longhand_mse(ref_pred, target)
    args = (pred[:batch], ref_pred[:batch], target[:batch], err[batch:], ref_err[batch:])
    start = dspo_loss(*args, beta=beta, variant="dspo_sdxl")
    assert start.metrics["above_threshold"] == 0.0 and start.metrics["drift"] == 0.0
    assert_close(start.loss, 0.25)
    dpo = dpo_loss(err[:batch], err[batch:], ref_err[:batch], ref_err[batch:], beta=beta)
    expected = [0.5 * g for g in param_grads(dpo.loss, model)]
    assert grad_norm(expected) > 0
    assert_grads_close(param_grads(start.loss, model), expected, scale=beta)

    forced = dspo_loss(*args, beta=beta, variant="dspo_sdxl", threshold=0.0)
    assert forced.metrics["above_threshold"] == 1.0
    assert_close(forced.loss, 0.0)
    assert grad_norm(param_grads(forced.loss, model)) == 0.0


@FAST
@given(seed=seeds, batch=batch_sizes, drift_scale=st.floats(min_value=1e-3, max_value=0.3))
def test_dspo_at_the_sd15_beta_is_sft_on_winners_within_the_cauchy_schwarz_bound(seed, batch, drift_scale):
    """docs/methods.md, DSPO: at beta 0.001 and gamma 1 the correction's coefficient c = beta gamma (1 - sigmoid(I))
    is below 0.001, so |L_DSPO - L_SFT| <= 2 c |res| |d| + c^2 |d|^2 (mean over all elements, |.| root-mean-square),
    res = pred_w - target_w and d = pred_w - ref_pred_w. At the authors' scale (|d| a few % of |res|) that is a
    relative difference of order 1e-5."""
    pred_w, ref_pred_w, target_w, err_l, ref_err_l = _tensors(seed, batch, drift_scale)
    out = dspo_loss(pred_w, ref_pred_w, target_w, err_l, ref_err_l, beta=0.001, gamma=1.0, variant="dspo")
    sft = ((pred_w - target_w) ** 2).mean()
    res_rms = float(((pred_w - target_w) ** 2).detach().mean().sqrt())
    d_rms = float(((pred_w - ref_pred_w) ** 2).detach().mean().sqrt())
    c = 0.001 * float((1 - torch.sigmoid(_margin(pred_w, ref_pred_w, target_w, err_l, ref_err_l, 0.001))).detach().max())
    assert 0.4995 < c / 0.001 < 0.5005  # the gate sits at 1/2: the margin is of order 1e-4 here
    bound = 2 * c * res_rms * d_rms + (c * d_rms) ** 2 + 1e-15
    assert abs(float((out.loss - sft).detach())) <= bound
