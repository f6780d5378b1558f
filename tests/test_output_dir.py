"""An output folder belongs to one run, and what a trainer can check without a model it checks before one loads
(full/run/output_dir.py, full/cli.py). Each test is a defect an outside trial of the console scripts hit (issue
20): the run it describes used to train, mix or crash; here it is one line (a ValueError, which `entry_point`
prints as one line with exit status 2) or a parse error, or a model card that says what the run did."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from full import models
from full.run import checkpoints, output_dir, outputs
from full.trainers import offline
from tests.conftest import train_argv


def dpo_run(model, data, out, *extra):
    return offline.main(train_argv(model, data, out, "dpo", "--checkpointing_steps", "2", *extra, steps=2))


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        offline.parse_args(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "Traceback" not in message
    return message


@pytest.mark.slow
def test_a_reused_output_dir_is_refused_unless_resumed_by_the_same_run_or_overwritten(tiny_sd15, pickapic_parquet,
                                                                                       tmp_path):
    out = tmp_path / "run"
    dpo_run(tiny_sd15, pickapic_parquet, out)
    assert (out / "checkpoint-2" / output_dir.RECORD_NAME).is_file()  # every checkpoint knows its run
    kto = train_argv(tiny_sd15, pickapic_parquet, out, "kto", steps=2)
    with pytest.raises(ValueError, match=r"--output_dir .* holds a run of dpo on sd15: checkpoint-2"):
        offline.main(kto)
    with pytest.raises(ValueError, match=r"belongs to another run: method 'dpo' \(now 'kto'\)"):
        offline.main(kto + ["--resume_from_checkpoint", "latest"])  # it used to resume KTO from DPO's weights
    with pytest.raises(ValueError, match=r"rank 8 \(now 4\)"):  # used to be a 40-100 line size-mismatch traceback
        offline.main(train_argv(tiny_sd15, pickapic_parquet, tmp_path / "other", "dpo", "--rank", "4",
                                "--resume_from_checkpoint", str(out / "checkpoint-2"), steps=2))
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest continues it"):  # the same run again
        dpo_run(tiny_sd15, pickapic_parquet, out)
    summary = offline.main(kto + ["--overwrite_output_dir"])
    assert summary["global_step"] == 2 and not checkpoints.list_checkpoints(out)[:-1]
    assert json.loads((out / output_dir.RECORD_NAME).read_text())["method"] == "kto"
    assert "# kto LoRA" in (out / "README.md").read_text()


@pytest.mark.slow
def test_broken_checkpoint_folders_are_one_line(tiny_sd15, pickapic_parquet, tmp_path):
    out = tmp_path / "run"
    dpo_run(tiny_sd15, pickapic_parquet, out)
    resume = ["--max_train_steps", "4", "--resume_from_checkpoint"]
    (out / "checkpoint-3").mkdir()  # empty: "latest" picks it
    with pytest.raises(ValueError, match=r"checkpoint-3: not a complete minipref checkpoint \(missing minipref_run"):
        dpo_run(tiny_sd15, pickapic_parquet, out, *resume, "latest")
    shutil.rmtree(out / "checkpoint-3")
    truncated = out / "checkpoint-2" / checkpoints.PROGRESS_NAME
    truncated.write_bytes(truncated.read_bytes()[:5])
    with pytest.raises(ValueError, match=r"checkpoint-2 could not be loaded: "):
        dpo_run(tiny_sd15, pickapic_parquet, out, *resume, "latest")
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        dpo_run(tiny_sd15, pickapic_parquet, out, *resume, "checkpoint-7")


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_the_retry(tiny_sd15, pickapic_parquet,
                                                                                   tmp_path):
    with pytest.raises(ValueError, match="missing column"):  # fails on the data, after the folder was claimed
        dpo_run(tiny_sd15, pickapic_parquet, tmp_path / "run", "--caption_column", "prompt")
    assert (tmp_path / "run" / output_dir.RECORD_NAME).is_file()
    assert dpo_run(tiny_sd15, pickapic_parquet, tmp_path / "run")["global_step"] == 2


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(tiny_sd15, pickapic_parquet, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        dpo_run(tiny_sd15, pickapic_parquet, blocker)
    with pytest.raises(ValueError, match="cannot be written"):
        dpo_run(tiny_sd15, pickapic_parquet, blocker / "under_a_file")


def test_push_to_hub_without_the_hub_fails_before_training(tiny_sd15, pickapic_parquet, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--push_to_hub run: HF_HUB_OFFLINE is set"):
        dpo_run(tiny_sd15, pickapic_parquet, tmp_path / "run", "--push_to_hub")
    assert not (tmp_path / "run" / models.LORA_WEIGHT_NAME).exists()


def test_a_failed_push_after_training_says_where_the_weights_are(tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(**kwargs):
        raise ConnectionError("no route to the Hub\nsecond line of a long story")

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, exist_ok, token: type("R", (), {
        "repo_id": repo_id})())
    monkeypatch.setattr(huggingface_hub, "upload_folder", refuse)
    with pytest.raises(ValueError, match=r"training finished and .* holds its weights and card, but --push_to_hub "
                                         r"to me/x failed: no route to the Hub; upload later"):
        outputs.push_to_hub(tmp_path, "me/x")


@pytest.mark.parametrize("method, flags, complaint", [
    ("dpo", ["--lr_scheduler", "nope"], "--lr_scheduler must be one of linear, cosine"),
    ("dpo", ["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be positive"),
    ("dpo", ["--utility", "loss_averse"], "--utility applies to --method kto, not dpo"),
    ("dpo", ["--dspo_variant", "dspo_e"], "--dspo_variant applies to --method dspo, not dpo"),
    ("contrast", ["--clip_model_name_or_path", "./models/missing-clip"],  # used to ask the Hub for a minute
     "--clip_model_name_or_path ./models/missing-clip: no such local directory"),
    ("dpo", ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "give one"),
])
def test_flags_that_need_no_model_are_checked_at_parse_time(tiny_sd15, pickapic_parquet, tmp_path, capsys, method,
                                                            flags, complaint):
    assert complaint in parse_error(capsys, train_argv(tiny_sd15, pickapic_parquet, tmp_path, method, *flags))


def test_flags_of_other_methods_are_unset_so_args_and_card_list_only_what_was_used(tiny_sd15, pickapic_parquet,
                                                                                    tmp_path):
    args = offline.parse_args(train_argv(tiny_sd15, pickapic_parquet, tmp_path, "dpo"))
    assert args.utility is None and args.dspo_variant is None and args.dpo_loss_type == "sigmoid"
    args = offline.parse_args(train_argv(tiny_sd15, pickapic_parquet, tmp_path, "kto", "--utility", "loss_averse"))
    assert args.utility == "loss_averse" and args.dpo_loss_type is None


@pytest.mark.slow
def test_the_model_card_says_what_the_run_used(tiny_sd15, pickapic_parquet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.umask(0o022)
    shutil.copytree(tiny_sd15, tmp_path / "base")
    dpo_run("base", pickapic_parquet, tmp_path / "run")  # a relative model path
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"base_model: {tmp_path / 'base'}" in card  # absolute: the card is read from elsewhere
    assert "| `beta` | 5000.0 |" in card  # the default, resolved
    assert "`utility`" not in card and "`dspo_variant`" not in card  # flags DPO does not read
    assert "1 x 2 x 1 = global batch 2" in card
    assert "Means over the last 2 optimizer step(s)" in card
    mode = stat.S_IMODE((tmp_path / "run" / models.LORA_WEIGHT_NAME).stat().st_mode)
    assert mode == 0o644  # safetensors alone writes 0600


def test_final_metrics_average_the_last_steps_and_leave_nan_out():
    history = [{"loss": 9.0}] + [{"loss": 1.0, "reward_desirable": float("nan")}] * 19 + [{"loss": 3.0,
                                                                                          "reward_desirable": 2.0}]
    means, steps = outputs.final_metrics(history)
    assert steps == outputs.FINAL_STEPS == 20 and means == {"loss": 1.1, "reward_desirable": 2.0}


def test_resuming_with_another_global_batch_layout_is_refused(tmp_path):
    identity = {"method": "dpo", "family": "sd15", "base_model": "m", "rank": 8, "data": {}, "num_processes": 2,
                "train_batch_size": 2, "gradient_accumulation_steps": 1}
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for name in (checkpoints.PROGRESS_NAME, "random_states_0.pkl", "random_states_1.pkl"):
        (checkpoint / name).write_bytes(b"x")
    (checkpoint / output_dir.RECORD_NAME).write_text(json.dumps(identity))
    output_dir.check_checkpoint(checkpoint, identity)  # the same run: accepted
    with pytest.raises(ValueError, match=r"another global batch layout: num_processes 2 \(now 1\)"):
        output_dir.check_checkpoint(checkpoint, identity | {"num_processes": 1})


def test_what_a_checkpoint_holds_besides_the_weights_is_part_of_the_run():
    """accelerate loads a checkpoint's extra objects (the stream's place, the EMA) by position only: a resume that
    switches --streaming or --use_ema would load one into the other, so the record names both. A record written
    before they were recorded had them off."""
    now = {"method": "dpo", "streaming": False, "use_ema": True}
    assert output_dir.differences({"method": "dpo", "streaming": False, "use_ema": True}, now) == []
    assert output_dir.differences({"method": "dpo"}, now) == ["use_ema False (now True)"]
    assert output_dir.differences({"method": "dpo", "streaming": True, "use_ema": True}, now) == [
        "streaming True (now False)"]
