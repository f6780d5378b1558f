"""Bad input raises ValueError naming the argument (docs/conventions.md §6), never a deep torch error or a silent number.

Each case is a call that must fail; the message must contain the name of (one of) the offending argument(s).
A positive control next to them checks that the same base inputs pass, so every failure below is caused by
the one thing each case breaks.
"""

from __future__ import annotations

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
from tests.core_helpers import F64

B = 3


def err(n: int = B) -> torch.Tensor:
    return torch.linspace(0.1, 0.9, n, dtype=F64)


def col(n: int = B) -> torch.Tensor:
    """A (B, 1) tensor: the right numbers in the wrong shape."""
    return err(n)[:, None]


def labels(n: int = B) -> torch.Tensor:
    return torch.tensor([True, False, True, False, True][:n])


def emb(n: int = B, d: int = 4) -> torch.Tensor:
    return torch.arange(1, n * d + 1, dtype=F64).reshape(n, d).sin()


def pred(n: int = B, shape=(2, 3)) -> torch.Tensor:
    return torch.arange(n * 6, dtype=F64).reshape(n, *shape).cos()


def logp(n: int = B) -> torch.Tensor:
    return -torch.linspace(1.0, 2.0, n, dtype=F64)


def dpo(**kw):
    args = dict(err_w=err(), err_l=err(), ref_err_w=err(), ref_err_l=err())
    beta = kw.pop("beta", 5000.0)
    args.update(kw)
    return dpo_loss(args["err_w"], args["err_l"], args["ref_err_w"], args["ref_err_l"], beta=beta)


def spin(**kw):
    args = dict(err_real=err(), err_generated=err(), opp_err_real=err(), opp_err_generated=err())
    beta = kw.pop("beta", 5000.0)
    args.update(kw)
    return spin_loss(args["err_real"], args["err_generated"], args["opp_err_real"], args["opp_err_generated"], beta=beta)


def kto(**kw):
    args = dict(err_model=err(), err_ref=err(), desirable=labels())
    for k in list(kw):
        if k in args:
            args[k] = kw.pop(k)
    return kto_loss(args["err_model"], args["err_ref"], args["desirable"], **kw)


def bce(**kw):
    args = dict(err_model=err(), desirable=labels())
    for k in list(kw):
        if k in args:
            args[k] = kw.pop(k)
    return bce_loss(args["err_model"], args["desirable"], **kw)


def contrast(**kw):
    args = dict(err_w=err(), err_l=err(), ref_err_w=err(), ref_err_l=err(), emb_w=emb(), emb_l=emb())
    for k in list(kw):
        if k in args:
            args[k] = kw.pop(k)
    names = ("err_w", "err_l", "ref_err_w", "ref_err_l", "emb_w", "emb_l")
    return contrast_loss(*(args[n] for n in names), **kw)


def dspo(**kw):
    args = dict(pred_w=pred(), ref_pred_w=pred() + 0.1, target_w=pred() * 0.5, err_l=err(), ref_err_l=err())
    for k in list(kw):
        if k in args:
            args[k] = kw.pop(k)
    names = ("pred_w", "ref_pred_w", "target_w", "err_l", "ref_err_l")
    return dspo_loss(*(args[n] for n in names), **kw)


def spo(**kw):
    args = dict(logp_w=logp(), ref_logp_w=logp(), logp_l=logp(), ref_logp_l=logp())
    for k in list(kw):
        if k in args:
            args[k] = kw.pop(k)
    names = ("logp_w", "ref_logp_w", "logp_l", "ref_logp_l")
    return spo_loss(*(args[n] for n in names), **kw)


def case(call, *names, id):
    return pytest.param(call, names, id=id)


BAD_INPUTS = [
    # --- per_sample_mse / implicit_reward / gaussian_step_log_prob ---
    case(lambda: per_sample_mse(pred(), pred(shape=(3, 2))), "pred", "target", id="per_sample_mse-shape-mismatch"),
    case(lambda: per_sample_mse(pred(), pred(n=B + 1)), "pred", "target", id="per_sample_mse-batch-mismatch"),
    case(lambda: per_sample_mse(torch.tensor(1.0), torch.tensor(1.0)), "pred", id="per_sample_mse-no-batch-dim"),
    case(lambda: implicit_reward(col(), err(), 1.0), "err_model", id="implicit_reward-2d-err_model"),
    case(lambda: implicit_reward(err(), err(B + 1), 1.0), "err_model", "err_ref", id="implicit_reward-batch-mismatch"),
    case(lambda: implicit_reward(err(), err(), -1.0), "beta", id="implicit_reward-negative-beta"),
    case(
        lambda: gaussian_step_log_prob(pred(), pred(n=B + 1), torch.tensor(0.5, dtype=F64)),
        "sample", "mean", id="gaussian_step_log_prob-shape-mismatch",
    ),
    case(
        lambda: gaussian_step_log_prob(pred(), pred(), torch.tensor(0.0, dtype=F64)),
        "std", id="gaussian_step_log_prob-zero-std",
    ),
    case(
        lambda: gaussian_step_log_prob(pred(), pred(), torch.tensor(-0.5, dtype=F64)),
        "std", id="gaussian_step_log_prob-negative-std",
    ),
    # --- sft / csft ---
    case(lambda: sft_loss(col()), "err_model", id="sft-2d-err_model"),
    case(lambda: sft_loss(err(), weight=torch.ones(B + 1, dtype=F64)), "weight", id="sft-weight-length"),
    case(lambda: csft_prompts(["a", "b", "c"], [True, False]), "prompts", "desirable", id="csft-length-mismatch"),
    case(lambda: csft_prompts(["a", "b"], [0.3, 1.0]), "desirable", id="csft-float-label"),
    case(lambda: csft_prompts(["a", "b"], torch.tensor([2, 0])), "desirable", id="csft-int-label-2"),
    # --- bce ---
    case(lambda: bce(err_model=col()), "err_model", id="bce-2d-err_model"),
    case(lambda: bce(desirable=labels(B - 1)), "desirable", "err_model", id="bce-label-length"),
    case(lambda: bce(desirable=torch.tensor([0.3, 1.0, 0.0], dtype=F64)), "desirable", id="bce-float-label-0.3"),
    case(lambda: bce(desirable=torch.tensor([2, 0, 1])), "desirable", id="bce-int-label-2"),
    case(lambda: bce(err_ref=err(B + 1)), "err_ref", "err_model", id="bce-err_ref-length"),
    case(lambda: bce(beta=0.0), "beta", id="bce-zero-beta"),
    case(lambda: bce(beta=-1.0), "beta", id="bce-negative-beta"),
    # --- dpo ---
    *[case(lambda n=n: dpo(**{n: col()}), n, id=f"dpo-2d-{n}") for n in ("err_w", "err_l", "ref_err_w", "ref_err_l")],
    case(lambda: dpo(err_l=err(B - 1)), "err_w", "err_l", id="dpo-batch-mismatch-err_l"),
    case(lambda: dpo(ref_err_w=err(B + 1)), "err_w", "ref_err_w", id="dpo-batch-mismatch-ref_err_w"),
    case(lambda: dpo(ref_err_l=err(B + 1)), "err_l", "ref_err_l", "err_w", id="dpo-batch-mismatch-ref_err_l"),
    case(lambda: dpo(beta=0.0), "beta", id="dpo-zero-beta"),
    case(lambda: dpo(beta=-5000.0), "beta", id="dpo-negative-beta"),
    case(
        lambda: dpo(err_w=err(0), err_l=err(0), ref_err_w=err(0), ref_err_l=err(0)),
        "err_w", "err_l", "ref_err_w", "ref_err_l", id="dpo-empty-batch",
    ),
    # --- kto ---
    case(lambda: kto(err_model=col()), "err_model", id="kto-2d-err_model"),
    case(lambda: kto(err_ref=err(B + 1)), "err_ref", "err_model", id="kto-err_ref-length"),
    case(lambda: kto(desirable=labels(B - 1)), "desirable", "err_model", id="kto-label-length"),
    case(lambda: kto(desirable=torch.tensor([0.3, 1.0, 0.0], dtype=F64)), "desirable", id="kto-float-label-0.3"),
    case(lambda: kto(desirable=torch.tensor([2, 0, 1])), "desirable", id="kto-int-label-2"),
    case(lambda: kto(desirable=torch.tensor([-1, 0, 1])), "desirable", id="kto-int-label-minus-1"),
    case(lambda: kto(beta=0.0), "beta", id="kto-zero-beta"),
    case(lambda: kto(beta=-1.0), "beta", id="kto-negative-beta"),
    case(lambda: kto(utility="prospect"), "utility", id="kto-unknown-utility"),
    case(lambda: kto(reference_point="mean"), "reference_point", id="kto-unknown-reference_point"),
    case(lambda: kto(reference_point=err(B + 1)), "reference_point", id="kto-reference_point-wrong-shape"),
    case(lambda: kto(lambda_d=-1.0), "lambda_d", id="kto-negative-lambda_d"),
    case(lambda: kto(lambda_u=-1.0), "lambda_u", id="kto-negative-lambda_u"),
    # --- spin ---
    case(lambda: spin(err_real=col()), "err_real", id="spin-2d-err_real"),
    case(lambda: spin(opp_err_generated=err(B + 1)), "opp_err_generated", "err_generated", "err_real",
         id="spin-batch-mismatch"),
    case(lambda: spin(beta=0.0), "beta", id="spin-zero-beta"),
    # --- contrast ---
    case(lambda: contrast_weights(err(), emb(), tau=0.5), "emb_w", id="contrast_weights-1d-emb_w"),
    case(lambda: contrast_weights(emb(), emb(B + 1), tau=0.5), "emb_w", "emb_l", id="contrast_weights-row-mismatch"),
    case(lambda: contrast_weights(emb(), emb(d=5), tau=0.5), "emb_w", "emb_l", id="contrast_weights-dim-mismatch"),
    case(lambda: contrast_weights(emb(), emb(), tau=0.0), "tau", id="contrast_weights-zero-tau"),
    case(lambda: contrast_weights(emb(), emb(), tau=-0.5), "tau", id="contrast_weights-negative-tau"),
    case(lambda: contrast(emb_w=emb(B + 1), emb_l=emb(B + 1)), "emb_w", "emb_l", "err_w",
         id="contrast-embeddings-not-batch"),
    case(lambda: contrast(err_l=err(B + 1)), "err_w", "err_l", id="contrast-batch-mismatch"),
    case(lambda: contrast(err_w=col()), "err_w", id="contrast-2d-err_w"),
    case(lambda: contrast(tau=0.0), "tau", id="contrast-zero-tau"),
    case(lambda: contrast(beta=0.0), "beta", id="contrast-zero-beta"),
    case(lambda: contrast(beta=-2000.0), "beta", id="contrast-negative-beta"),
    # --- dspo (beta = 0 is valid: see the positive control) ---
    case(lambda: dspo(target_w=pred(shape=(3, 2))), "pred_w", "target_w", id="dspo-target-shape"),
    case(lambda: dspo(ref_pred_w=pred(n=B + 1)), "pred_w", "ref_pred_w", id="dspo-ref_pred-batch"),
    case(lambda: dspo(err_l=err(B + 1)), "err_l", "pred_w", id="dspo-err_l-batch"),
    case(lambda: dspo(ref_err_l=err(B + 1)), "ref_err_l", "err_l", id="dspo-ref_err_l-batch"),
    case(lambda: dspo(err_l=col()), "err_l", id="dspo-2d-err_l"),
    case(lambda: dspo(variant="dspo_x"), "variant", id="dspo-unknown-variant"),
    case(lambda: dspo(beta=-0.001), "beta", id="dspo-negative-beta"),
    case(lambda: dspo(variant="dspo_sdxl", threshold=-0.1), "threshold", id="dspo_sdxl-negative-threshold"),
    case(lambda: dspo(variant="dspo_sdxl", threshold=float("nan")), "threshold", id="dspo_sdxl-nan-threshold"),
    case(lambda: dspo(variant="dspo", threshold=0.5), "threshold", "dspo_sdxl", id="dspo-threshold-without-sdxl"),
    # --- spo ---
    case(lambda: spo(logp_w=col()), "logp_w", id="spo-2d-logp_w"),
    case(lambda: spo(ref_logp_l=logp(B + 1)), "logp_l", "ref_logp_l", "logp_w", id="spo-batch-mismatch"),
    case(lambda: spo(beta=0.0), "beta", id="spo-zero-beta"),
    case(lambda: spo(beta=-10.0), "beta", id="spo-negative-beta"),
    case(lambda: spo(clip=0.0), "clip", id="spo-zero-clip"),
    case(lambda: spo(clip=-0.1), "clip", id="spo-negative-clip"),
    case(lambda: spo(clip=1.0), "clip", id="spo-clip-one"),
]


@pytest.mark.parametrize("call,names", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(call, names):
    with pytest.raises(ValueError) as excinfo:
        call()
    message = str(excinfo.value)
    assert any(name in message for name in names), f"message {message!r} names none of {names}"


GOOD_INPUTS = [
    pytest.param(lambda: per_sample_mse(pred(), pred() * 0.5), id="per_sample_mse"),
    pytest.param(lambda: implicit_reward(err(), err(), 1.0), id="implicit_reward"),
    pytest.param(lambda: gaussian_step_log_prob(pred(), pred(), torch.tensor(0.5, dtype=F64)), id="gaussian"),
    pytest.param(lambda: sft_loss(err(), weight=torch.tensor([1.0, 0.0, 1.0], dtype=F64)), id="sft"),
    pytest.param(lambda: csft_prompts(["a", "b"], [True, False]), id="csft"),
    pytest.param(lambda: bce(), id="bce-default-beta"),
    pytest.param(lambda: bce(err_ref=err(), beta=2.0), id="bce-with-ref"),
    pytest.param(lambda: dpo(), id="dpo"),
    pytest.param(lambda: kto(reference_point=err()), id="kto-per-sample-reference"),
    pytest.param(lambda: kto(reference_point=torch.tensor(0.1, dtype=F64)), id="kto-scalar-reference"),
    pytest.param(lambda: spin(), id="spin"),
    pytest.param(lambda: contrast_weights(emb(), emb(), tau=0.01), id="contrast_weights"),
    pytest.param(lambda: contrast(), id="contrast"),
    pytest.param(lambda: contrast(weights_inside=True), id="contrast-inside"),
    *[pytest.param(lambda v=v: dspo(variant=v, beta=0.0), id=f"dspo-{v}-zero-beta") for v in ("dspo", "dspo_e")],
    pytest.param(lambda: dspo(variant="dspo_ref"), id="dspo_ref"),
    pytest.param(lambda: dspo(variant="dspo_sdxl", beta=5000.0), id="dspo_sdxl"),
    pytest.param(lambda: dspo(variant="dspo_sdxl", threshold=0.0), id="dspo_sdxl-zero-threshold"),
    pytest.param(lambda: spo(), id="spo"),
    pytest.param(lambda: kto(desirable=torch.tensor([1, 0, 1])), id="kto-int-01-labels"),
    pytest.param(lambda: bce(desirable=torch.tensor([1, 0, 1])), id="bce-int-01-labels"),
]


@pytest.mark.parametrize("call", GOOD_INPUTS)
def test_valid_inputs_do_not_raise(call):
    out = call()
    value = out.loss if hasattr(out, "loss") else out
    if isinstance(value, torch.Tensor):
        assert bool(torch.isfinite(value).all())


@pytest.mark.parametrize("fn", ["kto", "bce"])
def test_integer_zero_one_labels_mean_the_same_as_booleans(fn):
    call = kto if fn == "kto" else bce
    kwargs = dict(err_ref=torch.tensor([0.05, 0.6, 0.3], dtype=F64), beta=10.0)  # rewards of both signs

    def loss(desirable):
        return call(desirable=desirable, **kwargs).loss

    as_bool, as_int = torch.tensor([True, False, True]), torch.tensor([1, 0, 1])
    torch.testing.assert_close(loss(as_int), loss(as_bool), rtol=0, atol=0)
    assert float(loss(~as_bool)) != float(loss(as_bool))  # the labels really change the loss


@pytest.mark.parametrize("std_shape,fits", [((), True), ((4, 1), True), ((1, 3), True), ((4, 3), True), ((3,), True),
                                            ((4,), False), ((2, 3), False), ((4, 3, 1), False), ((1, 4, 3), False)])
def test_gaussian_std_must_broadcast_to_the_sample(std_shape, fits):
    """The hand-written broadcast check agrees with torch.broadcast_shapes(std, sample) == sample.shape."""
    sample = torch.zeros(4, 3, dtype=F64)
    std = torch.full(std_shape, 0.5, dtype=F64)
    try:
        expected = torch.broadcast_shapes(std.shape, sample.shape) == sample.shape
    except RuntimeError:
        expected = False
    assert expected == fits
    if fits:
        assert gaussian_step_log_prob(sample, sample, std).shape == (4,)
    else:
        with pytest.raises(ValueError, match="does not broadcast"):
            gaussian_step_log_prob(sample, sample, std)
