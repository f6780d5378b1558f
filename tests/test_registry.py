"""The pinned package surface (docs/conventions.md §6): root exports, the LossOutput contract, and the OBJECTIVES registry."""

from __future__ import annotations

import pytest
import torch

import minipref
from tests.core_helpers import F64

METHODS = {"sft", "csft", "bce", "dpo", "kto", "spin", "contrast", "dspo", "spo"}
DATA_KINDS = {"paired", "binary", "self_play", "online"}
PINNED_NAMES = [
    "per_sample_mse",
    "implicit_reward",
    "sft_loss",
    "csft_prompts",
    "bce_loss",
    "dpo_loss",
    "kto_loss",
    "spin_loss",
    "contrast_weights",
    "contrast_loss",
    "dspo_loss",
    "spo_loss",
    "gaussian_step_log_prob",
    "LossOutput",
    "OBJECTIVES",
    "get_objective",
]


@pytest.mark.parametrize("name", PINNED_NAMES)
def test_pinned_name_is_importable_from_the_package_root(name):
    assert hasattr(minipref, name), f"minipref.{name} missing"


def test_registry_holds_exactly_the_nine_methods():
    assert set(minipref.OBJECTIVES) == METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registry_entry_has_its_name_a_callable_and_an_allowed_data_kind(name):
    entry = minipref.OBJECTIVES[name]
    assert entry.name == name
    assert callable(entry.fn)
    assert entry.data in DATA_KINDS, f"{name}: data kind {entry.data!r} not in {sorted(DATA_KINDS)}"


# The data each method consumes, from the papers: paired preferences, per-image binary feedback,
# self-play against a frozen earlier iterate, or online pairs built during sampling (SPO).
EXPECTED_KIND = {
    "dpo": "paired",
    "contrast": "paired",
    "dspo": "paired",
    "kto": "binary",
    "bce": "binary",
    "csft": "binary",
    "spin": "self_play",
    "spo": "online",
}


@pytest.mark.parametrize("name,kind", sorted(EXPECTED_KIND.items()))
def test_registry_data_kind_matches_the_method(name, kind):
    assert minipref.OBJECTIVES[name].data == kind


def test_sft_trains_on_winners_or_desirable_samples():
    assert minipref.OBJECTIVES["sft"].data in {"paired", "binary"}


@pytest.mark.parametrize(
    "name,fn_name",
    [
        ("sft", "sft_loss"),
        ("bce", "bce_loss"),
        ("dpo", "dpo_loss"),
        ("kto", "kto_loss"),
        ("spin", "spin_loss"),
        ("contrast", "contrast_loss"),
        ("dspo", "dspo_loss"),
        ("spo", "spo_loss"),
    ],
)
def test_registry_entry_points_at_the_root_function(name, fn_name):
    assert minipref.OBJECTIVES[name].fn is getattr(minipref, fn_name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_get_objective_returns_the_registry_entry(name):
    assert minipref.get_objective(name) is minipref.OBJECTIVES[name]


@pytest.mark.parametrize("bad", ["ppo", "", "kto2", "diffusion_dpo"])
def test_get_objective_unknown_name_raises_value_error_listing_valid_names(bad):
    with pytest.raises(ValueError) as excinfo:
        minipref.get_objective(bad)
    message = str(excinfo.value)
    missing = [m for m in sorted(METHODS) if m not in message]
    assert not missing, f"message {message!r} does not list {missing}"


# ----------------------------------------------------------------------------------------------------------
# LossOutput contract: .loss is a scalar tensor that carries the gradient, .metrics is dict[str, float].
# ----------------------------------------------------------------------------------------------------------
def _e(values):
    return torch.tensor(values, dtype=F64, requires_grad=True)


def _calls():
    err_w, err_l = _e([0.3, 0.5, 0.2]), _e([0.4, 0.45, 0.25])
    ref_w, ref_l = torch.tensor([0.31, 0.49, 0.22], dtype=F64), torch.tensor([0.38, 0.47, 0.24], dtype=F64)
    labels = torch.tensor([True, False, True])
    emb = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    pred = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    target = torch.zeros(3, 2, 2, dtype=F64)
    return {
        "sft": (lambda: minipref.sft_loss(err_w), None),
        "bce": (lambda: minipref.bce_loss(err_w, labels, err_ref=ref_w, beta=2.0), None),
        "dpo": (lambda: minipref.dpo_loss(err_w, err_l, ref_w, ref_l, beta=50.0),
                {"implicit_acc", "reward_w", "reward_l", "margin"}),
        "kto": (lambda: minipref.kto_loss(err_w, ref_w, labels, beta=50.0),
                {"kl", "implicit_acc", "reward_desirable", "reward_undesirable"}),
        "spin": (lambda: minipref.spin_loss(err_w, err_l, ref_w, ref_l, beta=50.0), None),
        "contrast": (lambda: minipref.contrast_loss(err_w, err_l, ref_w, ref_l, emb, emb + 0.1, beta=50.0), None),
        "dspo": (lambda: minipref.dspo_loss(pred, pred.detach() + 0.01, target, err_l, ref_l, beta=0.5), None),
        "spo": (lambda: minipref.spo_loss(-err_w, -ref_w, -err_l, -ref_l, beta=10.0), None),
    }


@pytest.mark.parametrize("name", ["sft", "bce", "dpo", "kto", "spin", "contrast", "dspo", "spo"])
def test_loss_output_is_a_differentiable_scalar_with_float_metrics(name):
    call, required = _calls()[name]
    out = call()
    assert isinstance(out, minipref.LossOutput)
    assert isinstance(out.loss, torch.Tensor) and out.loss.dim() == 0
    assert out.loss.requires_grad, "the loss must carry the graph back to its inputs"
    assert isinstance(out.metrics, dict)
    for key, value in out.metrics.items():
        assert isinstance(key, str)
        assert type(value) is float, f"metric {key} is {type(value).__name__}, not a detached float"
    if required:
        assert required <= set(out.metrics), f"missing metrics {required - set(out.metrics)}"


def test_registry_functions_are_pure_same_inputs_same_output():
    calls = _calls()
    first = {name: float(call().loss.detach()) for name, (call, _) in calls.items()}
    second = {name: float(call().loss.detach()) for name, (call, _) in calls.items()}
    assert first == second
