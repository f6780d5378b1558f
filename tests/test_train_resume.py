"""Checkpoints: resume reproduces the uninterrupted run, a crash mid-save keeps the previous checkpoint, a
non-finite loss stops the run before it touches the weights. All on CPU with a fixed seed, in-process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from full import models
from full.models import lora
from full.run import checkpoints
from full.trainers import offline as train
from full.trainers.objective import Objective
from tests.conftest import train_argv

# 2 micro-batches per step, 5 pairs per epoch: the 4 steps cross an epoch boundary, and the step after the
# checkpoint starts mid-epoch, so the resumed run must skip exactly the batches already seen.
FLAGS = ["--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_train_samples", "5",
         "--lr_scheduler", "cosine", "--checkpointing_steps", "2"]


def lora_weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / models.LORA_WEIGHT_NAME))


def fail_on_call(monkeypatch, module, name: str, call: int, make_error):
    """Replace module.name so that its `call`-th call fails (after running, if make_error returns None)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            return make_error(real, *args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def killed_inside_step_3(monkeypatch, argv) -> None:
    """Run `full.train` with 2 micro-batches per step and kill it at micro-batch 6 (inside step 3), as a
    KeyboardInterrupt would, after `checkpoint-2` was written."""

    def crash(real, *args, **kwargs):
        raise KeyboardInterrupt("simulated kill after checkpoint-2")

    with monkeypatch.context() as patch:
        fail_on_call(patch, Objective, "loss", 6, crash)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)


def kill_and_resume(model, data, tmp_path, monkeypatch, flags) -> tuple[dict, dict, dict]:
    """A 4-step DPO run uninterrupted (in ``a``) and killed inside step 3 then resumed (in ``b``): the resumed LoRA
    equals the uninterrupted one (atol 1e-7: same process, kernels and inputs, deterministic by construction) and the
    steps after the checkpoint moved it (the comparison is not vacuous). Returns both runs' summaries and the LoRA."""
    uninterrupted = train.main(train_argv(model, data, tmp_path / "a", "dpo", *flags, steps=4))
    assert uninterrupted["global_step"] == 4

    argv = train_argv(model, data, tmp_path / "b", "dpo", *flags, steps=4)
    killed_inside_step_3(monkeypatch, argv)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "b")] == ["checkpoint-2"]
    assert not (tmp_path / "b" / models.LORA_WEIGHT_NAME).exists()

    resumed = train.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["global_step"] == 4
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)
    # and the weights did move between the checkpoint and the end (the comparison is not vacuous)
    mid = lora_weights(tmp_path / "b" / "checkpoint-2")
    assert any((mid[k] - a[k]).abs().max() > 1e-5 for k in a)
    return uninterrupted, resumed, a


def test_resumed_run_ends_with_the_same_lora_as_an_uninterrupted_run(tiny_sd15, pickapic_parquet, tmp_path, monkeypatch):
    kill_and_resume(tiny_sd15, pickapic_parquet, tmp_path, monkeypatch, FLAGS)


def test_crash_while_saving_leaves_the_previous_checkpoint_intact(tiny_sd15, pickapic_parquet, tmp_path, monkeypatch):
    def disk_full(real, family, unet, directory, **kwargs):
        real(family, unet, directory, **kwargs)  # the LoRA file is written, the rest of the state is not
        raise OSError("simulated: disk full while saving")

    argv = train_argv(tiny_sd15, pickapic_parquet, tmp_path, "dpo", "--checkpointing_steps", "2", steps=4)
    with monkeypatch.context() as patch:
        fail_on_call(patch, lora, "save_lora", 2, disk_full)  # the save of checkpoint-4
        with pytest.raises(OSError, match="disk full"):
            train.main(argv)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    good = tmp_path / "checkpoint-2"
    assert {"optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", models.LORA_WEIGHT_NAME} <= {p.name for p in good.iterdir()}
    assert checkpoints.resolve_checkpoint("latest", tmp_path) == good  # the partial `.checkpoint-4.tmp` is never picked
    assert train.main(argv + ["--resume_from_checkpoint", "latest"])["global_step"] == 4


def test_checkpoints_total_limit_prunes_oldest(tiny_sd15, pickapic_parquet, tmp_path):
    train.main(train_argv(tiny_sd15, pickapic_parquet, tmp_path, "sft", "--checkpointing_steps", "1",
                          "--checkpoints_total_limit", "2", steps=3))
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_sd15, pickapic_parquet, tmp_path,
                                                                                   monkeypatch):
    def nan_loss(real, *args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    fail_on_call(monkeypatch, Objective, "loss", 3, nan_loss)
    with pytest.raises(SystemExit) as stop:
        train.main(train_argv(tiny_sd15, pickapic_parquet, tmp_path, "dpo", "--checkpointing_steps", "2", steps=4))
    message = str(stop.value)
    assert "non-finite loss" in message and "step 3" in message and "checkpoint-2" in message
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not (tmp_path / models.LORA_WEIGHT_NAME).exists()
