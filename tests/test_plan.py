"""full/plan.py: the per-GPU memory rows are the bytes of real tensors (tiny SD1.5 / SDXL after a real optimizer step),
the parameter counts are the real architectures', and the printed plan does the batch and learning-rate arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from full import plan, presets


def unet_of(model_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")  # fp32, as --train_mode full trains


def one_step(unet, params, optimizer_name: str):
    """A real forward, backward and optimizer step (the trainer's settings) on ``params``."""
    config, g = unet.config, torch.Generator().manual_seed(0)
    side = config.sample_size
    cond = {"encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=g)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.randn(2, 6)}
    out = unet(torch.randn(2, config.in_channels, side, side, generator=g), torch.tensor([10, 900]), **cond).sample
    out.pow(2).mean().backward()
    if optimizer_name == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, lr=1e-3, weight_decay=0.01, clip_threshold=1.0, scale_parameter=False,
                              relative_step=False, warmup_init=False)  # as full/run/accelerator.py builds it
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()
    return optimizer


def real_bytes(params, optimizer) -> dict[str, int]:
    return {"trained weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
            "optimizer state": sum(v.numel() * v.element_size() for state in optimizer.state.values()
                                   for v in state.values() if torch.is_tensor(v))}


def mismatches(rows, real: dict[str, int]) -> list[str]:
    planned = {row.label: row.bytes for row in rows}
    return [f"{label}: planned {planned.get(label)}, real {value}" for label, value in real.items()
            if planned.get(label) != value]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("optimizer_name", ["adamw", "adafactor"])
def test_full_mode_rows_are_the_bytes_of_the_real_tensors(family, optimizer_name, request):
    unet = unet_of(request.getfixturevalue(f"tiny_{family}"))
    params = list(unet.parameters())
    real = real_bytes(params, one_step(unet, params, optimizer_name))
    shapes = plan.parameter_shapes(dict(unet.config))
    assert plan.count(shapes) == sum(p.numel() for p in params)
    rows = plan.trained_rows(shapes, "ddp", 1, optimizer_name, "bf16")
    assert mismatches(rows, real) == []
    # the frozen reference: a copy of the start in the weight dtype (bf16: 2 bytes per weight)
    reference = sum(p.numel() * p.element_size() for p in unet_of(request.getfixturevalue(f"tiny_{family}"))
                    .to(torch.bfloat16).parameters())
    assert reference == plan.weight_bytes("bf16") * plan.count(shapes)


def test_a_wrong_optimizer_model_is_caught(tiny_sd15, monkeypatch):
    """The comparison above fails for plausible mistakes: AdamW with one moment, Adafactor without factoring."""
    unet = unet_of(tiny_sd15)
    params = list(unet.parameters())
    shapes = plan.parameter_shapes(dict(unet.config))
    real = real_bytes(params, one_step(unet, params, "adamw"))
    monkeypatch.setattr(plan, "ADAMW_MOMENTS", 1)  # forgets exp_avg_sq
    wrong = mismatches(plan.trained_rows(shapes, "ddp", 1, "adamw", "bf16"), real)
    assert [m.split(":")[0] for m in wrong] == ["optimizer state"]
    monkeypatch.undo()

    unet = unet_of(tiny_sd15)
    params = list(unet.parameters())
    real = real_bytes(params, one_step(unet, params, "adafactor"))
    unfactored = 4 * plan.count(shapes) + 4 * len(shapes)  # a full second moment per tensor, as if nothing factored
    assert real["optimizer state"] != unfactored
    assert real["optimizer state"] == plan.optimizer_state_bytes(shapes, "adafactor")


def test_lora_rows_are_the_bytes_of_the_real_adapter(tiny_sd15):
    from full.models.lora import add_lora, lora_parameters

    unet = unet_of(tiny_sd15)
    add_lora(unet, rank=4)
    params = lora_parameters(unet)
    shapes = plan.parameter_shapes(dict(unet_of(tiny_sd15).config), lora_rank=4)
    assert sorted(shapes) == sorted(tuple(p.shape) for p in params)
    real = real_bytes(params, one_step(unet, params, "adamw"))
    assert mismatches(plan.trained_rows(shapes, "ddp", 1, "adamw", "bf16"), real) == []


def test_the_real_architectures_parameter_counts():
    """Counted from full/models/configs on the meta device; the published sizes of SD1.5 (~860M) and SDXL (~2.6B)."""
    counts = {name: plan.count(plan.parameter_shapes(name))
              for name in ("sd15_unet", "sdxl_unet", "vae", "clip_text_l14", "clip_text_bigg14")}
    assert counts == {"sd15_unet": 859_520_964, "sdxl_unet": 2_567_463_684, "vae": 83_653_863,
                      "clip_text_l14": 123_060_480, "clip_text_bigg14": 694_659_840}


def test_sharded_engines_split_the_state_and_ddp_keeps_it_whole():
    shapes = plan.parameter_shapes("sd15_unet")
    n = plan.count(shapes)
    ddp = {r.label: r.bytes for r in plan.trained_rows(shapes, "ddp", 8, "adamw", "bf16")}
    assert ddp["trained weights"] == ddp["gradients"] == ddp["DDP gradient buckets"] == 4 * n
    fsdp = {r.label: r.bytes for r in plan.trained_rows(shapes, "fsdp", 8, "adamw", "bf16")}
    assert fsdp["trained weights"] == fsdp["gradients"] == 4 * math.ceil(n / 8)
    assert fsdp["optimizer state"] == 8 * math.ceil(n / 8) + 4
    zero2 = {r.label: r.bytes for r in plan.trained_rows(shapes, "zero2", 8, "adamw", "bf16")}
    zero3 = {r.label: r.bytes for r in plan.trained_rows(shapes, "zero3", 8, "adamw", "bf16")}
    assert zero2["trained weights"] == 2 * n + 4 * math.ceil(n / 8)  # the bf16 module stays whole under ZeRO-2
    assert zero3["trained weights"] == 2 * n // 8 + 4 * math.ceil(n / 8)
    # flat 1-D shards: Adafactor keeps a full second moment there (full/launch/fsdp_check.py shows the 1-D shards)
    assert plan.optimizer_state_bytes([(math.ceil(n / 8),)], "adafactor") == 4 * math.ceil(n / 8) + 4
    # factored on whole tensors: ~2.1 bytes per weight, not ~0: a 3x3 conv (o, i, 3, 3) keeps (o, i, 3) rows and columns
    assert plan.optimizer_state_bytes(shapes, "adamw") / 4 < plan.optimizer_state_bytes(shapes, "adafactor") < 2.2 * n


def test_the_activation_estimate_is_smaller_with_checkpointing_and_restores_attention(tiny_sd15):
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    config = dict(unet_of(tiny_sd15).config)
    without, with_ = (plan.activation_bytes_per_image(config, 128, c) for c in (False, True))
    assert 0 < with_ < without
    assert plan.activation_bytes_per_image(config, 256, False) > 3 * without  # 4x the latent pixels
    assert F.scaled_dot_product_attention is real


def plan_lines(text: str) -> dict[str, str]:
    return {line[:12].strip(): line[12:].strip() for line in text.splitlines() if line[:12].strip()}


def test_plan_of_diffusion_dpo_on_8_gpus_keeps_the_batch_and_scales_the_rate():
    text = presets.preset_plan("sd15-dpo-full", "ddp", 8)
    lines = plan_lines(text)
    assert lines["batch"].startswith("8 x 1 per GPU x 256 accumulation = 2048 pairs")
    assert lines["learning"].startswith("1e-08 x 2048 (--scale_lr) = 2.048e-05")
    assert "accumulation 128 -> 256" in lines["GPUs"]
    assert "859,520,964 parameters" in lines["UNet"] and "[ESTIMATED]" in text
    assert "DDP gradient buckets" in text
    one = presets.preset_plan("sd15-dpo-full", "ddp", 1)  # 1 x 1 x 2048 = the same batch; no DDP wrapper, no buckets
    assert plan_lines(one)["batch"].startswith("1 x 1 per GPU x 2048 accumulation = 2048 pairs")
    assert "DDP gradient buckets" not in one


@pytest.mark.parametrize("name", [n for n in presets.available_presets() if n.endswith("-full")])
def test_every_full_preset_prints_its_plan(name):
    details = presets.preset_details(name)
    text = presets.preset_plan(name, "fsdp")
    stated = presets.preset_processes(details)
    flags = presets.load_preset(name)
    effective = stated * flags["train_batch_size"] * flags["gradient_accumulation_steps"]
    assert f"= {effective} " in plan_lines(text)["batch"]
    assert "frozen reference UNet" in text and "total" in text


def test_dspo_schedule_and_kto_rate():
    dspo = plan_lines(presets.preset_plan("sd15-dspo-full"))
    assert dspo["learning"].startswith("2.048e-08 (not scaled)")
    assert "inverse_sqrt" in dspo["schedule"] and "ends inside the warm-up" in dspo["schedule"]
    assert plan.schedule_text({"lr_scheduler": "inverse_sqrt", "lr_warmup_steps": 2000, "max_train_steps": 8000},
                              2.048e-8).endswith("lr at step 8000: 1.024e-08")  # lr x sqrt(2000 / 8000)
    kto = plan_lines(presets.preset_plan("sd15-kto-full"))
    assert kto["batch"].startswith("16 x 2 per GPU x 1 accumulation = 32 images")


def test_plan_errors_are_one_line(capsys):
    assert presets.main(["sd15-dpo-full", "--plan", "--engine", "zero4"]) == 2
    assert "unknown engine 'zero4'; engines: ddp, zero2, zero3, fsdp" in capsys.readouterr().err
    assert presets.main(["sd15-dpo-full", "--plan", "--engine", "zero3", "--use_ema"]) == 2
    assert "refuses EMA" in capsys.readouterr().err
    assert presets.main(["sd21-dpo-full", "--plan"]) == 2
    assert "available presets: " in capsys.readouterr().err


def test_accumulation_and_engine_from_the_environment(monkeypatch):
    assert plan.accumulation_for(16, 128, 8) == 256 and plan.accumulation_for(1, 8, 8) == 1
    assert plan.accumulation_for(4, 128, 16) == 32 and plan.accumulation_for(16, 128, 1) == 2048
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert plan.engine_from_environment() == ("ddp", 8)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert plan.engine_from_environment() == ("zero3", 8)
