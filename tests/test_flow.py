"""The rectified-flow maths of `full/models/flow.py` (docs/flow_matching.md), as property tests in float64.

Each identity is checked on random tensors at random sigma, and where cheap a deliberately broken variant (a wrong
weight, a wrong sign, the unshifted table) is checked to FAIL the same comparison, so a test that could not fail
would show here. The expected sides are written longhand, or come from diffusers itself (the scripts' sampler).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling

import minipref
from full.models import flow

F64 = torch.float64
SHAPE = (6, 4, 8, 8)  # (B, C, H, W): a batch of small latents
# SD3-style (static shift 3) and FLUX.1-style (dynamic shifting) scheduler configs; nothing is downloaded here
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def random_case(seed: int, shape=SHAPE):
    """Clean latents, noise and one sigma per sample in (0.01, 0.99), float64."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    noise = torch.randn(shape, generator=g, dtype=F64)
    sigmas = 0.01 + 0.98 * torch.rand(shape[0], generator=g, dtype=F64)
    return x0, noise, sigmas, g


def close(a, b, tol=1e-10):
    return torch.allclose(a, b, rtol=tol, atol=tol)


# --- noising, target, and solving back --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_noising_then_solving_from_the_true_velocity_recovers_x0_and_the_noise(seed):
    x0, noise, sigmas, _ = random_case(seed)
    noisy = flow.add_noise(x0, noise, sigmas)
    v = flow.velocity_target(x0, noise)
    assert close(noisy, (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise)
    assert close(flow.x0_from_velocity(noisy, v, sigmas), x0)
    assert close(flow.noise_from_velocity(noisy, v, sigmas), noise)
    assert close(flow.velocity_from_noise(noisy, noise, sigmas), v)
    # broken: the wrong sign in the x0 solve (x0 = x_t + sigma v) does not recover x0
    broken_x0 = noisy + sigmas.view(-1, 1, 1, 1) * v
    assert not close(broken_x0, x0, tol=1e-3)


def test_the_ends_of_the_line_are_the_clean_latent_and_the_noise():
    x0, noise, _, _ = random_case(0)
    ones, zeros = torch.ones(SHAPE[0], dtype=F64), torch.zeros(SHAPE[0], dtype=F64)
    assert close(flow.add_noise(x0, noise, zeros), x0)
    assert close(flow.add_noise(x0, noise, ones), noise)
    with pytest.raises(ValueError, match="sigma < 1"):
        flow.velocity_from_noise(noise, noise, ones)
    with pytest.raises(ValueError, match="sigmas must have shape"):
        flow.add_noise(x0, noise, zeros[:2])


def test_velocity_error_is_the_core_per_sample_mse_against_noise_minus_x0():
    x0, noise, _, g = random_case(1)
    prediction = torch.randn(SHAPE, generator=g, dtype=F64)
    err = flow.velocity_error(prediction, x0, noise)
    assert err.shape == (SHAPE[0],)
    assert close(err, ((prediction - (noise - x0)) ** 2).mean(dim=(1, 2, 3)))
    # broken: the x0 - noise sign convention gives another number
    assert not close(err, minipref.per_sample_mse(prediction, x0 - noise), tol=1e-3)


# --- the weight per timestep --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_for_a_noise_predicting_model_the_noise_error_is_one_minus_sigma_squared_times_the_velocity_error(seed):
    x0, noise, sigmas, g = random_case(seed)
    noisy = flow.add_noise(x0, noise, sigmas)
    noise_prediction = noise + 0.3 * torch.randn(SHAPE, generator=g, dtype=F64)  # an imperfect eps-model
    velocity_prediction = flow.velocity_from_noise(noisy, noise_prediction, sigmas)  # the same prediction, as v
    err_eps = minipref.per_sample_mse(noise_prediction, noise)
    err_v = flow.velocity_error(velocity_prediction, x0, noise)
    assert close(err_eps, (1 - sigmas) ** 2 * err_v)
    assert close(flow.noise_error_weight(sigmas), (1 - sigmas) ** 2)
    assert close(flow.noise_equivalent_error(err_v, sigmas), err_eps)
    # broken weights: (1 - sigma) and sigma^2 (the x0-error weight) do not relate the two errors
    assert not close(err_eps, (1 - sigmas) * err_v, tol=1e-3)
    assert not close(err_eps, sigmas ** 2 * err_v, tol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_the_dpo_margin_from_velocity_errors_is_the_eps_margin_with_beta_times_the_weight(seed):
    """I: r_w - r_l in eps form (SD beta) = -(beta (1-sigma)^2 / 2)[(ev_w - evr_w) - (ev_l - evr_l)] in v form."""
    x0_w, noise, sigmas, g = random_case(seed)
    x0_l = torch.randn(SHAPE, generator=g, dtype=F64)
    beta = 20.0  # small enough that the losses are O(1) here, not saturated (the identity holds at any beta)
    # model and reference predict noise (imperfectly); winner and loser share sigma and noise (conventions §3)
    eps = {k: noise + s * torch.randn(SHAPE, generator=g, dtype=F64)
           for k, s in (("w", 0.2), ("l", 0.4), ("ref_w", 0.3), ("ref_l", 0.3))}
    x0 = {"w": x0_w, "l": x0_l, "ref_w": x0_w, "ref_l": x0_l}
    err_eps = {k: minipref.per_sample_mse(eps[k], noise) for k in eps}
    err_v = {k: flow.velocity_error(flow.velocity_from_noise(flow.add_noise(x0[k], noise, sigmas), eps[k], sigmas),
                                    x0[k], noise) for k in eps}

    eps_margin = (minipref.implicit_reward(err_eps["w"], err_eps["ref_w"], beta)
                  - minipref.implicit_reward(err_eps["l"], err_eps["ref_l"], beta))
    beta_t = beta * flow.noise_error_weight(sigmas)
    flow_margin = -(beta_t / 2) * ((err_v["w"] - err_v["ref_w"]) - (err_v["l"] - err_v["ref_l"]))
    assert close(flow_margin, eps_margin, tol=1e-8)

    # through the unchanged core: dpo_loss on noise-equivalent velocity errors at the SD beta = eps-form DPO
    equivalent = {k: flow.noise_equivalent_error(err_v[k], sigmas) for k in err_v}
    loss_eps = minipref.dpo_loss(err_eps["w"], err_eps["l"], err_eps["ref_w"], err_eps["ref_l"], beta=beta).loss
    loss_flow = minipref.dpo_loss(equivalent["w"], equivalent["l"], equivalent["ref_w"], equivalent["ref_l"],
                                  beta=beta).loss
    assert close(loss_flow, loss_eps, tol=1e-10)
    assert close(loss_flow, F.softplus(-flow_margin).mean(), tol=1e-10)
    # broken: raw velocity errors at the same constant beta (Flow-DPO with constant beta) is another objective
    raw_margin = -(beta / 2) * ((err_v["w"] - err_v["ref_w"]) - (err_v["l"] - err_v["ref_l"]))
    loss_raw = minipref.dpo_loss(err_v["w"], err_v["l"], err_v["ref_w"], err_v["ref_l"], beta=beta).loss
    assert not close(raw_margin, eps_margin, tol=1e-3) and not close(loss_raw, loss_eps, tol=1e-3)


def test_dpo_at_the_reference_is_log_2_with_flow_errors():
    x0, noise, sigmas, g = random_case(7)
    err = flow.noise_equivalent_error(flow.velocity_error(torch.randn(SHAPE, generator=g, dtype=F64), x0, noise),
                                      sigmas)
    err_l = err.flip(0)
    assert close(minipref.dpo_loss(err, err_l, err, err_l, beta=5000.0).loss, torch.tensor(math.log(2), dtype=F64))


def test_the_elbo_weight_is_minus_half_the_log_snr_slope_times_the_noise_weight():
    sigmas = torch.linspace(0.02, 0.98, 49, dtype=F64).requires_grad_(True)
    (slope,) = torch.autograd.grad(flow.log_snr(sigmas).sum(), sigmas)
    expected = -0.5 * slope * flow.noise_error_weight(sigmas)
    assert close(flow.elbo_velocity_weight(sigmas.detach()), expected.detach())
    # broken: forgetting the (1 - sigma)^2 conversion leaves the eps-form weight 1/(sigma(1-sigma))
    assert not close(flow.elbo_velocity_weight(sigmas.detach()), (-0.5 * slope).detach(), tol=1e-3)


# --- timestep sampling as the diffusers scripts draw it ------------------------------------------------------------


def script_draw(scheduler_config, sampling, batch_size, generator):
    """The scripts' lines, transcribed: u, indices, timesteps, then `get_sigmas` (lookup by equal timestep)."""
    schedule = flow.training_schedule(scheduler_config)
    u = compute_density_for_timestep_sampling(weighting_scheme=sampling.weighting_scheme, batch_size=batch_size,
                                              logit_mean=sampling.logit_mean, logit_std=sampling.logit_std,
                                              mode_scale=sampling.mode_scale, generator=generator)
    indices = (u * schedule.config.num_train_timesteps).long()
    timesteps = schedule.timesteps[indices]
    step_indices = [(schedule.timesteps == t).nonzero().item() for t in timesteps]
    return timesteps, schedule.sigmas[step_indices].flatten()


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the two empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / a.numel()
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / b.numel()
    return float((cdf_a - cdf_b).abs().max())


@pytest.mark.parametrize("config,sampling", [(SD3_SCHEDULER, flow.SD3_SCRIPT_SAMPLING),
                                             (FLUX_SCHEDULER, flow.FLUX_SCRIPT_SAMPLING),
                                             (SD3_SCHEDULER, flow.TimestepSampling("mode"))])
def test_timesteps_are_the_scripts_draws_exactly_and_in_distribution(config, sampling):
    schedule = flow.training_schedule(config)
    ours_t, ours_s = flow.sample_timesteps(schedule, 64, sampling, torch.Generator().manual_seed(3))
    script_t, script_s = script_draw(config, sampling, 64, torch.Generator().manual_seed(3))
    assert torch.equal(ours_t, script_t) and torch.equal(ours_s, script_s)  # same seed: the very same draw
    assert torch.allclose(ours_s * 1000, ours_t)  # sigma = t / N on the training table
    # different seeds, many draws: the same distribution (two-sample KS at n = m = 4000: the 1% critical value is
    # 1.63 sqrt(2 / 4000) = 0.036)
    _, many_ours = flow.sample_timesteps(schedule, 4000, sampling, torch.Generator().manual_seed(11))
    _, many_script = script_draw(config, sampling, 4000, torch.Generator().manual_seed(12))
    assert ks_statistic(many_ours, many_script) < 0.045


def test_sd3_trains_on_the_shifted_table_and_flux_on_the_unshifted_one():
    sd3, flux = flow.training_schedule(SD3_SCHEDULER), flow.training_schedule(FLUX_SCHEDULER)
    s = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(sd3.sigmas, 3 * s / (1 + 2 * s), atol=1e-6)  # sigma = shift s / (1 + (shift - 1) s)
    assert torch.allclose(flux.sigmas, s, atol=1e-6)
    # broken: sampling SD3 without the shift is measurably another distribution
    _, shifted = flow.sample_timesteps(sd3, 4000, flow.SD3_SCRIPT_SAMPLING, torch.Generator().manual_seed(5))
    unshifted = flow.training_schedule({"num_train_timesteps": 1000, "shift": 1.0})
    _, plain = flow.sample_timesteps(unshifted, 4000, flow.SD3_SCRIPT_SAMPLING, torch.Generator().manual_seed(6))
    assert ks_statistic(shifted, plain) > 0.1


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "logit_normal", "none"])
def test_the_scripts_elementwise_weighted_loss_is_the_weight_times_the_per_sample_error(scheme):
    x0, noise, sigmas, g = random_case(2)
    prediction = torch.randn(SHAPE, generator=g, dtype=F64)
    weighting = flow.loss_weighting(scheme, sigmas.view(-1, 1, 1, 1))
    script = torch.mean((weighting * (prediction - (noise - x0)) ** 2).reshape(SHAPE[0], -1), 1)
    ours = flow.loss_weighting(scheme, sigmas) * flow.velocity_error(prediction, x0, noise)
    assert close(ours.to(F64), script.to(F64), tol=1e-6)


def test_sampling_flags_are_checked():
    with pytest.raises(ValueError, match="weighting_scheme"):
        flow.TimestepSampling("lognorm")
    with pytest.raises(ValueError, match="batch_size"):
        flow.sample_timesteps(flow.training_schedule(SD3_SCHEDULER), 0, flow.SD3_SCRIPT_SAMPLING)


# --- FLUX packing and a tiny SD3 transformer ---------------------------------------------------------------------


def test_flux_packing_round_trips_through_the_pipelines_static_methods():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    packed = flow.pack_flux_latents(latents)
    assert packed.shape == (2, (8 // 2) * (6 // 2), 16 * 4)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(flow.unpack_flux_latents(packed, 8, 6), latents)
    ids = flow.flux_latent_image_ids(2, 8, 6)
    assert ids.shape == (packed.shape[1], 3)  # one position id per packed token
    with pytest.raises(ValueError, match="even"):
        flow.pack_flux_latents(torch.randn(1, 16, 7, 6))
    # broken: unpacking with the wrong width scrambles (or refuses) the tokens
    with pytest.raises(RuntimeError):
        flow.unpack_flux_latents(packed, 6, 6)


def test_a_tiny_sd3_transformer_predicts_a_velocity_of_the_latents_shape():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    schedule = flow.training_schedule(SD3_SCHEDULER)
    timesteps, sigmas = flow.sample_timesteps(schedule, 3, flow.SD3_SCRIPT_SAMPLING, torch.Generator().manual_seed(0))
    with torch.no_grad():
        prediction = model(hidden_states=flow.add_noise(x0, noise, sigmas), timestep=timesteps,
                           encoder_hidden_states=torch.randn(3, 5, 16), pooled_projections=torch.randn(3, 8),
                           return_dict=False)[0]
    assert prediction.shape == x0.shape
    err = flow.velocity_error(prediction, x0, noise)
    assert err.shape == (3,) and torch.isfinite(err).all()
