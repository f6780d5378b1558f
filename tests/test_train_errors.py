"""Bad flags and bad data fail at start with a message that names the problem; bad rows mid-epoch are skipped."""

from __future__ import annotations

import logging

import pytest

import minipref
from full.trainers import offline as train
from tests import tiny_models
from tests.conftest import train_argv


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2  # argparse's usage error, not a stack trace
    return capsys.readouterr().err


def test_unknown_method_lists_every_method(capsys, tmp_path):
    err = _usage_error(capsys, train_argv("unused", "unused.parquet", tmp_path, "ppo"))
    assert "unknown method 'ppo'" in err
    assert all(name in err for name in minipref.OBJECTIVES)


@pytest.mark.parametrize("method", ["spin", "spo"])
def test_online_methods_point_to_their_script(capsys, tmp_path, method):
    err = _usage_error(capsys, train_argv("unused", "unused.parquet", tmp_path, method))
    assert f"accelerate launch -m full.{method}" in err


@pytest.mark.parametrize("extra,needle", [
    ([], "--clip_model_name_or_path"),  # contrast without embeddings
    (["--resolution", "30"], "multiple of 8"),
    (["--train_batch_size", "0"], "--train_batch_size must be positive"),
])
def test_bad_flags(capsys, tmp_path, extra, needle):
    assert needle in _usage_error(capsys, train_argv("unused", "unused.parquet", tmp_path, "contrast", *extra))


def test_desirable_ratio_is_for_binary_methods(capsys, tmp_path):
    err = _usage_error(capsys, train_argv("unused", "x.parquet", tmp_path, "dpo", "--desirable_ratio", "0.8"))
    assert "--desirable_ratio" in err


def test_dataset_and_cache_are_exclusive(capsys, tmp_path):
    err = _usage_error(capsys, train_argv("unused", "x.parquet", tmp_path, "dpo") + ["--cached_dir", str(tmp_path)])
    assert "exactly one of --dataset_name and --cached_dir" in err


def test_pair_method_on_binary_feedback_names_the_schemas(tiny_sd15, feedback_parquet, tmp_path):
    with pytest.raises(ValueError, match=r"needs preference pairs .*jpg_0.* holds binary feedback"):
        train.main(train_argv(tiny_sd15, feedback_parquet, tmp_path, "dpo"))


def test_dataset_with_nothing_usable_fails_at_start(tiny_sd15, tmp_path):
    bad = tiny_models.make_pickapic_parquet(tmp_path / "bad.parquet", 4, corrupt_rows=range(4))
    with pytest.raises(ValueError, match="no usable rows"):
        train.main(train_argv(tiny_sd15, bad, tmp_path / "out", "dpo"))


def test_missing_column_is_named(tiny_sd15, tmp_path):
    bad = tiny_models.make_pickapic_parquet(tmp_path / "bad.parquet", 4, drop_columns=["caption"])
    with pytest.raises(ValueError, match=r"missing column.*caption"):
        train.main(train_argv(tiny_sd15, bad, tmp_path / "out", "dpo", "--data_format", "pairs"))


def test_not_a_pipeline_is_a_clear_error(pickapic_parquet, tmp_path):
    with pytest.raises(ValueError, match="cannot read a diffusers pipeline"):
        train.main(train_argv(str(tmp_path / "nowhere"), pickapic_parquet, tmp_path / "out", "dpo"))


def test_corrupt_images_mid_epoch_are_reported_and_skipped(tiny_sd15, tmp_path, caplog):
    """Rows 1 and 2 hold JPEGs cut in half: the header passes the load-time check, decoding fails mid-epoch."""
    data = tiny_models.make_pickapic_parquet(tmp_path / "d.parquet", 6, truncated_rows=[1, 2])
    with caplog.at_level(logging.WARNING):
        summary = train.main(train_argv(tiny_sd15, data, tmp_path / "out", "dpo", "--train_batch_size", "1", steps=6))
    assert summary["global_step"] == 6  # a full run despite the bad rows
    skipped = " ".join(r.getMessage() for r in caplog.records if "cannot decode image" in r.getMessage())
    assert "row 1" in skipped and "row 2" in skipped
    # and totalled once at the end: 6 usable steps took 1.5 epochs of 4 usable rows, so each bad row was met twice
    assert summary["undecodable"] == 4
    assert "4 training item(s) were skipped because an image could not be decoded" in caplog.text


def test_preset_sets_defaults_and_flags_win(tmp_path):
    from full.presets import load_preset

    preset = load_preset("sd15-kto")
    args = train.parse_args(train_argv("m", "d.parquet", tmp_path, "kto", "--preset", "sd15-kto"))
    assert args.desirable_ratio == preset["desirable_ratio"] and args.utility == preset["utility"]
    argv = train_argv("m", "d.parquet", tmp_path, "kto", "--preset", "sd15-kto", "--learning_rate", "3e-5")
    assert train.parse_args(argv).learning_rate == 3e-5  # train_argv also passes --learning_rate 1e-3: last wins


def test_preset_for_another_method_is_refused(capsys, tmp_path):
    err = _usage_error(capsys, train_argv("m", "d.parquet", tmp_path, "dpo", "--preset", "sd15-kto"))
    assert "--preset sd15-kto is for --method kto" in err


@pytest.mark.parametrize("extra,needle", [
    (["--dpo_loss_type", "cdpo"], "needs --dpo_label_smoothing in (0, 0.5)"),  # would silently be plain DPO
    (["--dpo_label_smoothing", "0.1"], "applies to --dpo_loss_type cdpo or robust"),
    (["--dpo_loss_type", "robust", "--dpo_label_smoothing", "0.5"], "needs --dpo_label_smoothing in (0, 0.5)"),
])
def test_dpo_label_smoothing_goes_with_cdpo_and_robust(capsys, tmp_path, extra, needle):
    assert needle in _usage_error(capsys, train_argv("unused", "x.parquet", tmp_path, "dpo", *extra))
