"""SPIN-Diffusion (full/trainers/spin.py) on tiny offline SD1.5 / SDXL pipelines and a Pick-a-Pic-schema parquet.

What is proved: the opponent of iteration 0 is the base model and that of iteration k >= 1 is the frozen LoRA saved at
the end of iteration k - 1 (its forward, its weights, and the loss: log 2 exactly at the first step of every
iteration, when policy and opponent coincide, and not at the second, when only the policy has moved); the opponent's
samples are cached per shard with the expected shapes, and a rerun of an interrupted iteration regenerates only
what is missing (counted pipeline calls, untouched files) and ends, after a checkpoint resume, with the
uninterrupted run's LoRA; a cache made with other settings is refused; only the trained LoRA changes and it loads
into a fresh pipeline; bad flags are rejected with messages.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from full import models
from full.online import generation
from full.online import opponent as spin_opponent
from full.run.weights import reference_forward
from full.trainers import spin

LOG2 = math.log(2)


def spin_argv(model, dataset, out, *extra, steps: int = 4, iterations: int = 2) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--dataset_name", dataset, "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps), "--num_iterations",
            str(iterations), "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--report_to", "none",
            "--generation_steps", "2", "--generation_guidance_scale", "3", "--generation_batch_size", "4",
            "--max_train_samples", "8", "--checkpointing_steps", "100", *extra]


def read_lora(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / models.LORA_WEIGHT_NAME))


def assert_lora_loads_and_changes_output(family, model_dir, lora_dir):
    pipe = models.pipeline_class(family).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    sample = lambda: pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa
                          generator=torch.Generator().manual_seed(0)).images
    before = sample()
    pipe.load_lora_weights(str(lora_dir))
    assert np.abs(sample() - before).max() > 1e-6


@pytest.fixture
def count_pipeline_calls(monkeypatch):
    """Counts calls of the diffusers pipelines (the opponent's sampling) made by full/trainers/spin.py."""
    calls = []
    for cls in (models.pipeline_class("sd15"), models.pipeline_class("sdxl")):
        original = cls.__call__

        def counting(self, *args, _original=original, **kwargs):
            calls.append(len(kwargs.get("prompt", args[0] if args else [])))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counting)
    return calls


# ----------------------------------------------------------------------------------------------------------------
# The opponent
# ----------------------------------------------------------------------------------------------------------------


def test_opponent_is_the_base_model_then_the_frozen_snapshot(tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel

    parts = models.load_components(tiny_sd15, with_vae=False)
    unet = parts.unet
    models.add_lora(unet, 4)
    spin_opponent.add_opponent_adapter(unet)
    for name, p in unet.named_parameters():
        if "lora_B.default" in name:
            torch.nn.init.normal_(p, std=0.1)
    models.save_lora("sd15", unet, tmp_path)  # the snapshot theta_1
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    prompts = ["a photo of a cat", "a bowl of fruit"]
    cond = {"encoder_hidden_states": models.encode_prompts(parts, prompts, "cpu").hidden}
    snapshot_out = unet(x, t, **cond).sample.detach()

    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")(x, t, **cond).sample
    theta = lambda k: reference_forward(lambda: spin_opponent.playing_opponent(unet, k))  # noqa: E731  (as full.spin)
    torch.testing.assert_close(theta(0)(x, t, cond), base)

    spin_opponent.load_opponent("sd15", unet, tmp_path)
    with torch.no_grad():  # the policy moves on; the opponent stays where the snapshot was
        for name, p in unet.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.1)
    opponent_out = theta(1)(x, t, cond)
    torch.testing.assert_close(opponent_out, snapshot_out, rtol=0, atol=0)
    assert not opponent_out.requires_grad
    policy_out = unet(x, t, **cond).sample  # back to the trained adapter, with gradients
    assert policy_out.requires_grad and (policy_out - snapshot_out).abs().max() > 1e-3
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # the opponent never becomes trainable
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if ".opponent." in n)


def test_two_self_play_iterations(tiny_sd15, pickapic_parquet, tmp_path, count_pipeline_calls):
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    summary = spin.main(spin_argv(tiny_sd15, pickapic_parquet, tmp_path))
    assert summary["family"] == "sd15" and summary["global_step"] == 4
    losses = [(h["iteration"], h["loss"]) for h in summary["history"]]
    assert [k for k, _ in losses] == [0, 0, 1, 1]
    # first step of each iteration: the policy is its opponent (base at k = 0, the iteration-0 LoRA at k = 1)
    assert losses[0][1] == pytest.approx(LOG2, abs=1e-6) and losses[2][1] == pytest.approx(LOG2, abs=1e-6)
    # second step: the policy moved, the opponent did not (a live opponent would give log 2 again)
    assert abs(losses[1][1] - LOG2) > 1e-4 and abs(losses[3][1] - LOG2) > 1e-4

    # the cache: every row has the opponent's latents, per iteration, 2 shards of 4 prompts
    assert count_pipeline_calls == [4, 4, 4, 4]
    for k in (0, 1):
        directory = tmp_path / generation.CACHE_DIR / f"iteration-{k}"
        row_ids = []
        for shard in sorted(directory.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                assert f.get_tensor("latents").shape == (4, 4, 16, 16)
                row_ids += f.get_tensor("row_ids").tolist()
        assert row_ids == list(range(8))  # the 8 non-tie rows of the parquet, each with its own sample
    cache = [generation.GeneratedLatents(tmp_path / generation.CACHE_DIR / f"iteration-{k}") for k in (0, 1)]
    assert not torch.allclose(cache[0].latents(3), cache[1].latents(3))  # a new opponent, new samples

    # the opponent of iteration 1 holds exactly the LoRA saved at the end of iteration 0, not the final one
    snapshot, final = read_lora(tmp_path / "iteration-0"), read_lora(tmp_path)
    assert any(v.abs().max() > 0 for k, v in snapshot.items() if "lora.up" in k)  # iteration 0 trained
    snapshot = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in snapshot.items()})
    opponent = spin_opponent.opponent_state(summary["unet"])
    assert opponent.keys() == snapshot.keys()
    assert all(torch.equal(opponent[k], snapshot[k]) for k in snapshot)
    assert any(not torch.equal(a, b) for a, b in zip(read_lora(tmp_path / "iteration-0").values(), final.values()))
    assert read_lora(tmp_path / "iteration-1").keys() == final.keys()

    # only the trained adapter changed; the saved LoRA is the policy's and changes a fresh pipeline
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    for name, param in summary["unet"].named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), base[name.replace(".base_layer", "")]), name
    assert_lora_loads_and_changes_output("sd15", tiny_sd15, tmp_path)


def test_interrupted_iteration_resumes_from_cache_and_checkpoint(tiny_sd15, pickapic_parquet, tmp_path,
                                                                 count_pipeline_calls):
    """Run A: 2 iterations of 1 step. Then the state of a run interrupted in iteration 1 while generating: the
    checkpoint of step 1 and the first shard of iteration 1 exist, nothing after. Run B resumes it."""
    argv = spin_argv(tiny_sd15, pickapic_parquet, tmp_path, "--checkpointing_steps", "1", steps=2)
    spin.main(argv)
    final_a = read_lora(tmp_path)
    cache = tmp_path / generation.CACHE_DIR / "iteration-1"
    kept_shard, lost_shard = cache / "shard-000000.safetensors", cache / "shard-000001.safetensors"
    lost_bytes, kept_mtime = lost_shard.read_bytes(), kept_shard.stat().st_mtime_ns
    for path in (lost_shard, tmp_path / models.LORA_WEIGHT_NAME):
        path.unlink()
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-2")
    shutil.rmtree(tmp_path / "iteration-1")
    count_pipeline_calls.clear()

    summary = spin.main(argv + ["--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 2 and [h["iteration"] for h in summary["history"]] == [1]
    assert count_pipeline_calls == [4]  # only the missing shard; iteration 0 is not revisited at all
    assert summary["iterations"][0]["generated_shards"] == 1 and summary["iterations"][0]["reused_shards"] == 1
    assert kept_shard.stat().st_mtime_ns == kept_mtime
    assert lost_shard.read_bytes() == lost_bytes  # regenerated identically: per-shard seeds
    assert summary["history"][0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # the opponent was reloaded
    final_b = read_lora(tmp_path)
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)

    # a fresh start with other generation settings must not silently reuse iteration 0's samples: refused as the
    # folder of another run, and, with --overwrite_output_dir (which keeps spin_cache/), by the sample cache itself
    with pytest.raises(ValueError, match="holds a run of spin"):
        spin.main(spin_argv(tiny_sd15, pickapic_parquet, tmp_path, "--generation_steps", "3", steps=2))
    with pytest.raises(ValueError, match="other settings .*steps"):
        spin.main(spin_argv(tiny_sd15, pickapic_parquet, tmp_path, "--generation_steps", "3", "--overwrite_output_dir",
                            steps=2))


def test_sdxl_self_play_step(tiny_sdxl, feedback_parquet, tmp_path):
    """SDXL (micro-conditioning of real and generated images) and binary feedback (desirable images are real)."""
    summary = spin.main(spin_argv(tiny_sdxl, feedback_parquet, tmp_path, "--max_train_samples", "12", steps=2,
                                  iterations=1))
    assert summary["family"] == "sdxl" and summary["global_step"] == 2
    assert summary["history"][0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    generated = generation.GeneratedLatents(tmp_path / generation.CACHE_DIR / "iteration-0")
    assert sorted(generated.where) == list(range(8))  # rows 0-7 of the 12 read are the desirable ones
    assert_lora_loads_and_changes_output("sdxl", tiny_sdxl, tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--num_iterations", "3"], "must split evenly into --num_iterations 3"),
    (["--num_iterations", "0"], "--num_iterations must be positive"),
    (["--resolution", "30"], "--resolution must be a positive multiple of 8"),
    (["--preset", "sd15-dpo"], "is for --method dpo"),
    (["--preset", "nope"], "no preset 'nope'"),
])
def test_bad_flags_are_rejected_with_a_message(extra, message, capsys):
    with pytest.raises(SystemExit):
        spin.parse_args(spin_argv("m", "d", "out", *extra))
    assert message in capsys.readouterr().err


def test_preset_and_bad_scheduler(tiny_sd15, pickapic_parquet, tmp_path):
    args = spin.parse_args(spin_argv("m", "d", "o")[:6] + ["--preset", "sd15-spin"])
    assert (args.rank, args.beta, args.max_train_steps, args.steps_per_iteration) == (8, 5000.0, 10_000, 5000)
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        spin.main(spin_argv(tiny_sd15, pickapic_parquet, tmp_path, "--generation_scheduler", "Nope"))
