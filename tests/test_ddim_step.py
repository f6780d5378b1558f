"""Parity: minipref.ddim_step_gaussian is exactly the step diffusers' DDIMScheduler takes (the one SPO samples)."""

import pytest
import torch
from diffusers import DDIMScheduler

from minipref import ddim_step_gaussian, gaussian_step_log_prob


def make_scheduler(prediction_type: str, steps: int = 20, set_alpha_to_one: bool = False) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type,
        timestep_spacing="leading", steps_offset=1,
    )
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_gaussian_matches_diffusers_step(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    gen = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[::3]:
        x_t = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
        out = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
        z = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
        prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        abar_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        mean, std = ddim_step_gaussian(
            out, x_t, scheduler.alphas_cumprod[int(t)].item(), abar_prev.item(), eta=eta, prediction_type=prediction_type
        )
        expected = scheduler.step(out, t, x_t, eta=eta, variance_noise=z).prev_sample
        # diffusers keeps alphas_cumprod and its scalar step terms in float32, hence float32 tolerances; a wrong
        # formula (a missing sqrt, eta in the wrong place, eps instead of v) is off by O(1).
        torch.testing.assert_close(mean + std * z, expected, rtol=1e-5, atol=2e-6)


def test_last_step_the_spo_authors_clamp_equals_final_alpha_cumprod_only_without_set_alpha_to_one():
    """SPO's ddim_with_logprob clamps the previous timestep at 0 (alphas_cumprod[0]); diffusers uses
    final_alpha_cumprod. SD1.5's and SDXL's scheduler configs set set_alpha_to_one = false (the value this test
    builds): then the two agree and the last step is a proper Gaussian. With true the last step is deterministic."""
    clamped = make_scheduler("epsilon")
    last = int(clamped.timesteps[-1])
    prev = last - clamped.config.num_train_timesteps // clamped.num_inference_steps
    assert (last, prev) == (1, -49)  # 20 leading steps with steps_offset 1 end at t = 1
    abar_t, authors_prev = clamped.alphas_cumprod[last].item(), clamped.alphas_cumprod[max(prev, 0)].item()
    assert clamped.final_alpha_cumprod.item() == authors_prev
    x_t, out = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    mean, std = ddim_step_gaussian(out, x_t, abar_t, authors_prev)
    assert bool((std > 0).all()) and bool(torch.isfinite(gaussian_step_log_prob(mean, mean, std)).all())

    to_one = make_scheduler("epsilon", set_alpha_to_one=True)
    assert to_one.final_alpha_cumprod.item() == 1.0 != authors_prev
    mean, std = ddim_step_gaussian(out, x_t, abar_t, to_one.final_alpha_cumprod.item())
    assert bool((std == 0).all())
    with pytest.raises(ValueError, match="std"):
        gaussian_step_log_prob(mean, mean, std)


def test_ddim_step_gaussian_per_sample_alphas_and_log_prob_gradient():
    abar_t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    abar_prev = torch.tensor([0.5, 0.9], dtype=torch.float64)
    x_t = torch.randn(2, 5, dtype=torch.float64)
    eps = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    mean, std = ddim_step_gaussian(eps, x_t, abar_t, abar_prev)
    assert std.shape == (2, 1)
    for i in range(2):  # each row equals the scalar-alpha step of that row
        m_i, s_i = ddim_step_gaussian(eps[i : i + 1], x_t[i : i + 1], abar_t[i].item(), abar_prev[i].item())
        torch.testing.assert_close(mean[i : i + 1], m_i)
        torch.testing.assert_close(std[i : i + 1], s_i)
    x_prev = (mean + std * torch.randn_like(mean)).detach()
    gaussian_step_log_prob(x_prev, mean, std).sum().backward()
    assert eps.grad is not None and bool(eps.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(alpha_bar_t=0.5, alpha_bar_prev=0.4), "alpha_bar"),
        (dict(alpha_bar_t=0.5, alpha_bar_prev=0.9, eta=0.0), "eta"),
        (dict(alpha_bar_t=0.5, alpha_bar_prev=0.9, prediction_type="sample"), "prediction_type"),
    ],
)
def test_ddim_step_gaussian_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ddim_step_gaussian(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)


def test_ddim_step_gaussian_rejects_alphas_of_the_wrong_batch_size():
    with pytest.raises(ValueError, match="alpha_bar_t"):
        ddim_step_gaussian(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.3, 0.4, 0.5]), 0.9)
