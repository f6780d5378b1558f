"""The toy's rectified-flow model (toy/flow.py, ``python -m toy --flow``): its pieces checked against what they
stand for, and one short run that shows pretraining and DPO doing what docs/toy.md says.

Budget: ~15 s on one core (one ``--flow --quick --methods sft,dpo`` run in a subprocess, ~4 s; unit checks).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minipref
from toy.cli import main
from toy.context import FineTuneContext
from toy.data import DESIRABLE, PRETRAIN, Gaussian2D, PreferenceData
from toy.evaluate import ceiling_margin
from toy.flow import (
    EulerSampler, FlowSchedule, VelocityMLP, euler_grid, euler_std_factor, flow_method_names, noise_equivalent_error,
    velocity_target,
)
from toy.methods import METHODS, pair_forward, row_loss
from toy.model import denoising_error
from toy.run import RunConfig

REPO = Path(__file__).resolve().parents[1]


def test_noising_and_the_velocity_target_at_the_endpoints():
    g = torch.Generator().manual_seed(0)
    schedule = FlowSchedule()
    x0, eps = DESIRABLE.sample(64, g), torch.randn(64, 2, generator=g)
    first, last = torch.zeros(64, dtype=torch.long), torch.full((64,), 999)
    # the table runs from s = 0.001 (index 0) to s = 1 (index 999), pure noise
    assert schedule.sigmas[0].item() == pytest.approx(0.001) and schedule.sigmas[-1].item() == 1.0
    assert torch.equal(schedule.add_noise(x0, eps, last), eps)  # s = 1: x_s is the noise, bit for bit
    v = velocity_target(x0, eps)
    torch.testing.assert_close(schedule.add_noise(x0, eps, first), x0 + 0.001 * v)  # s -> 0: x_s -> x0
    # v = d x_s / ds at every s (central difference; x_s is linear in s, so only rounding remains)
    for s in (1e-3, 0.5, 1 - 1e-3):
        h = 1e-3
        dx = ((1 - s - h) * x0.double() + (s + h) * eps.double() - (1 - s + h) * x0.double() - (s - h) * eps.double())
        torch.testing.assert_close(dx / (2 * h), v.double())
    # x0 = x_s - s v and eps = x_s + (1 - s) v at every index
    t = torch.randint(0, 1000, (64,), generator=g)
    x_s, s = schedule.add_noise(x0, eps, t), schedule.sigma(t, x0)
    torch.testing.assert_close(x_s - s * v, x0)
    torch.testing.assert_close(x_s + (1 - s) * v, eps)


def test_the_noise_equivalent_error_is_full_flows_and_the_implied_noise_error():
    from full.models import flow  # diffusers inside; toy/ itself never imports full/

    g = torch.Generator().manual_seed(1)
    err_v, s = torch.rand(256, generator=g, dtype=torch.float64), torch.rand(256, generator=g, dtype=torch.float64)
    torch.testing.assert_close(noise_equivalent_error(err_v, s), flow.noise_equivalent_error(err_v, s), rtol=0, atol=0)
    # the weight is 0 at pure noise (any velocity implies the right noise) and 1 at the data
    assert noise_equivalent_error(torch.tensor(3.0), torch.tensor(1.0)) == 0
    assert noise_equivalent_error(torch.tensor(3.0), torch.tensor(0.0)) == 3.0
    # what the objectives get from toy.model.denoising_error on a FlowSchedule: (1 - s)^2 err_v, and the implied noise
    # x_s + (1 - s) v_theta, whose plain error against eps is that same number
    torch.manual_seed(0)
    model, schedule = VelocityMLP(hidden=32, depth=1), FlowSchedule()
    x0, eps, t = PRETRAIN.sample(512, g), torch.randn(512, 2, generator=g), torch.randint(0, 1000, (512,), generator=g)
    err, eps_pred = denoising_error(model, schedule, x0, t, eps)
    err_v, v_pred, x_s = schedule.velocity_error(model, x0, t, eps)
    s = schedule.sigmas[t]
    torch.testing.assert_close(err, (1 - s) ** 2 * err_v)
    torch.testing.assert_close(err_v, flow.velocity_error(v_pred, x0, eps))
    torch.testing.assert_close(eps_pred, flow.noise_from_velocity(x_s, v_pred, s))
    torch.testing.assert_close(err, minipref.per_sample_mse(eps_pred, eps), rtol=1e-4, atol=1e-6)


class ExactVelocity(torch.nn.Module):
    """The exact velocity field of ``N(mu, std^2 I)``: ``v(x, s) = -mu + (m' / m)(x - (1 - s) mu)`` with
    ``m(s)^2 = (1 - s)^2 std^2 + s^2`` (toy.flow.euler_std_factor derives it)."""

    def __init__(self, gaussian: Gaussian2D, schedule: FlowSchedule):
        super().__init__()
        self.gaussian, self.schedule = gaussian, schedule

    def forward(self, x, t, cond=None):
        s, mu, var = self.schedule.sigma(t, x).double(), self.gaussian.mean_tensor(torch.float64), self.gaussian.var
        m2 = (1 - s) ** 2 * var + s**2
        return (-mu + (s - (1 - s) * var) / m2 * (x.double() - (1 - s) * mu)).float()


@pytest.mark.parametrize("gaussian", [DESIRABLE, PRETRAIN])
@pytest.mark.parametrize("steps, shift", [(100, 1 / 3), (25, 1.0)])
def test_euler_maps_noise_to_the_data_gaussian_as_derived(gaussian, steps, shift):
    # Euler with the exact field moves the mean exactly and multiplies the std by euler_std_factor (a product over
    # the grid, derived in toy/flow.py). So the sampled mean must be within 4 standard errors (std / sqrt n) of mu,
    # and the sampled std within 4 standard errors (std / sqrt(2 n)) of std * factor. The 25-step unshifted grid is
    # there to show the derivation is the reason, not the tolerance: its factor is 0.83 / 0.90, and the samples agree.
    n, schedule = 20000, FlowSchedule()
    sampler = EulerSampler(schedule, steps, shift)
    factor = euler_std_factor(gaussian.std, sampler.sigmas)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(2))
    points = sampler.sample(ExactVelocity(gaussian, schedule), noise)
    se_mean, se_std = gaussian.std / math.sqrt(n), gaussian.std / math.sqrt(2 * n)
    torch.testing.assert_close(points.mean(0), gaussian.mean_tensor(), atol=4 * se_mean, rtol=0)
    torch.testing.assert_close(points.std(0), torch.full((2,), gaussian.std * factor), atol=4 * se_std, rtol=0)
    if (steps, shift) == (100, 1 / 3):  # the toy's sampler: under 2% short of the data's std
        assert 0.98 < factor < 1
    else:
        assert factor < 0.91


def test_the_toys_euler_grid_runs_from_pure_noise_to_the_data_on_table_entries():
    index, sigmas = euler_grid()
    assert index[0] == 999 and sigmas[0] == 1 and sigmas[-1] == 0 and len(index) == 100
    assert torch.all(index[1:] < index[:-1])  # strictly down, every entry a training timestep
    torch.testing.assert_close(sigmas[:-1], (index + 1).float() / 1000)


def test_dpo_at_the_reference_is_log_2_with_flow_errors():
    # Through the toy's own DPO step (pair_forward -> denoising_error -> FlowSchedule, the row's adapter)
    torch.manual_seed(0)
    reference = VelocityMLP(hidden=32, depth=1).requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    ctx = FineTuneContext(METHODS["dpo"], policy, reference, FlowSchedule(), EulerSampler(), None,
                          PreferenceData.draw(64, g), g)
    errors = pair_forward(ctx, ctx.data.desirable[:32], ctx.data.undesirable[:32])
    out = row_loss(ctx, errors)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(errors.err, errors.ref_err)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())  # it still trains


def test_spo_is_refused_on_the_flow_toy_with_one_line(tmp_path, capsys):
    assert "spo" not in flow_method_names(None) and set(flow_method_names(None)) == set(METHODS) - {"spo"}
    assert all(spec.name != "spo" for spec in RunConfig(out=tmp_path, flow=True).method_specs())
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--flow", "--methods", "dpo,spo"])
    complaint = capsys.readouterr().err
    assert "spo cannot run on the flow toy: SPO scores the log-density of stochastic sampler steps" in complaint


def rectified_flow_optimum(var: float, T: int = 1000) -> float:
    """The lowest velocity loss on ``N(mu, var I)`` with ``s`` uniform on the table: per coordinate,
    ``E_s Var(v | x_s) = E_s [1 + var - (s - (1 - s) var)^2 / ((1 - s)^2 var + s^2)]``."""
    s = (np.arange(T) + 1) / T
    return float(np.mean(1 + var - (s - (1 - s) * var) ** 2 / ((1 - s) ** 2 * var + s**2)))


def test_quick_flow_run_pretrains_and_dpo_moves_the_samples(tmp_path):
    out = tmp_path / "flow"
    result = subprocess.run(
        [sys.executable, "-m", "toy", "--flow", "--quick", "--methods", "sft,dpo", "--workers", "1", "--no_progress",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"].startswith("rectified flow") and metrics["skipped"] == {}
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Pretraining: the mean velocity loss of the first 50 steps (0.87 measured) falls to within 0.02 of the exact
    # optimum on the pretraining Gaussian (0.3137; the last 50 steps measured 0.3175 at seed 0, --quick), and not
    # below it by more than 0.02 (a 50-step mean of 512-sample batches moves by ~0.002).
    pre, optimum = metrics["pretrain"], rectified_flow_optimum(PRETRAIN.var)
    assert pre["first_loss"] > 2 * pre["final_loss"]
    assert abs(pre["final_loss"] - optimum) < 0.02
    ref, sft, dpo = (metrics["methods"][k] for k in ("reference", "sft", "dpo"))
    # SFT learns the desirable Gaussian (0.30 -> 0.80 in the desirable disc, seed 0)
    assert sft["desirable_frac"] > ref["desirable_frac"] + 0.3
    # DPO raises the preferred log-density ratio, linear in y (docs/toy.md), as on the diffusion toy: mean y moved
    # by 0.096, 0.090, 0.062 over seeds 0, 1, 2 (--quick) and the undesirable fraction fell by 0.051, 0.041, 0.075.
    # Thresholds: half the smallest of each, and > 2.5 standard errors of a difference of two 1000-sample estimates
    # (0.0085 for mean y, 0.016 for a fraction near 0.15).
    assert dpo["mean"][1] > ref["mean"][1] + 0.03
    assert dpo["undesirable_frac"] < ref["undesirable_frac"] - 0.02
    assert 0.6 < dpo["pairwise_implicit_acc"] <= ceiling_margin(metrics["eval"]["pairs"])
