"""The flow lab (`python -m full.lab --family sd3 --quick`, docs/lab_flow.md): the lab's world on a tiny
SD3-shaped pipeline pretrained with rectified flow, and DPO / KTO / SFT / swapped DPO through the real entry points.

One small flow lab per session (this module's fixture, in this process: under a minute on 2 cores). The test
asserts that plain diffusers loads the pretrained pipeline and a LoRA, that pretraining lowered the flow loss on fixed
held-out draws, and that every arm went through full.train and full.evaluate; what the objectives do to a flow model
is measured by `--quick` and the full flow lab (docs/lab_flow.md), which take too long for the suite.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_flow_lab(tmp_path_factory):
    """A smaller flow lab than `--quick` (which takes ~10 minutes here, most of it pretraining with 256 T5 tokens):
    it checks the machinery end to end, not the effects; those are docs/lab_flow.md's, from `--quick` and the full
    lab."""
    from dataclasses import replace

    from full.lab.presets import FLOW_QUICK
    from full.lab.run import run_lab

    pretrain = replace(FLOW_QUICK.pretrain, vae_steps=60, pool_size=300, unet_steps=60, unet_batch=16, clip_steps=20,
                       t5_length=32)
    lab = replace(FLOW_QUICK, name="test-sd3", pretrain=pretrain, images_per_caption=4, eval_seeds=1,
                  train_scale=0.05, methods=("dpo", "dpo_swapped"),
                  trainer_flags=(("max_sequence_length", pretrain.t5_length),))
    out = tmp_path_factory.mktemp("lab_sd3")
    return out, run_lab(out, lab, launcher="inprocess", quiet=True)


def test_flow_lab_presets_are_the_unet_labs_but_the_denoiser():
    from full.lab.presets import FLOW_FULL, FLOW_QUICK, FULL, QUICK

    for flow_lab, unet_lab in ((FLOW_FULL, FULL), (FLOW_QUICK, QUICK)):
        assert flow_lab.family == "sd3" and unet_lab.family == "sd15"
        shared = dict(vars(unet_lab.pretrain))
        assert {k: getattr(flow_lab.pretrain, k) for k in shared} == shared  # VAE, pool, steps, lr, EMA: the same
        for name in ("images_per_caption", "sample_steps", "guidance", "tie_rate", "label_noise",
                     "desirable_quantile", "eval_seeds", "train_scale"):
            assert getattr(flow_lab, name) == getattr(unet_lab, name), name
        assert set(flow_lab.methods) == {"dpo", "kto_kahneman_tversky", "sft", "dpo_swapped"}
        assert dict(flow_lab.trainer_flags) == {"max_sequence_length": flow_lab.pretrain.t5_length}
        assert flow_lab.smoke_steps == 0  # every arm, and NAME_seed<N>, trains its (scaled) preset


def test_flow_lab_pipeline_loads_in_plain_diffusers_and_pretraining_lowered_the_flow_loss(quick_flow_lab):
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    out, results = quick_flow_lab
    model = out / "model"
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model))
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a dark background"
    base = pipe(prompt, num_inference_steps=4, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    assert base.shape == (1, 32, 32, 3)
    pipe.load_lora_weights(str(out / "train" / "dpo"))  # the LoRA full.train wrote, into the plain pipeline
    tuned = pipe(prompt, num_inference_steps=4, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert abs(tuned - base).max() > 1e-4

    report = results["base"]["pretrain"]
    # the flow loss on the same fixed (latent, caption, sigma, noise) draws, before and after pretraining (this
    # 60-step model: measured 0.39x with 1 and 2 threads; the --quick one 0.22x, docs/lab_flow.md)
    assert report["flow_loss_after"] < 0.8 * report["flow_loss_before"], report


def test_every_flow_lab_arm_was_trained_through_the_entry_points_and_evaluated(quick_flow_lab):
    """The machinery, not the effect (a 60-step model does not follow its captions; the effects are docs/lab_flow.md's,
    from `--quick` and its second seed: DPO 0.83 and 0.94 over the base, swapped DPO 0.11 and 0.00)."""
    out, results = quick_flow_lab
    methods = results["methods"]
    assert set(methods) == {"dpo", "dpo_swapped"}
    for name, entry in methods.items():
        assert (out / "train" / name / "pytorch_lora_weights.safetensors").is_file(), name
        assert 0.0 <= entry["win_rate"] <= 1.0 and entry["ci"][0] <= entry["win_rate"] <= entry["ci"][1], name
        assert entry["command"].startswith("full.train ") and "--max_sequence_length 32" in entry["command"]
