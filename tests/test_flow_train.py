"""The rectified-flow families (SD3, FLUX.1) end to end: tiny pipelines built from configs (tests/tiny_models.py), the
real entry points (`full.train`, `full.spin`, `full.spo`), and plain diffusers loading what they saved.

What is proved:
* the step hands the core objectives the noise-equivalent velocity error, ``(1 - sigma)^2 err_v``, of a forward
  recomputed here by hand from `full/models/flow.py` and the transformer (FLUX: packed tokens, position ids, guidance),
  winner and loser sharing sigma and noise; the raw ``err_v`` and the weight ``(1 - sigma)`` (the broken variants)
  are not what the core gets;
* every offline method (dpo, kto, sft, contrast, dspo) trains 2 steps of LoRA on both families: only LoRA weights
  change, every up-projection leaves its zero init, the attention's joint projections (`add_*_proj`) are adapted;
  DPO starts at log 2 (policy = reference); the saved `pytorch_lora_weights.safetensors` loads into a fresh
  `StableDiffusion3Pipeline` / `FluxPipeline` with exactly the trained weights and changes its samples;
* SPIN runs two iterations on SD3 (each starting at log 2, the second against the first's LoRA) and one on FLUX
  (its packed samples unpacked); `--train_mode full` on SD3 saves a `transformer/` folder diffusers loads;
* SPO, the latent cache, `--beta_dpo`, a flow flag on SD1.5 and SPIN's full mode are refused with one line each;
* a DPO run on SD3 killed inside step 3 (after checkpoint-2) and resumed ends with exactly the LoRA of the
  uninterrupted run (tests/test_train_resume.py's kill, reused);
* a golden value per family: one fixed DPO step (a fixed non-zero LoRA, fixed latents and draws) gives stored noise-
  equivalent errors and loss, recomputed here in float64 with the weight written out, and the trainer's float32 step
  matches both; the weight (1 - sigma) or the raw velocity error would fail it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from full import models
from full.models import flow
from full.models.families import call_denoiser, get_family
from full.trainers.denoise import StepInputs, denoise
from minipref import per_sample_mse
from tests.conftest import train_argv
from tests.test_train_resume import FLAGS as RESUME_FLAGS
from tests.test_train_resume import kill_and_resume

LOG2 = math.log(2)
FAST = ["--max_sequence_length", "16"]  # T5 tokens: the scripts' 77 / 512 cost time and test nothing more here
FAMILIES = ("sd3", "flux")
CASES = [  # (method, dataset fixture, extra flags, a metric the method must report)
    ("dpo", "pickapic_parquet", [], "implicit_acc"),
    ("kto", "feedback_parquet", [], "kl"),
    ("sft", "pickapic_parquet", [], "mse"),
    ("contrast", "pickapic_parquet", ["--clip_model_name_or_path", "<clip>"], "weight_diag"),
    ("dspo", "pickapic_parquet", ["--dspo_variant", "dspo"], "gate"),
]


def model_dir(request, family: str) -> str:
    return request.getfixturevalue(f"tiny_{family}")


def sample(pipe) -> np.ndarray:
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images


def assert_lora_loads_and_changes_output(family: str, model: str, lora_dir, trained=None) -> None:
    from peft.utils import get_peft_model_state_dict

    pipe = models.pipeline_class(family).from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    before = sample(pipe)
    np.testing.assert_array_equal(sample(pipe), before)  # deterministic: any change is the LoRA's
    pipe.load_lora_weights(str(lora_dir))
    if trained is not None:
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
        mine = get_peft_model_state_dict(trained)
        assert loaded.keys() == mine.keys()
        for key in mine:
            torch.testing.assert_close(loaded[key], mine[key].cpu(), rtol=0, atol=0)
    assert np.abs(sample(pipe) - before).max() > 1e-6


def assert_only_lora_trained(family: str, transformer, model: str) -> None:
    base = get_family(family).denoiser_class().from_pretrained(model, subfolder="transformer").state_dict()
    ups = {}
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            if "lora_B" in name:
                ups[name] = param.detach()
            continue
        assert not param.requires_grad
        torch.testing.assert_close(param.detach().cpu(), base[name.replace(".base_layer", "")], rtol=0, atol=0)
    assert any("add_k_proj" in name for name in ups) and any("to_q" in name for name in ups)
    still = [n for n, p in ups.items() if not p.abs().max() > 0]
    # every up-projection leaves its zero init, except SD3's last joint block's text queries (`context_pre_only`:
    # that block's text stream is discarded, so its add_q_proj gets no gradient)
    assert len(still) <= 1 and all(n.startswith(f"transformer_blocks.{len(transformer.transformer_blocks) - 1}.")
                                   and "add_q_proj" in n for n in still), still


# ----------------------------------------------------------------------------------------------------------------
# The step: what the core objectives receive
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_step_hands_the_core_the_noise_equivalent_velocity_error(request, family):
    parts = models.load_components(model_dir(request, family), options={"max_sequence_length": 16})
    fam, transformer = get_family(family), parts.unet
    assert models.detect_family(parts.pretrained) == family and fam.denoiser == "transformer"
    b, latents = 2, torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))  # 2 pairs, winners first
    prompt = fam.encode_prompts(parts, ["a photo of a cat", "a bowl of fruit"] * 2, "cpu")
    generators = lambda: [torch.Generator().manual_seed(10 + i) for i in range(b)]  # noqa: E731
    pred, _, target = denoise(transformer, None, parts.noise_scheduler, family, StepInputs(latents, prompt, None, 2),
                              with_reference=False, generator=generators(), weight_dtype=torch.float32)

    # the same draws by hand: per item its noise, then its sigma as the diffusers scripts draw it
    gens = generators()
    noise = torch.cat([torch.randn((1, 8, 16, 16), generator=g) for g in gens]).repeat(2, 1, 1, 1)
    sampling = flow.SD3_SCRIPT_SAMPLING if family == "sd3" else flow.FLUX_SCRIPT_SAMPLING
    timesteps, sigmas = (torch.cat(d).repeat(2) for d in zip(*[
        flow.sample_timesteps(parts.noise_scheduler.schedule, 1, sampling, generator=g) for g in gens]))
    noisy = flow.add_noise(latents, noise, sigmas)
    kwargs = {"encoder_hidden_states": prompt.hidden, "pooled_projections": prompt.pooled}
    if family == "sd3":
        velocity = call_denoiser(transformer, noisy, timesteps, kwargs)
    else:  # FLUX: packed 2x2 tokens, sigma as the timestep, position ids, FLUX.1-dev's guidance 3.5
        kwargs |= {"txt_ids": torch.zeros(prompt.hidden.shape[1], 3), "img_ids": flow.flux_latent_image_ids(4, 16, 16),
                   "guidance": torch.full((4,), 3.5)}
        packed = call_denoiser(transformer, flow.pack_flux_latents(noisy), timesteps / 1000, kwargs)
        velocity = flow.unpack_flux_latents(packed, 16, 16)
    err_v = flow.velocity_error(velocity, latents, noise)
    err_core = per_sample_mse(pred, target)
    torch.testing.assert_close(err_core, flow.noise_equivalent_error(err_v, sigmas), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(target, noise)
    assert torch.equal(sigmas[:b], sigmas[b:])  # winner and loser share sigma (and noise: built so above)
    # the broken variants: the raw velocity error (a constant beta) and a (1 - sigma) weight are not it
    assert not torch.allclose(err_core, err_v, rtol=1e-2)
    assert not torch.allclose(err_core, (1 - sigmas) * err_v, rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Every offline method, both families, through full.train
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,dataset,extra,metric", CASES, ids=[c[0] for c in CASES])
def test_offline_method_trains_lora_that_plain_diffusers_loads(request, run_train, tmp_path, family, method, dataset,
                                                               extra, metric):
    model = model_dir(request, family)
    extra = [request.getfixturevalue("tiny_clip") if flag == "<clip>" else flag for flag in extra]
    summary = run_train(model, request.getfixturevalue(dataset), tmp_path, method, *FAST, *extra)
    assert summary["family"] == family and summary["global_step"] == 2
    assert metric in summary["metrics"] and all(np.isfinite(step["loss"]) for step in summary["history"])
    if method == "dpo":  # the policy starts at the reference: r_w = r_l = 0
        assert summary["history"][0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert (tmp_path / models.LORA_WEIGHT_NAME).is_file()
    assert_only_lora_trained(family, summary["unet"], model)
    assert_lora_loads_and_changes_output(family, model, tmp_path, summary["unet"])


def test_full_fine_tuning_saves_a_transformer_folder(tiny_sd3, pickapic_parquet, run_train, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    run_train(tiny_sd3, pickapic_parquet, tmp_path, "dpo", *FAST, "--train_mode", "full", "--learning_rate", "1e-4")
    transformer = SD3Transformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    base, tuned = (StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **kw) for kw in ({}, {"transformer": transformer}))
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    assert np.abs(sample(tuned) - sample(base)).max() > 1e-6
    assert "SD3Transformer2DModel.from_pretrained" in (tmp_path / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# SPIN (full.spin) and the refusals
# ----------------------------------------------------------------------------------------------------------------


def spin_argv(model, dataset, out, *, steps: int, iterations: int) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--dataset_name", dataset, "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps), "--num_iterations",
            str(iterations), "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--report_to", "none",
            "--generation_steps", "2", "--generation_guidance_scale", "3", "--generation_batch_size", "4",
            "--max_train_samples", "4", "--checkpointing_steps", "100", *FAST]


@pytest.mark.parametrize("family,iterations", [("sd3", 2), ("flux", 1)])
def test_spin_self_play_on_a_flow_model(request, pickapic_parquet, tmp_path, family, iterations):
    from full.trainers import spin

    model = model_dir(request, family)
    out = spin.main(spin_argv(model, pickapic_parquet, tmp_path, steps=2, iterations=iterations))
    losses = [step["loss"] for step in out["history"]]
    assert out["global_step"] == 2 and all(np.isfinite(losses))
    for k in range(iterations):  # the first step of every iteration: the policy is its opponent
        assert losses[k * (2 // iterations)] == pytest.approx(LOG2, abs=1e-6)
    assert_lora_loads_and_changes_output(family, model, tmp_path / f"iteration-{iterations - 1}")


def test_spo_is_refused_on_a_flow_model_with_one_line(tiny_sd3, tiny_clip, tmp_path):
    from full.trainers import spo

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    with pytest.raises(ValueError) as error:
        spo.main(["--pretrained_model_name_or_path", tiny_sd3, "--prompts_file", str(prompts), "--output_dir",
                  str(tmp_path / "out"), "--report_to", "none", "--spm_model_name_or_path", tiny_clip])
    message = str(error.value)
    assert "\n" not in message and "deterministic" in message and "2505.05470" in message


@pytest.mark.parametrize("case", ["cache", "beta_dpo", "flow_flag_on_sd15", "spin_full", "resolution", "build_cache",
                                  "train_spm"])
def test_what_a_family_cannot_run_is_one_line(request, pickapic_parquet, run_train, tmp_path, case):
    from full import cache
    from full.trainers import spin, spm

    expected = {"cache": "--cached_dir", "beta_dpo": "--beta", "flow_flag_on_sd15": "--weighting_scheme",
                "spin_full": "--train_mode full", "resolution": "multiple of 16", "build_cache": "--cached_dir",
                "train_spm": "deterministic"}[case]
    with pytest.raises(ValueError) as error:
        if case == "cache":
            run_train(request.getfixturevalue("tiny_sd3"), None, tmp_path, "dpo", cached_dir=str(tmp_path / "c"))
        elif case == "resolution":  # 40 px: 5 x 5 latents, which the 2x2 patches cannot tile
            run_train(request.getfixturevalue("tiny_flux"), pickapic_parquet, tmp_path, "dpo", "--resolution", "40")
        elif case == "build_cache":  # refused before a row is read or the model loads
            cache.main(["--pretrained_model_name_or_path", request.getfixturevalue("tiny_sd3"), "--dataset_name",
                        pickapic_parquet, "--method", "dpo", "--output_dir", str(tmp_path / "c")])
        elif case == "train_spm":
            spm.main(["--spm_model_name_or_path", request.getfixturevalue("tiny_clip"), "--dataset_name",
                      pickapic_parquet, "--pretrained_model_name_or_path", request.getfixturevalue("tiny_sd3"),
                      "--output_dir", str(tmp_path / "spm"), "--report_to", "none", "--max_train_steps", "1"])
        elif case == "beta_dpo":
            run_train(request.getfixturevalue("tiny_flux"), pickapic_parquet, tmp_path, "dpo", "--beta_dpo", "5000")
        elif case == "flow_flag_on_sd15":
            run_train(request.getfixturevalue("tiny_sd15"), pickapic_parquet, tmp_path, "dpo", "--weighting_scheme",
                      "mode")
        else:
            spin.main(spin_argv(request.getfixturevalue("tiny_sd3"), pickapic_parquet, tmp_path, steps=2,
                                iterations=1) + ["--train_mode", "full"])
    assert expected in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# Kill and resume (tests/test_train_resume.py's kill inside step 3, on SD3)
# ----------------------------------------------------------------------------------------------------------------


def test_a_killed_sd3_run_resumes_to_the_uninterrupted_lora(tiny_sd3, pickapic_parquet, tmp_path, monkeypatch):
    """Same process, same kernels, same inputs: deterministic by construction (docs/testing.md), so the resumed LoRA
    is held to the SD1.5 resume test's 1e-7. What the flow family adds to resume: its sigma draws (logit-normal on
    the shifted table) come from the same per-item generators as the noise, so steps 3-4 must redraw exactly the
    uninterrupted run's sigmas; their losses are compared exactly below."""
    uninterrupted, resumed, lora = kill_and_resume(tiny_sd3, pickapic_parquet, tmp_path, monkeypatch,
                                                   (*FAST, *RESUME_FLAGS))
    assert uninterrupted["family"] == "sd3" and any("add_k_proj" in key for key in lora)
    # the resumed run's last two losses are the uninterrupted run's (same draws of sigma and noise)
    assert [h["loss"] for h in resumed["history"]][-2:] == [h["loss"] for h in uninterrupted["history"]][-2:]


# ----------------------------------------------------------------------------------------------------------------
# A golden value per family: one fixed DPO step, recomputed by hand in float64 and stored
# ----------------------------------------------------------------------------------------------------------------

GOLDEN_BETA = 5000.0
# `fixed_dpo_step`'s float64 values (by hand), recorded with torch 2.13 / AVX-512 / 1 thread: the pairs' two sigmas
# (winners and losers share them), the noise-equivalent errors (1 - sigma)^2 err_v of the 4 images [w0, w1, l0, l1]
# under the LoRA'd policy and the reference, and the DPO loss at beta 5000.
GOLDEN = {
    "sd3": {"sigmas": (0.6279069781303406, 0.8181818127632141),
            "err": (0.341795262284, 0.0799824074951, 0.34628868345, 0.0762964421142),
            "ref_err": (0.342046342602, 0.0800414061216, 0.346506355634, 0.0763590657449),
            "loss": 0.674973708233},
    "flux": {"sigmas": (0.3630000054836273, 0.33799999952316284),
             "err": (0.987705009721, 1.06959892548, 0.996618845748, 1.04892590457),
             "ref_err": (0.987850604247, 1.06951005284, 0.996632309131, 1.04916880727),
             "loss": 0.866532986869},
}
# Tolerances, from `fixed_dpo_step` under ATEN_CPU_CAPABILITY=default, avx2, avx512 x OMP_NUM_THREADS=1, 2 (x86 with
# AVX-512; the sigmas were identical in all six):
# - the float64 recomputation against the stored numbers: the errors moved by up to 8.9e-9 relative and the loss by
#   3.7e-8 (both on the default kernels; the float32 prompt embeddings are its only float32 input).
#   GOLDEN_ERR_RTOL = 1e-6 (110x), GOLDEN_LOSS_ATOL = 1e-6 (27x). The policy's errors differ from the reference's by
#   1e-4..7e-4 relative, so the LoRA's effect is pinned to about 1%;
# - the trainer (float32) against the float64 recomputation: errors up to 1.1e-7 relative, the loss up to 4.2e-5
#   (FLUX; beta/2 = 2500 times float32 rounding of errors of size ~1). TRAINER_ERR_RTOL = 1e-5 (90x),
#   TRAINER_LOSS_ATOL = 4e-4 (10x).
# The broken formulas the golden must catch (asserted below): the weight (1 - sigma) instead of (1 - sigma)^2, and the
# raw velocity error (a constant beta): the errors then move by 0.51..29 relative and the loss by 0.022 (SD3,
# (1 - sigma)) to 0.33 (FLUX, raw), 55x TRAINER_LOSS_ATOL or more.
GOLDEN_ERR_RTOL, GOLDEN_LOSS_ATOL = 1e-6, 1e-6
TRAINER_ERR_RTOL, TRAINER_LOSS_ATOL = 1e-5, 4e-4


def fixed_dpo_step(model: str, family: str) -> dict:
    """One DPO step on fixed inputs, as the trainer computes it and by hand in float64.

    Fixed: the tiny pipeline (seed 0), a rank-4 LoRA on the family's targets whose A and B are drawn from a seeded
    generator (so the policy differs from the reference: B = 0 would give log 2), latents drawn from seed 0, two
    pairs with their captions, and the per-item generators of items 0 and 1 (seeds 10, 11). The trainer's side is the
    real path: `denoise` with the LoRA weights' reference (`full.run.weights`), the DPO row of the method table. The
    hand side takes from `full/models/flow.py` only the draw of sigma (`sample_timesteps`) and FLUX's packing, and
    writes the rest out: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0, err_v, the weight (1 - sigma)^2 and
    -log sigmoid(-(beta/2)((e_w - e_ref_w) - (e_l - e_ref_l))), in float64 (the transformer copied to float64; the
    prompt embeddings are the float32 ones the trainer uses, as inputs)."""
    import copy

    import minipref as core
    from full.models.lora import add_lora
    from full.run.weights import reference_forward, weights_for
    from full.trainers.objective import resolve_objective

    parts = models.load_components(model, options={"max_sequence_length": 16})
    fam, transformer = get_family(family), parts.unet
    add_lora(transformer, rank=4, target_modules=fam.lora_targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:  # fixed, not the global RNG's: A ~ N(0, 1/4), B ~ N(0, 0.02^2)
                param.copy_(torch.randn(param.shape, generator=g) * (0.5 if "lora_A" in name else 0.02))
    latents = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))  # 2 pairs, winners first
    prompt = fam.encode_prompts(parts, ["a photo of a cat", "a bowl of fruit"] * 2, "cpu")
    generators = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    inputs = StepInputs(latents, prompt, None, 2)

    trained = weights_for("lora", parts, family)
    reference = reference_forward(lambda: trained.as_reference(transformer))
    with torch.no_grad():
        pred, ref_pred, target = denoise(transformer, reference, parts.noise_scheduler, family, inputs,
                                         with_reference=True, generator=generators(), weight_dtype=torch.float32)
        method = core.get_method("dpo")
        options = {option.name: option.default for option in method.options}  # the flags' defaults
        out = resolve_objective(method, options, GOLDEN_BETA, "--beta", family).loss(pred, ref_pred, target, inputs)
    trainer = {"err": per_sample_mse(pred, target).double(), "ref_err": per_sample_mse(ref_pred, target).double(),
               "loss": float(out.loss)}

    # by hand, float64
    gens = generators()
    noise = torch.cat([torch.randn((1, 8, 16, 16), generator=g) for g in gens]).double().repeat(2, 1, 1, 1)
    sampling = flow.SD3_SCRIPT_SAMPLING if family == "sd3" else flow.FLUX_SCRIPT_SAMPLING
    timesteps, sigmas = (torch.cat(d).repeat(2) for d in zip(*[
        flow.sample_timesteps(parts.noise_scheduler.schedule, 1, sampling, generator=g) for g in gens]))
    sigmas = sigmas.double()
    x0, s = latents.double(), sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    net = copy.deepcopy(transformer).double()
    kwargs = {"encoder_hidden_states": prompt.hidden.double(), "pooled_projections": prompt.pooled.double()}
    if family == "flux":
        kwargs |= {"txt_ids": torch.zeros(prompt.hidden.shape[1], 3, dtype=torch.float64),
                   "img_ids": flow.flux_latent_image_ids(4, 16, 16, dtype=torch.float64),
                   "guidance": torch.full((4,), 3.5, dtype=torch.float64)}

    def velocity(adapters: bool):
        (net.enable_adapters if adapters else net.disable_adapters)()
        with torch.no_grad():
            if family == "sd3":
                return call_denoiser(net, noisy, timesteps.double(), kwargs)
            packed = call_denoiser(net, flow.pack_flux_latents(noisy), timesteps.double() / 1000, kwargs)
            return flow.unpack_flux_latents(packed, 16, 16)

    v = noise - x0
    err_v = {k: ((velocity(k) - v) ** 2).mean(dim=(1, 2, 3)) for k in (True, False)}  # policy, reference
    weight = (1 - sigmas) ** 2
    err, ref_err = weight * err_v[True], weight * err_v[False]
    hand = {"err": err, "ref_err": ref_err, "loss": dpo_loss_by_hand(err, ref_err), "sigmas": sigmas,
            "err_v": err_v[True], "ref_err_v": err_v[False]}
    return {"trainer": trainer, "hand": hand}


def dpo_loss_by_hand(err: torch.Tensor, ref_err: torch.Tensor, beta: float = GOLDEN_BETA) -> float:
    """-log sigmoid(-(beta/2)((e_w - e_ref_w) - (e_l - e_ref_l))), mean over the 2 pairs (winners first)."""
    margin = -(beta / 2) * ((err[:2] - ref_err[:2]) - (err[2:] - ref_err[2:]))
    return float(-torch.nn.functional.logsigmoid(margin).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_dpo_step(request, family):
    step = fixed_dpo_step(model_dir(request, family), family)
    hand, trainer, golden = step["hand"], step["trainer"], GOLDEN[family]
    f64 = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    # the trainer computes what the formula written out by hand computes
    torch.testing.assert_close(trainer["err"], hand["err"], rtol=TRAINER_ERR_RTOL, atol=0)
    torch.testing.assert_close(trainer["ref_err"], hand["ref_err"], rtol=TRAINER_ERR_RTOL, atol=0)
    assert trainer["loss"] == pytest.approx(hand["loss"], abs=TRAINER_LOSS_ATOL)
    # ... and both are the stored numbers
    assert hand["sigmas"][:2].tolist() == list(golden["sigmas"])
    torch.testing.assert_close(hand["err"], f64(golden["err"]), rtol=GOLDEN_ERR_RTOL, atol=0)
    torch.testing.assert_close(hand["ref_err"], f64(golden["ref_err"]), rtol=GOLDEN_ERR_RTOL, atol=0)
    assert hand["loss"] == pytest.approx(golden["loss"], abs=GOLDEN_LOSS_ATOL)
    assert trainer["loss"] == pytest.approx(golden["loss"], abs=TRAINER_LOSS_ATOL)
    assert abs(golden["loss"] - LOG2) > 0.01  # the policy is not the reference: the margin matters
    # the broken formulas fail: the weight (1 - sigma), the raw velocity error
    sigmas = hand["sigmas"]
    for weight in (1 - sigmas, torch.ones_like(sigmas)):
        err, ref_err = weight * hand["err_v"], weight * hand["ref_err_v"]
        assert ((err - f64(golden["err"])).abs() / f64(golden["err"])).max() > 1e4 * GOLDEN_ERR_RTOL
        assert abs(dpo_loss_by_hand(err, ref_err) - golden["loss"]) > 10 * TRAINER_LOSS_ATOL


# ----------------------------------------------------------------------------------------------------------------
# The plan: `python -m full.presets sd3-dpo --plan` and `full.train --dry_run` on a flow model (full/plan.py)
# ----------------------------------------------------------------------------------------------------------------


def plan_rows(text: str) -> dict[str, int]:
    """The memory rows of a printed plan: label -> bytes."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("  ") and " GiB " in line:
            label, rest = line[2:26].strip(), line.split(" GiB ", 1)[1]
            rows[label] = int(rest.split(" B ", 1)[0].replace(",", ""))
    return rows


@pytest.mark.parametrize("name,parameters", [("sd3-dpo", 2_243_171_520), ("flux-kto", 11_901_408_320)])
def test_a_flow_preset_prints_its_plan(capsys, name, parameters):
    """The published architectures on the meta device: FLUX.1-dev's 11.9B parameters, SD3.5-medium's 2.24B plus its
    fixed 384^2 x 1536 position table (a buffer; 2.47B together, its published size)."""
    from full import plan, presets

    assert presets.main([name, "--plan"]) == 0
    text = capsys.readouterr().out
    lines = {line[:12].strip(): line[12:].strip() for line in text.splitlines() if line[:12].strip()}
    preset = presets.load_preset(name)
    effective = preset["train_batch_size"] * preset["gradient_accumulation_steps"]
    assert lines["batch"].startswith(f"1 x {preset['train_batch_size']} per GPU x "
                                     f"{preset['gradient_accumulation_steps']} accumulation = {effective} ")
    assert lines["learning"].startswith(f"{preset['learning_rate']:g} (not scaled)")
    assert lines["transformer"].startswith(f"{parameters:,} parameters")
    rows = plan_rows(text)
    assert rows["frozen base transformer"] == 2 * parameters  # bf16
    assert {"LoRA weights", "optimizer state", "VAE + text encoders", "activations", "total"} <= rows.keys()
    if name == "sd3-dpo":
        assert plan.buffer_count("sd35m_transformer") == 384 * 384 * 1536 == rows["transformer buffers"] // 2
    assert "T5-XXL" in text and "[ESTIMATED]" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_on_a_flow_model_plans_its_own_transformer_and_trains_nothing(request, pickapic_parquet, tmp_path,
                                                                               capsys, family):
    """--dry_run reads the run's own transformer config (the tiny one here): the printed parameter count and the LoRA
    rows are the bytes of the real transformer and of a real peft LoRA on the family's targets (`add_*_proj`,
    `to_add_out` included: the UNet's four targets alone would miss them)."""
    from full.models.lora import add_lora, lora_parameters
    from full.presets import load_preset
    from full.trainers import offline

    model = model_dir(request, family)
    argv = train_argv(model, pickapic_parquet, tmp_path / "out", "dpo", "--preset", f"{family}-dpo", "--dry_run")
    assert offline.main(argv) == {}
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    transformer = get_family(family).denoiser_class().from_pretrained(model, subfolder="transformer")
    assert f"transformer  {sum(p.numel() for p in transformer.parameters()):,} parameters" in text
    add_lora(transformer, rank=load_preset(f"{family}-dpo")["rank"], target_modules=get_family(family).lora_targets)
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_parameters(transformer))
    rows = plan_rows(text)
    assert rows["LoRA weights"] == rows["gradients"] == lora_bytes
