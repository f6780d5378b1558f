"""`full.train --streaming` (full/data/streaming.py): every usable row once per epoch and per process, rows checked
and counted as the table reader checks them, a seeded order, a resume that skips ahead without decoding and ends
with the LoRA of an uninterrupted run; the column flags; an image folder with a metadata file as feedback."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from full import data, models
from full.data.columns import ColumnMap
from full.data.images import FeedbackDataset, PairDataset
from full.data.streaming import StreamedRows, open_stream
from full.run import checkpoints
from full.trainers import offline as train
from tests import tiny_models
from tests.conftest import train_argv
from tests.data_helpers import pickapic_rows, write_parquet
from tests.test_train_resume import killed_inside_step_3, lora_weights

PAIRS = ColumnMap({name: name for name in data.PAIR_COLUMNS})


def stream_rows(path, *, rank=0, world=1, seed=0, buffer=4, max_rows=None, threads=0, kind="pairs"):
    columns = PAIRS if kind == "pairs" else ColumnMap({n: n for n in data.FEEDBACK_COLUMNS})
    stream = open_stream(str(path), "train", columns, max_rows, seed=seed, buffer_size=buffer, process_index=rank,
                         num_processes=world)
    images = (PairDataset if kind == "pairs" else FeedbackDataset)(None, 8, random_flip=True, seed=seed)
    return StreamedRows(stream, kind, images, name=str(path), decode_threads=threads)


def epoch_ids(rows: StreamedRows, epoch: int = 0) -> list[int]:
    rows.set_epoch(epoch)
    return [item["row_id"] for item in rows]


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    """12 pairs in two files (rows 0-5, 6-11): row 2 has garbage bytes, row 7 label 0.3, rows 5 and 11 are ties."""
    root = tmp_path_factory.mktemp("two_files")
    rows = pickapic_rows([1, 0, 1, 0, 1, 0.5, 0, 0.3, 1, 0, 1, 0.5])
    rows[2]["jpg_0"] = b"not an image"
    write_parquet(root / "train-00000-of-00002.parquet", rows[:6])
    write_parquet(root / "train-00001-of-00002.parquet", rows[6:])
    return root


USABLE = [0, 1, 3, 4, 6, 8, 9, 10]


def test_an_epoch_holds_every_usable_row_once_and_reports_the_others_with_their_ids(two_files, caplog):
    rows = stream_rows(two_files)
    with caplog.at_level(logging.WARNING):
        ids = epoch_ids(rows)
    assert sorted(ids) == USABLE and ids != USABLE  # shuffled, complete, no repeats
    assert rows.counts == {"read": 12, "usable": 8, "ties": 2, "malformed": 2}
    assert "skipping row 2: unreadable image bytes" in caplog.text and "skipping row 7: bad label_0" in caplog.text
    # the order is a function of (seed, epoch): the same again, another in the next epoch or with another seed
    assert epoch_ids(stream_rows(two_files)) == ids
    assert sorted(epoch_ids(rows, 1)) == USABLE and epoch_ids(rows, 1) != ids
    assert epoch_ids(stream_rows(two_files, seed=1)) != ids
    # --max_train_samples: the first rows of the source, as the table reader counts them
    assert sorted(epoch_ids(stream_rows(two_files, max_rows=7))) == [0, 1, 3, 4, 6]


@pytest.mark.parametrize("world", [2, 3])  # 2: a file per process; 3: every third row of the shuffled stream
def test_processes_get_disjoint_shares_that_cover_the_epoch(two_files, world):
    shares = [epoch_ids(stream_rows(two_files, rank=rank, world=world)) for rank in range(world)]
    assert sorted(sum(shares, [])) == USABLE
    assert all(shares)


def test_items_are_the_rows_decoded_winner_first_with_threads_or_without(two_files):
    plain, threaded = stream_rows(two_files), stream_rows(two_files, threads=3)
    plain.set_epoch(0), threaded.set_epoch(0)
    a, b = list(plain), list(threaded)
    assert [x["row_id"] for x in a] == [x["row_id"] for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x["pixel_values"], y["pixel_values"], rtol=0, atol=0)
    by_id = {x["row_id"]: x for x in a}
    # pickapic_rows: jpg_0 red, jpg_1 blue; row 1 has label 0, so its winner is the blue image
    red, blue = by_id[0]["pixel_values"][0].mean((1, 2)), by_id[1]["pixel_values"][0].mean((1, 2))
    assert red[0] > red[2] and blue[2] > blue[0]


def test_a_resume_skips_ahead_without_decoding(two_files, monkeypatch):
    full_epoch = epoch_ids(stream_rows(two_files), 1)
    rows = stream_rows(two_files)
    decoded = []
    real = rows.images.prepare
    monkeypatch.setattr(rows.images, "prepare", lambda row, key: decoded.append(key) or real(row, key))
    rows.skip_items = 3
    assert epoch_ids(rows, 1) == full_epoch[3:]
    assert decoded == full_epoch[3:]  # the skipped items were checked, never decoded
    assert epoch_ids(rows, 2) != [] and rows.skip_items == 0  # the skip applies once


def test_a_killed_streaming_run_resumes_to_the_same_rows_and_lora(tiny_sd15, tmp_path, monkeypatch):
    """2 micro-batches per step and 6 usable pairs per epoch: step 3 (the crash) starts mid-epoch, step 4 is in
    epoch 1. The resumed run must train on exactly the rows the uninterrupted run trained on after the
    checkpoint, in the same order, and end with its LoRA bit for bit."""
    source = tiny_models.make_pickapic_parquet(tmp_path / "pp.parquet", 7, 32, n_ties=1)
    flags = ["--streaming", "--shuffle_buffer_size", "3", "--train_batch_size", "1",
             "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    seen = []
    real_inputs = train.inputs_from_images
    monkeypatch.setattr(train, "inputs_from_images", lambda batch, *a, **k: seen.append(batch["row_ids"][0])
                        or real_inputs(batch, *a, **k))

    uninterrupted = train.main(train_argv(tiny_sd15, source, tmp_path / "a", "dpo", *flags, steps=4))
    order = list(seen)
    assert uninterrupted["global_step"] == 4 and len(order) == 8
    assert sorted(order[:6]) == list(range(6))  # epoch 0: every usable row once (row 6 is a tie)

    seen.clear()
    argv = train_argv(tiny_sd15, source, tmp_path / "b", "dpo", *flags, steps=4)
    killed_inside_step_3(monkeypatch, argv)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "b")] == ["checkpoint-2"]
    seen.clear()
    assert (tmp_path / "b" / "checkpoint-2" / checkpoints.STREAM_NAME).is_file()  # the stream's place
    places = []
    real_resume = StreamedRows.resume
    monkeypatch.setattr(StreamedRows, "resume", lambda self, state: places.append(state) or real_resume(self, state))
    resumed = train.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["global_step"] == 4
    assert seen == order[4:]  # micro-batches 5..8: no row of epoch 0 twice, none missed
    assert [(p["epoch"], p["items"]) for p in places] == [(0, 4)]  # restarted at its place, not skipped ahead
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    mid = lora_weights(tmp_path / "b" / "checkpoint-2")
    assert any((mid[k] - a[k]).abs().max() > 1e-5 for k in a)  # the steps after the checkpoint changed the LoRA


def test_two_processes_end_each_epoch_together_when_their_shares_differ(tiny_sd15, tmp_path):
    """2 real processes (gloo): rank 0's share of the stream holds 5 usable pairs, rank 1's 2 (row 0 is corrupt, row 8
    a tie). An epoch is 2 micro-batches for both, so after 3 steps the run is at epoch 1, batch 1; were the shorter
    share not to end the epoch for both, rank 0 (whose progress the checkpoint holds) would be at epoch 0, batch 3."""
    from tests.two_processes import ROOT, launch_two

    source = tiny_models.make_pickapic_parquet(tmp_path / "pp.parquet", 9, 32, n_ties=1, corrupt_rows=[0])
    shares = [epoch_ids(stream_rows(source, rank=rank, world=2, buffer=1000)) for rank in (0, 1)]
    assert [len(share) for share in shares] == [5, 2] and sorted(sum(shares, [])) == list(range(1, 8))
    argv = train_argv(tiny_sd15, source, tmp_path / "out", "dpo", "--streaming", "--train_batch_size", "1",
                      "--checkpointing_steps", "3", steps=3)
    result = launch_two(str(ROOT / "full" / "train.py"), *argv)
    assert "on 2 process(es)" in result.stderr  # report_stream_rows: the rows of both processes, said once
    progress = torch.load(tmp_path / "out" / "checkpoint-3" / "custom_checkpoint_0.pkl", weights_only=False)
    assert (progress["epoch"], progress["batch_in_epoch"], progress["global_step"]) == (1, 1, 3)


def test_an_unreachable_hub_dataset_says_what_to_do_instead():
    # conftest sets HF_HUB_OFFLINE: the Hub's file listing fails as it would offline, gated or renamed
    with pytest.raises(ValueError, match=r"'someone/nothing' is neither a local path nor a loadable Hub dataset.*"
                                         r"--dataset_name pickapic_v2/data"):
        open_stream("someone/nothing", "train", PAIRS, None, seed=0, buffer_size=2)


@pytest.mark.parametrize("flags, message", [
    (["--num_train_epochs", "1"], "--streaming cannot be used with --num_train_epochs: a stream has no length"),
    (["--desirable_ratio", "0.8"], "--desirable_ratio draws"),
    (["--shuffle_buffer_size", "0"], "--shuffle_buffer_size must be positive"),
])
def test_what_a_stream_cannot_do_is_refused_at_parse_time(flags, message, capsys):
    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]
    assert train.parse_args(base + ["--method", "kto", "--streaming"]).shuffle_buffer_size == 1000
    with pytest.raises(SystemExit) as stop:
        train.parse_args(base + ["--method", "kto", "--streaming", *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    for method, extra, said in (("contrast", ["--clip_model_name_or_path", "c"], "--method contrast: its CLIP"),
                                ("dpo", ["--shuffle_buffer_size", "8"], "--shuffle_buffer_size applies to --streaming")):
        with pytest.raises(SystemExit):
            train.parse_args(base + ["--method", method, *extra] + (["--streaming"] if method == "contrast" else []))
        assert said in capsys.readouterr().err


def test_streaming_kto_on_pairs_says_to_convert_first(tiny_sd15, pickapic_parquet, tmp_path):
    with pytest.raises(ValueError, match="need a pass over every pair first. Convert once"):
        train.main(train_argv(tiny_sd15, pickapic_parquet, tmp_path, "kto", "--streaming"))


# ----------------------------------------------------------------------------------------------
# Column flags and image folders
# ----------------------------------------------------------------------------------------------


def test_renamed_columns_read_like_the_canonical_ones(tmp_path):
    canonical = pickapic_rows([1, 0, 0.5, 1])
    renamed = [{"prompt": r["caption"], "a": r["jpg_0"], "b": r["jpg_1"], "pref": r["label_0"]} for r in canonical]
    path = write_parquet(tmp_path / "renamed.parquet", renamed, binary_columns=("a", "b"))
    columns = ColumnMap({"jpg_0": "a", "jpg_1": "b", "label_0": "pref", "caption": "prompt"},
                        flagged=["jpg_0", "jpg_1", "label_0", "caption"])
    expected = list(data.load_pair_rows(str(write_parquet(tmp_path / "c.parquet", canonical))))
    assert list(data.load_pair_rows(str(path), columns=columns)) == expected
    stream = open_stream(str(path), "train", columns, None, seed=0, buffer_size=2)
    assert sorted(row["row_id"] for row in stream) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"missing column\(s\): --pair_image_columns a b; --label_column pref; "
                                         r"--caption_column prompt; it has \['caption'"):
        data.load_pair_rows(str(write_parquet(tmp_path / "d.parquet", canonical)), columns=columns)


def test_a_missing_column_flag_fails_before_the_model_loads_with_one_line(pickapic_parquet, tmp_path, capsys,
                                                                          monkeypatch):
    from full.cli import entry_point

    monkeypatch.setattr(train, "detect_family", lambda *a: "sd15")  # no model on disk: the data must fail first
    argv = train_argv(str(tmp_path / "no-model-needed"), pickapic_parquet, tmp_path / "out", "dpo",
                      "--caption_column", "prompt")
    for extra in ([], ["--streaming"]):
        assert entry_point(train.main, argv + extra, prog="full.train") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "missing column(s): --caption_column prompt; it has [" in err[0]
        assert "'caption'" in err[0]  # the columns that are there


def make_image_folder(root, labels, bad_label_at=None):
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as meta:
        for i, label in enumerate(labels):
            Image.new("RGB", (40, 32), (200, 30, 30) if label else (30, 30, 200)).save(root / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "caption": f"picture {i}",
                                   "label": 7 if i == bad_label_at else label}) + "\n")
    return root


def test_an_image_folder_is_binary_feedback(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "folder", [1, 0, 1, 0, 0], bad_label_at=3)
    assert data.detect_format(str(folder)) == "feedback"
    with caplog.at_level(logging.WARNING):
        rows = data.load_feedback_rows(str(folder))
    assert "skipping row 3: bad label" in caplog.text
    assert [(r["row_id"], r["caption"], r["desirable"]) for r in rows] == [
        (0, "picture 0", True), (1, "picture 1", False), (2, "picture 2", True), (4, "picture 4", False)]
    item = FeedbackDataset(rows, 16)[0]  # decoded from the file the metadata names: red
    assert item["pixel_values"].shape == (1, 3, 16, 16) and item["pixel_values"][0, 0].mean() > 0.5
    with pytest.raises(ValueError, match="is an image folder: drop --streaming"):
        open_stream(str(folder), "train", ColumnMap({"image": "image"}), None, seed=0, buffer_size=2)


def test_kto_trains_from_an_image_folder(tiny_sd15, tmp_path):
    folder = make_image_folder(tmp_path / "folder", [1, 0, 1, 0])
    result = train.main(train_argv(tiny_sd15, str(folder), tmp_path / "out", "kto", steps=2))
    assert result["global_step"] == 2 and (tmp_path / "out" / models.LORA_WEIGHT_NAME).exists()
