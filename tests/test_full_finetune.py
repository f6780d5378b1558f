"""`--train_mode full`: every objective trains the whole UNet against a frozen copy of the start, and the result is
a diffusers UNet folder that plain diffusers loads (full/run/weights.py). On the tiny SD1.5 and SDXL, in-process."""

from __future__ import annotations

import math

import pytest
import torch

from full.models import lora
from full.run.weights import UNET_FOLDER
from full.trainers import offline as train
from tests.conftest import train_argv

OFFLINE = tuple(train.offline_methods())
EXTRA = {"contrast": ("--clip_model_name_or_path",)}  # + the tiny CLIP


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def record_parts(monkeypatch) -> dict:
    """Keep what `trainable_unet_parts` built for the run (to look at the reference after training)."""
    seen = {}
    real = train.trainable_unet_parts

    def recording(*args, **kwargs):
        parts = real(*args, **kwargs)
        seen["parts"] = parts
        seen["reference_at_start"] = None if parts.reference_unet is None else state(parts.reference_unet)
        seen["unet_at_start"] = state(parts.unet)
        return parts

    monkeypatch.setattr(train, "trainable_unet_parts", recording)
    return seen


def full_argv(model, data, out, method, tiny_clip, *extra, steps=2):
    flags = ["--clip_model_name_or_path", tiny_clip] if method in EXTRA else []
    return train_argv(model, data, out, method, "--train_mode", "full", *flags, *extra, steps=steps)


def sample_latents(model_dir, unet=None) -> torch.Tensor:
    """One denoising step of the plain diffusers pipeline, with its own UNet or ``unet``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir, **({"unet": unet} if unet is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red square", num_inference_steps=1, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("method", OFFLINE)
def test_every_offline_method_trains_the_whole_unet_and_leaves_the_reference_unchanged(
        method, tiny_sd15, tiny_clip, pickapic_parquet, tmp_path, monkeypatch):
    seen = record_parts(monkeypatch)
    summary = train.main(full_argv(tiny_sd15, pickapic_parquet, tmp_path, method, tiny_clip))
    parts = seen["parts"]
    args = train.parse_args(full_argv(tiny_sd15, pickapic_parquet, tmp_path / "x", method, tiny_clip))
    objective_needs_reference = train.objective_for(args, "sd15").needs_reference
    assert all("lora" not in name for name, _ in parts.unet.named_parameters())  # no adapter: the UNet itself
    moved = [k for k, v in state(summary["unet"]).items() if not torch.equal(v, seen["unet_at_start"][k])]
    assert len(moved) > len(seen["unet_at_start"]) // 2, f"{method}: only {len(moved)} tensors moved"
    if objective_needs_reference:  # a frozen copy, bit for bit what it was
        after = state(parts.reference_unet)
        assert all(torch.equal(after[k], v) for k, v in seen["reference_at_start"].items())
        assert not any(p.requires_grad for p in parts.reference_unet.parameters())
    else:  # SFT, CSFT: no second UNet in memory
        assert parts.reference_unet is None
    assert (tmp_path / UNET_FOLDER / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / lora.LORA_WEIGHT_NAME).exists()
    assert "full-fine-tune" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_saved_unet_loads_in_plain_diffusers_and_changes_its_output(family, tiny_sd15, tiny_sdxl, tiny_clip,
                                                                       pickapic_parquet, tmp_path):
    from diffusers import UNet2DConditionModel

    model = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[family]
    train.main(full_argv(model, pickapic_parquet, tmp_path, "dpo", tiny_clip, "--learning_rate", "1e-2"))
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder=UNET_FOLDER)
    base, tuned = sample_latents(model), sample_latents(model, unet)
    assert base.shape == tuned.shape and (tuned - base).abs().max() > 1e-4
    # and loading the base UNet the same way gives the base output back (the comparison is not vacuous)
    again = sample_latents(model, UNet2DConditionModel.from_pretrained(model, subfolder="unet"))
    torch.testing.assert_close(again, base)


def test_ema_weights_are_what_is_saved_and_the_pipeline_folder_loads(tiny_sd15, tiny_clip, pickapic_parquet,
                                                                     tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    summary = train.main(full_argv(tiny_sd15, pickapic_parquet, tmp_path, "dpo", tiny_clip, "--use_ema",
                                   "--ema_decay", "0.5", "--save_pipeline", "--checkpointing_steps", "1", steps=3))
    saved = UNet2DConditionModel.from_pretrained(tmp_path, subfolder=UNET_FOLDER)
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    trained = summary["unet"]
    # EMA sits between the start and the last weights (decay 0.5: not equal to either)
    gaps = [((s - b).abs().sum().item(), (t.detach() - s).abs().sum().item())
            for s, b, t in zip(saved.parameters(), base.parameters(), trained.parameters())]
    assert sum(a for a, _ in gaps) > 0 and sum(b for _, b in gaps) > 0
    assert (tmp_path / "checkpoint-3" / "custom_checkpoint_1.pkl").is_file()  # the EMA travels with checkpoints
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    torch.testing.assert_close(dict(pipe.unet.state_dict()), dict(saved.state_dict()))


def test_a_killed_full_run_with_ema_resumes_to_the_same_unet(tiny_sd15, tiny_clip, pickapic_parquet, tmp_path,
                                                            monkeypatch):
    from safetensors.torch import load_file

    from tests.test_train_resume import FLAGS, killed_inside_step_3

    flags = (*FLAGS, "--use_ema", "--ema_decay", "0.9")
    train.main(full_argv(tiny_sd15, pickapic_parquet, tmp_path / "a", "dpo", tiny_clip, *flags, steps=4))
    argv = full_argv(tiny_sd15, pickapic_parquet, tmp_path / "b", "dpo", tiny_clip, *flags, steps=4)
    killed_inside_step_3(monkeypatch, argv)
    assert not (tmp_path / "b" / UNET_FOLDER).exists()
    train.main(argv + ["--resume_from_checkpoint", "latest"])
    weights = "diffusion_pytorch_model.safetensors"
    a, b = (load_file(str(tmp_path / run / UNET_FOLDER / weights)) for run in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:  # the tolerance of the LoRA resume test (tests/test_train_resume.py)
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    mid = load_file(str(tmp_path / "b" / "checkpoint-2" / "model.safetensors"))  # the policy at step 2
    assert not any(k.startswith("lora") for k in mid) and len(mid) == len(a)  # the whole UNet, no reference copy


def test_adafactor_and_the_inverse_sqrt_schedule(tiny_sd15, tiny_clip, pickapic_parquet, tmp_path):
    summary = train.main(full_argv(tiny_sd15, pickapic_parquet, tmp_path, "sft", tiny_clip, "--optimizer",
                                   "adafactor", "--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "2", steps=4))
    lrs = [h["lr"] for h in summary["history"]]
    # transformers' inverse_sqrt: lr * step / warmup while warming up, then lr * sqrt(warmup / step)
    expected = [1e-3 * min(s / 2, math.sqrt(2 / s)) for s in (1, 2, 3, 4)]
    assert lrs == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("flags,needle", [
    (["--train_mode", "full", "--rank", "4"], "--rank applies to --train_mode lora"),
    (["--use_ema"], "--use_ema applies to --train_mode full"),
    (["--train_mode", "full", "--ema_decay", "0.9"], "--ema_decay applies with --use_ema"),
    (["--train_mode", "full", "--use_ema", "--ema_decay", "1.5"], "--ema_decay must be in (0, 1)"),
    (["--optimizer", "sgd"], "--optimizer: invalid choice"),
    (["--preset", "sd15-dpo-full", "--train_mode", "lora"], "is a --train_mode full recipe"),
    (["--preset", "sd15-dpo", "--train_mode", "full"], "is a --train_mode lora recipe"),
])
def test_train_mode_flags_are_checked_at_parse_time(flags, needle, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(train_argv("m", "d.parquet", "o", "dpo", *flags))
    assert needle in capsys.readouterr().err


def test_spin_full_plays_against_a_frozen_copy_of_its_last_iteration(tiny_sd15, pickapic_parquet, tmp_path):
    from diffusers import UNet2DConditionModel

    from full.trainers import spin
    from tests.test_spin import LOG2, spin_argv

    summary = spin.main(spin_argv(tiny_sd15, pickapic_parquet, tmp_path, "--train_mode", "full"))
    losses = [(h["iteration"], h["loss"]) for h in summary["history"]]
    assert [k for k, _ in losses] == [0, 0, 1, 1]
    # first step of each iteration the policy is its opponent (the base, then the iteration-0 UNet): log 2
    assert losses[0][1] == pytest.approx(LOG2, abs=1e-6) and losses[2][1] == pytest.approx(LOG2, abs=1e-6)
    assert abs(losses[1][1] - LOG2) > 1e-4 and abs(losses[3][1] - LOG2) > 1e-4  # then only the policy moves
    snapshot = UNet2DConditionModel.from_pretrained(tmp_path / "iteration-0", subfolder=UNET_FOLDER)
    final = UNet2DConditionModel.from_pretrained(tmp_path, subfolder=UNET_FOLDER)
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    for a, b in ((snapshot, base), (final, snapshot)):
        assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_spo_full_trains_the_whole_unet_against_a_frozen_reference(tiny_sd15, tiny_clip, pickapic_parquet, tmp_path):
    from full.online.spm import StepAwarePreferenceModel
    from full.trainers import spo
    from tests.test_spo import spo_argv

    spm_dir = StepAwarePreferenceModel.from_pretrained(tiny_clip, time_conditioned=True).save_pretrained(tmp_path / "spm")
    summary = spo.main(spo_argv(tiny_sd15, spm_dir, pickapic_parquet, tmp_path / "run", "--threshold", "0",
                                "--train_mode", "full"))
    first = summary["history"][0]  # policy == the frozen copy before the first update: ratio 1, loss log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and summary["global_step"] == 4
    assert summary["history"][-1]["log_ratio_w"] != 0
    assert (tmp_path / "run" / UNET_FOLDER / "diffusion_pytorch_model.safetensors").is_file()


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_sd15, pickapic_parquet, tmp_path, capsys):
    argv = train_argv(tiny_sd15, pickapic_parquet, tmp_path / "out", "dpo", "--preset", "sd15-dpo-full",
                      "--dry_run")
    assert train.main(argv) == {}
    out = capsys.readouterr().out
    assert "--train_mode full" in out and "frozen reference UNet" in out and "(--scale_lr)" in out
    assert not (tmp_path / "out").exists()


def test_fsdp_or_deepspeed_without_gpus_is_refused_not_run_as_ddp(monkeypatch):
    from full.processes import check_sharding_engine_has_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_sharding_engine_has_gpus(2)  # no engine asked for: DDP over gloo is what was asked
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_sharding_engine_has_gpus(1)  # one process: nothing to shard over
    with pytest.raises(ValueError, match="asks for FSDP, which needs GPUs"):
        check_sharding_engine_has_gpus(2)
