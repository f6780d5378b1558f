"""docs/adding_a_method.md, proven: a new paired objective is a few lines of loss plus one row of the method table,
registered at run time, and then trains end to end through `full.train` on the tiny SD1.5 (with a preset, its own
option as a flag, a model card) and through the toy, without any other file knowing its name.

The objective is a made-up "squared margin" loss, `mean((beta/2 * margin_of_errors - target)^2)` (IPO's shape with
a target of our choosing): not a method of the papers, only a method none of the code has seen.
"""

from __future__ import annotations

import json

import pytest
import torch

import minipref
from minipref.dpo import pair_metrics
from tests.conftest import train_argv

NAME = "squared_margin"


def squared_margin_loss(err_w, err_l, ref_err_w, ref_err_l, *, beta: float = 5000.0, target: float = 1.0):
    """The new loss file's whole content: a margin from the four per-sample errors, and its squared distance to
    ``target``."""
    reward_w = minipref.implicit_reward(err_w, ref_err_w, beta)
    reward_l = minipref.implicit_reward(err_l, ref_err_l, beta)
    margin = reward_w - reward_l
    loss = ((margin - target) ** 2).mean()
    return minipref.LossOutput(loss, pair_metrics(loss, margin, reward_w, reward_l, err_w, err_l, ref_err_w,
                                                  ref_err_l))


@pytest.fixture
def new_method():
    """The table entry (and the OBJECTIVES entry of the new loss), removed again after the test."""
    row = minipref.Method(
        NAME, NAME,
        loss=lambda e, options, beta, batch: squared_margin_loss(*e.pairs(), beta=beta, target=options["margin_target"]),
        options=(minipref.Option("margin_target", 1.0, "the margin the loss pulls every pair to", low=0.0,
                                 low_open=True),))
    minipref.register(row, minipref.Objective(NAME, squared_margin_loss, "paired", "a test objective"))
    yield row
    minipref.METHODS.pop(NAME)
    minipref.OBJECTIVES.pop(NAME)


def test_the_loss_is_correct_before_anything_trains_it():
    err_w, err_l, ref = torch.tensor([0.2]), torch.tensor([0.5]), torch.tensor([0.4])
    out = squared_margin_loss(err_w, err_l, ref, ref, beta=10.0, target=1.0)
    assert out.loss.item() == pytest.approx(((-5 * (0.2 - 0.4) + 5 * (0.5 - 0.4)) - 1.0) ** 2)  # margin 1.5


@pytest.mark.slow
def test_a_new_method_trains_through_full_train_with_a_preset(new_method, tiny_sd15, pickapic_parquet, tmp_path,
                                                              capsys):
    from full.trainers import offline

    preset = tmp_path / "sd15-squared_margin.json"
    preset.write_text(json.dumps({
        "name": "sd15-squared_margin", "model_family": "sd15", "method": NAME, "description": "the test method",
        "flags": {"beta": {"value": 100.0, "source": "our choice for the test"},
                  "margin_target": {"value": 2.0, "source": "our choice for the test"}}}))
    argv = train_argv(tiny_sd15, pickapic_parquet, tmp_path / "run", NAME, "--preset", str(preset))
    assert f"--margin_target" in offline.build_parser().format_help()  # its option is a flag, with its help
    summary = offline.main(argv)
    assert summary["global_step"] == 2 and summary["history"][0]["loss"] == pytest.approx(4.0)  # margin 0: 2^2
    lora = summary["unet"]
    assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)  # it trained
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"# {NAME} LoRA" in card and "| `beta` | 100.0 |" in card
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["margin_target"] == 2.0 and args["utility"] is None  # its option used, KTO's not
    with pytest.raises(SystemExit):  # checked at parse time like any row's option
        offline.parse_args(train_argv(tiny_sd15, pickapic_parquet, tmp_path, NAME, "--margin_target", "-1"))
    assert "--margin_target must be in (0.0, inf]" in capsys.readouterr().err


def test_a_new_method_trains_through_the_toy(new_method, tmp_path):
    from toy import methods as toy_methods
    from toy.run import RunConfig, run

    spec = toy_methods.add(toy_methods.MethodSpec(NAME, NAME, toy_methods.PAIRED, 500.0, 1e-3, 600, 256,
                                                  {"margin_target": 1.0}))
    try:
        output = run(RunConfig(out=tmp_path, quick=True, methods=[NAME], progress=False, figures=False, workers=1))
    finally:
        toy_methods.METHODS.pop(NAME)
    metrics = output["methods"][NAME]
    assert metrics["pairwise_implicit_acc"] > 0.6  # it learned the preference, as DPO does on the toy
    assert metrics["mean"] != output["methods"]["reference"]["mean"]
    assert spec.sample_condition is None and spec.row is new_method


def test_every_row_of_the_table_is_in_the_toy_and_the_lab():
    """A method added to the table but not to the toy's or the lab's list fails here, instead of being left out of
    their figures and tables without a word (their lists hold the hyperparameters each arm runs with)."""
    from full.lab.methods import all_methods
    from toy.methods import METHODS as TOY

    assert {spec.method for spec in TOY.values()} == set(minipref.METHODS)
    assert {arm.row for arm in all_methods()} == set(minipref.METHODS)
