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
* SPO, the latent cache, `--beta_dpo`, a flow flag on SD1.5 and SPIN's full mode are refused with one line each.
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


@pytest.mark.parametrize("case", ["cache", "beta_dpo", "flow_flag_on_sd15", "spin_full"])
def test_what_a_family_cannot_run_is_one_line(request, pickapic_parquet, run_train, tmp_path, case):
    from full.trainers import spin

    expected = {"cache": "--cached_dir", "beta_dpo": "--beta", "flow_flag_on_sd15": "--weighting_scheme",
                "spin_full": "--train_mode full"}[case]
    with pytest.raises(ValueError) as error:
        if case == "cache":
            run_train(request.getfixturevalue("tiny_sd3"), None, tmp_path, "dpo", cached_dir=str(tmp_path / "c"))
        elif case == "beta_dpo":
            run_train(request.getfixturevalue("tiny_flux"), pickapic_parquet, tmp_path, "dpo", "--beta_dpo", "5000")
        elif case == "flow_flag_on_sd15":
            run_train(request.getfixturevalue("tiny_sd15"), pickapic_parquet, tmp_path, "dpo", "--weighting_scheme",
                      "mode")
        else:
            spin.main(spin_argv(request.getfixturevalue("tiny_sd3"), pickapic_parquet, tmp_path, steps=2,
                                iterations=1) + ["--train_mode", "full"])
    assert expected in str(error.value) and "\n" not in str(error.value)
