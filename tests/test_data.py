"""full/data.py: loading Pick-a-Pic pairs and binary feedback, augmentation, bad data, sampler, converters, CLI.

Every dataset here is a tiny parquet file with real image bytes written by pyarrow in tmp_path.
"""

from __future__ import annotations

import io
import logging
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from full import cli, data, data_commands
from full.data.config import DataConfig
from tests.data_helpers import (BLUE, GREEN, GREY, RED, half_jpeg_bytes, jpeg_bytes, pickapic_rows,
                                truncated_jpeg_bytes, write_parquet)

REPO = Path(__file__).resolve().parents[1]


def mean_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """[3, R, R] in [-1, 1] -> mean colour in [0, 255]."""
    return (pixels.mean(dim=(1, 2)) + 1) * 127.5


# ---------------------------------------------------------------------------- pairs: loading


def test_label_0_orients_winner_and_loser(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", pickapic_rows([1, 0, 1.0, 0.0]))
    rows = data.load_pair_rows(str(path))
    red, blue = jpeg_bytes(RED), jpeg_bytes(BLUE)
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3]
    assert [r["winner"] == red for r in rows] == [True, False, True, False]
    assert [r["loser"] == blue for r in rows] == [True, False, True, False]
    # ...and the dataset puts the winner first in pixel space too.
    item = data.PairDataset(rows, resolution=8)[1]
    winner, loser = mean_rgb(item["pixel_values"][0]), mean_rgb(item["pixel_values"][1])
    assert winner[2] > 150 > winner[0] and loser[0] > 150 > loser[2]  # blue won row 1


def test_ties_dropped_and_counted_unless_kept(tmp_path, caplog):
    path = write_parquet(tmp_path / "p.parquet", pickapic_rows([1, 0.5, 0, 0.5, 0.5]))
    with caplog.at_level(logging.INFO, logger="full.data"):
        rows = data.load_pair_rows(str(path))
    assert [r["row_id"] for r in rows] == [0, 2]
    assert "3 ties dropped" in caplog.text
    kept = data.load_pair_rows(str(path), keep_ties=True)
    assert [r["row_id"] for r in kept] == [0, 1, 2, 3, 4]
    assert [r["tie"] for r in kept] == [False, True, False, True, True]


def test_missing_column_names_the_column_and_file(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "label_0"} for row in pickapic_rows([1, 0])]
    path = write_parquet(tmp_path / "no_label.parquet", rows)
    with pytest.raises(ValueError, match=r"no_label\.parquet is missing column\(s\): 'label_0' \(the default of --label_column\); it has \["):
        data.load_pair_rows(str(path))


def test_malformed_rows_reported_with_row_id_and_skipped(tmp_path, caplog):
    rows = pickapic_rows([1, 0.3, 0, 1, 1])
    rows[3]["jpg_1"] = b"this is not an image"
    rows[4]["caption"] = None
    path = write_parquet(tmp_path / "p.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="full.data"):
        usable = data.load_pair_rows(str(path))
    assert [r["row_id"] for r in usable] == [0, 2]
    assert "skipping row 1: bad label_0" in caplog.text and "0.3" in caplog.text
    assert "skipping row 3: unreadable image bytes: jpg_1" in caplog.text
    assert "skipping row 4: caption not a string" in caplog.text


def test_nothing_usable_fails_at_start_with_the_counts(tmp_path):
    rows = pickapic_rows([0.5, 0.5, 7])
    path = write_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(ValueError, match=r"no usable rows in .*p\.parquet.*2 ties dropped.*1 bad label_0"):
        data.load_pair_rows(str(path))


def test_directory_of_parquet_files_and_split_selection(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", pickapic_rows([1, 0]))
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", pickapic_rows([0, 0, 1]))
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", pickapic_rows([1]))
    rows = data.load_pair_rows(str(tmp_path))
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3, 4]  # ids run on across the files, test file unused
    assert len(data.load_pair_rows(str(tmp_path), split="test")) == 1
    assert len(data.load_pair_rows(str(tmp_path), max_rows=3)) == 3


def test_hub_image_struct_columns(tmp_path):
    """The Hub's Image feature stores {"bytes", "path"} structs; both layouts load the same."""
    rows = pickapic_rows([0, 1])
    for row in rows:
        row["jpg_0"] = {"bytes": row["jpg_0"], "path": None}
        row["jpg_1"] = {"bytes": row["jpg_1"], "path": "x.jpg"}
    path = write_parquet(tmp_path / "struct.parquet", rows)
    loaded = data.load_pair_rows(str(path))
    assert loaded[0]["winner"] == jpeg_bytes(BLUE) and loaded[1]["winner"] == jpeg_bytes(RED)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_pair_rows(str(tmp_path / "nope.parquet"))
    with pytest.raises(ValueError, match="no .parquet files"):
        data.load_pair_rows(str(tmp_path))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install datasets"):
            data.load_pair_rows("someone/some_dataset")


def test_trainer_fixture_file_loads(pickapic_parquet):
    """The trainer's tiny Pick-a-Pic file (tests/tiny_models.py) goes through the same path."""
    rows = data.load_pair_rows(pickapic_parquet)
    assert len(rows) == 14  # 16 rows, the last 2 are ties
    batch = data.collate_skip_none([data.PairDataset(rows, 32)[i] for i in range(len(rows))])
    assert batch["pixel_values"].shape == (14, 2, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


# ---------------------------------------------------------------------------- pairs: augmentation


def test_center_crop_and_recorded_sizes():
    rows = [{"row_id": 7, "winner": jpeg_bytes(RED, size=(24, 16)), "loser": jpeg_bytes(BLUE, size=(16, 40)),
             "caption": "c"}]
    item = data.PairDataset(rows, resolution=8)[0]
    assert item["pixel_values"].shape == (2, 3, 8, 8) and item["row_id"] == 7
    assert item["original_sizes"].tolist() == [[16, 24], [40, 16]]  # (h, w) before resizing
    # 24x16 -> 12x8: left = round((12 - 8) / 2) = 2; 16x40 -> 8x20: top = round((20 - 8) / 2) = 6
    assert item["crop_top_lefts"].tolist() == [[0, 2], [6, 0]]


def test_random_crop_recorded_is_the_crop_taken():
    """Columns of distinct grey levels: the cropped pixels must equal the resized image at the
    recorded offset, for both images of the pair (same relative position)."""
    ramp = np.tile(np.arange(0, 250, 10, dtype=np.uint8)[None, :, None], (8, 1, 3))  # h=8, w=25
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    rows = [{"row_id": i, "winner": buffer.getvalue(), "loser": buffer.getvalue(), "caption": "c"} for i in range(20)]
    dataset = data.PairDataset(rows, resolution=8, center_crop=False, seed=3)
    lefts = set()
    for index in range(len(rows)):
        item = dataset[index]
        (top, left), (top_l, left_l) = item["crop_top_lefts"].tolist()
        assert (top, left) == (top_l, left_l) and top == 0 and 0 <= left <= 25 - 8
        expected = torch.from_numpy(ramp[:, left:left + 8, 0]).float() / 127.5 - 1
        assert torch.allclose(item["pixel_values"][0, 0], expected, atol=1e-6)
        lefts.add(left)
    assert len(lefts) > 3  # the crop really moves


def test_flip_is_shared_by_the_pair():
    winner, loser = half_jpeg_bytes(RED, BLUE), half_jpeg_bytes(RED, GREEN)
    rows = [{"row_id": i, "winner": winner, "loser": loser, "caption": "c"} for i in range(40)]
    dataset = data.PairDataset(rows, resolution=8, random_flip=True, seed=1)
    flips = []
    for index in range(len(rows)):
        pixels = dataset[index]["pixel_values"]  # (2, 3, 8, 8); left column red unless flipped
        winner_flipped = bool(pixels[0, 0, 0, 0] < 0)  # red channel low at the left edge
        loser_flipped = bool(pixels[1, 0, 0, 0] < 0)
        assert winner_flipped == loser_flipped
        flips.append(winner_flipped)
    assert 5 < sum(flips) < 35  # about half


def test_caption_dropout_is_per_pair_deterministic_and_at_the_rate():
    rows = [{"row_id": i, "winner": jpeg_bytes(RED), "loser": jpeg_bytes(BLUE), "caption": f"p{i}"} for i in range(400)]
    dataset = data.PairDataset(rows, resolution=8, caption_dropout=0.25, seed=0)
    captions = [dataset[i]["caption"] for i in range(len(rows))]
    dropped = sum(c == "" for c in captions)
    assert abs(dropped / 400 - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 400)
    assert all(c in ("", f"p{i}") for i, c in enumerate(captions))
    assert [dataset[i]["caption"] for i in range(len(rows))] == captions  # same seed & index, same draw
    other = data.PairDataset(rows, resolution=8, caption_dropout=0.25, seed=1)
    assert [other[i]["caption"] for i in range(len(rows))] != captions
    dataset.set_epoch(1)
    assert [dataset[i]["caption"] for i in range(len(rows))] != captions  # a new epoch draws anew
    assert all(data.PairDataset(rows[:20], 8, caption_dropout=1.0)[i]["caption"] == "" for i in range(20))


def test_bad_dataset_arguments():
    rows = [{"row_id": 0, "winner": jpeg_bytes(), "loser": jpeg_bytes(), "caption": "c"}]
    with pytest.raises(ValueError, match="caption_dropout"):
        data.PairDataset(rows, 8, caption_dropout=1.5)
    with pytest.raises(ValueError, match="resolution"):
        data.PairDataset(rows, 0)
    with pytest.raises(ValueError, match="rows is empty"):
        data.PairDataset([], 8)


# ---------------------------------------------------------------------------- corrupt images never crash an epoch


def test_corrupt_image_gives_none_with_row_id_and_the_epoch_finishes(tmp_path, caplog):
    rows = pickapic_rows([1, 0, 1, 0, 1, 0])
    rows[2]["jpg_0"] = truncated_jpeg_bytes()  # header fine (passes loading), data cut
    rows[5]["jpg_1"] = truncated_jpeg_bytes()
    loaded = data.load_pair_rows(str(write_parquet(tmp_path / "p.parquet", rows)))
    assert len(loaded) == 6  # the header check cannot see truncation: the dataset must cope
    dataset = data.PairDataset(loaded, resolution=8)
    with caplog.at_level(logging.WARNING, logger="full.data"):
        assert dataset[2] is None
    assert "row 2: cannot decode image" in caplog.text

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=data.collate_skip_none)
    batches = list(loader)  # never raises
    assert [b["row_ids"] if b is not None else None for b in batches] == [[0, 1], [3], [4]]
    assert batches[1]["pixel_values"].shape == (1, 2, 3, 8, 8)
    assert data.collate_skip_none([None, None]) is None


# ---------------------------------------------------------------------------- binary feedback


def feedback_table(labels):
    colours = [RED, BLUE, GREEN, GREY]
    return [{"image": jpeg_bytes(colours[i % 4]), "caption": f"c{i}", "label": label} for i, label in enumerate(labels)]


def test_feedback_rows_and_dataset(tmp_path, caplog):
    path = write_parquet(tmp_path / "f.parquet", feedback_table([1, 0, 2, 1]))
    with caplog.at_level(logging.WARNING, logger="full.data"):
        rows = data.load_feedback_rows(str(path))
    assert [(r["row_id"], r["desirable"]) for r in rows] == [(0, True), (1, False), (3, True)]
    assert "skipping row 2: bad label" in caplog.text
    bool_path = write_parquet(tmp_path / "b.parquet", feedback_table([True, False]))
    assert [r["desirable"] for r in data.load_feedback_rows(str(bool_path))] == [True, False]

    dataset = data.FeedbackDataset(rows, resolution=8)
    batch = data.collate_skip_none([dataset[i] for i in range(len(rows))])
    assert batch["pixel_values"].shape == (3, 1, 3, 8, 8)
    assert batch["original_sizes"].shape == (3, 1, 2) and batch["crop_top_lefts"].shape == (3, 1, 2)
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [True, False, True]
    assert batch["captions"] == ["c0", "c1", "c3"] and batch["row_ids"] == [0, 1, 3]


def test_feedback_missing_column_and_nothing_usable(tmp_path):
    rows = [{"image": jpeg_bytes(), "caption": "c", "desirable": 1}]
    with pytest.raises(ValueError, match=r"missing column\(s\): 'label' \(the default of --label_column\)"):
        data.load_feedback_rows(str(write_parquet(tmp_path / "a.parquet", rows)))
    with pytest.raises(ValueError, match="no usable rows"):
        data.load_feedback_rows(str(write_parquet(tmp_path / "b.parquet", feedback_table([3, -1]))))


# ---------------------------------------------------------------------------- desirable-ratio sampler


def test_sampler_draws_desirable_at_rate_gamma_uniformly_within_class():
    labels = [i % 10 < 3 for i in range(100)]  # 30 desirable, 70 undesirable
    n = 20000
    indices = list(data.DesirableRatioSampler(labels, gamma=0.8, num_samples=n, seed=0))
    assert len(indices) == n
    share = sum(labels[i] for i in indices) / n
    assert abs(share - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n)  # the data's own 30% would fail this
    counts = np.bincount([i for i in indices if labels[i]], minlength=100)[[i for i in range(100) if labels[i]]]
    expected = n * 0.8 / 30
    assert counts.min() > expected - 5 * math.sqrt(expected) and counts.max() < expected + 5 * math.sqrt(expected)


def test_sampler_is_seeded_and_rejects_bad_arguments():
    labels = [True, False, False]
    a = list(data.DesirableRatioSampler(labels, 0.5, 50, seed=4))
    assert a == list(data.DesirableRatioSampler(labels, 0.5, 50, seed=4))
    sampler = data.DesirableRatioSampler(labels, 0.5, 50, seed=4)
    assert list(sampler) != list(sampler)  # each pass (epoch) draws anew
    assert set(data.DesirableRatioSampler([True, True], 1.0, 10, seed=0)) <= {0, 1}  # gamma 1 needs no undesirable
    with pytest.raises(ValueError, match="gamma"):
        data.DesirableRatioSampler(labels, 1.2, 10, seed=0)
    with pytest.raises(ValueError, match="no.*desirable|none"):
        data.DesirableRatioSampler([False, False], 0.8, 10, seed=0)
    with pytest.raises(ValueError, match="undesirable"):
        data.DesirableRatioSampler([True, True], 0.8, 10, seed=0)


# ---------------------------------------------------------------------------- converters


def test_pairs_to_feedback_policies_on_a_hand_made_example():
    A, B, C, D, E, F = (jpeg_bytes((40 * k, 0, 0)) for k in range(6))
    rows = [{"row_id": 10 + i, "winner": w, "loser": l, "caption": cap, "tie": False}
            for i, (w, l, cap) in enumerate([(A, B, "ab"), (A, C, "ac"), (B, C, "bc"), (D, C, "dc")])]
    rows.append({"row_id": 14, "winner": E, "loser": F, "caption": "ef", "tie": True})
    # wins/losses: A 2/0, B 1/1, C 0/3, D 1/0; E and F only tied.
    once = {r["image"]: r for r in data.pairs_to_feedback(rows, "winner_once")}
    always = {r["image"]: r["label"] for r in data.pairs_to_feedback(rows, "always_win")}
    assert {k: v["label"] for k, v in once.items()} == {A: 1, B: 1, C: 0, D: 1}
    assert always == {A: 1, B: 0, C: 0, D: 1}
    assert (once[C]["wins"], once[C]["losses"], once[C]["caption"], once[C]["row_id"]) == (0, 3, "ac", 11)  # first row
    with pytest.raises(ValueError, match="policy"):
        data.pairs_to_feedback(rows, "sometimes")


def test_scores_to_pairs_is_deterministic_and_orders_by_score():
    images = [jpeg_bytes((10 * k, 5, 5)) for k in range(5)]
    rows = [{"image": images[k], "caption": "x", "score": s} for k, s in enumerate([3.0, 1.0, 2.0, 2.0])]
    rows.append({"image": images[4], "caption": "y", "score": 5.0})  # alone: no pair
    pairs = data.scores_to_pairs(rows)
    score = {r["image"]: r["score"] for r in rows}
    assert len(pairs) == 5  # 6 pairs among 4 images, minus the 2.0 == 2.0 tie
    for p in pairs:
        winner, loser = (p["jpg_0"], p["jpg_1"]) if p["label_0"] == 1.0 else (p["jpg_1"], p["jpg_0"])
        assert score[winner] > score[loser] and p["label_0"] + p["label_1"] == 1.0
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert data.scores_to_pairs(shuffled) == pairs
    top = data.scores_to_pairs(rows, max_pairs_per_group=1)
    assert {top[0]["jpg_0"], top[0]["jpg_1"]} == {images[0], images[1]}  # the largest gap, 3 vs 1
    many = data.scores_to_pairs([{"image": jpeg_bytes((k, 9, 9)), "caption": "z", "score": k} for k in range(12)])
    assert {p["label_0"] for p in many} == {0.0, 1.0}  # the winner is not always in jpg_0
    with pytest.raises(ValueError, match="score"):
        data.scores_to_pairs([{"image": images[0], "caption": "x", "score": float("nan")}])


def test_scores_to_feedback_threshold():
    rows = [{"image": jpeg_bytes(), "caption": "c", "score": s} for s in (6.9, 7.0, 8.5)]
    assert [r["label"] for r in data.scores_to_feedback(rows, threshold=7.0)] == [0, 1, 1]


def test_red_filter_user_prefers_the_red_copy():
    grey = jpeg_bytes(GREY, size=(16, 16))
    images = [{"image": grey, "caption": "g"}, {"image": jpeg_bytes(BLUE), "caption": "b"},
              {"image": jpeg_bytes(GREEN), "caption": "gr"}, {"image": grey, "caption": "dup"},
              {"image": b"junk", "caption": "bad"}]
    feedback = data.red_filter_feedback(images)
    assert [r["label"] for r in feedback] == [1, 0] * 3  # duplicate and undecodable images skipped
    assert [r["caption"] for r in feedback[::2]] == ["g", "b", "gr"]
    for red, original in zip(feedback[::2], feedback[1::2]):
        assert data.redness(red["image"]) > data.redness(original["image"]) + 0.1
    pixel = np.asarray(data.red_filter(Image.new("RGB", (2, 2), (128, 128, 128))))[0, 0]
    assert pixel.tolist() == [192, 128, 128]  # R + 0.5 (255 - R), G and B untouched
    assert data.redness(jpeg_bytes(RED)) > 0.5 > data.redness(jpeg_bytes(GREY)) > -0.05


# ---------------------------------------------------------------------------- CLI


def test_cli_round_trips(tmp_path, capsys):
    src = write_parquet(tmp_path / "pairs.parquet", pickapic_rows([1, 0, 1, 0.5]))
    out = tmp_path / "feedback.parquet"
    assert data_commands.main(["convert", "pairs-to-feedback", "--input", str(src), "--output", str(out)]) == 0
    feedback = data.load_feedback_rows(str(out))
    expected = data.pairs_to_feedback(data.load_pair_rows(str(src)))
    assert [(r["image"], r["desirable"]) for r in feedback] == [(r["image"], bool(r["label"])) for r in expected]
    assert "wrote" in capsys.readouterr().out

    scored = write_parquet(tmp_path / "scores.parquet", [{"image": jpeg_bytes((20 * k, 0, 0)), "caption": "c",
                                                          "aesthetic": float(k)} for k in range(4)])
    pairs_out = tmp_path / "pairs_from_scores.parquet"
    assert data_commands.main(["convert", "scores-to-pairs", "--input", str(scored), "--output", str(pairs_out),
                      "--score_column", "aesthetic"]) == 0
    assert len(data.load_pair_rows(str(pairs_out))) == 6

    red_out = tmp_path / "red.parquet"
    assert data_commands.main(["convert", "red-filter", "--input", str(src), "--output", str(red_out)]) == 0
    red_rows = data.load_feedback_rows(str(red_out))
    assert len(red_rows) == 4 and sum(r["desirable"] for r in red_rows) == 2  # 2 distinct images x 2

    assert data_commands.main(["convert", "pairs-to-feedback", "--input", str(tmp_path / "missing.parquet"),
                      "--output", str(out)]) == 2
    assert "error: dataset" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    src = write_parquet(tmp_path / "pairs.parquet", pickapic_rows([1, 0]))
    result = subprocess.run([sys.executable, "-m", "full.data", "check", str(src)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 usable pairs" in result.stdout


def test_rows_are_lazy_views_of_the_arrow_table(tmp_path):
    """load_pair_rows keeps row ids and labels, not images: the rows read their bytes from the memory-mapped table
    when indexed, and a slice is another view."""
    rows = data.load_pair_rows(str(write_parquet(tmp_path / "p.parquet", pickapic_rows([1, 0, 0.5, 1]))))
    assert isinstance(rows, data.sources.LazyRows) and len(rows) == 3
    assert rows.row_ids.tolist() == [0, 1, 3] and rows.column("jpg_0_won").tolist() == [True, False, True]
    held = {k: v.nbytes for k, v in rows.fields.items()}
    assert sum(held.values()) + rows.row_ids.nbytes < 64  # bytes per row in memory: no image anywhere
    assert rows[1:][0]["row_id"] == 1 and rows[1:][0]["winner"] == jpeg_bytes(BLUE)


def test_undecodable_items_are_counted_in_the_batch(tmp_path):
    rows = pickapic_rows([1, 0, 1])
    rows[1]["jpg_0"] = truncated_jpeg_bytes()
    dataset = data.PairDataset(data.load_pair_rows(str(write_parquet(tmp_path / "p.parquet", rows))), resolution=8)
    batch = data.collate_skip_none([dataset[i] for i in range(3)])
    assert batch["row_ids"] == [0, 2] and batch["n_undecodable"] == 1


def test_data_benchmark_runs_and_reads_every_row(tmp_path):
    """`python -m full.bench --data` on a tiny size: the readers see every row, and a resume from a place reads fewer
    rows than the skip-ahead (figures, not timings, checked; each reader is a fresh process, so the `train` reader,
    two more launches of full.train, is left to the documented runs)."""
    from full import bench

    figures = bench.main(["--data", "--rows", "24", "--workdir", str(tmp_path), "--out", str(tmp_path / "f.json"),
                          "--readers", "loader", "resume", "skip", "--plot", str(tmp_path / "launch.png")])
    by_mode = {f["mode"]: f for f in figures}
    assert [(f["n_rows"], f["mode"]) for f in figures] == [(24, m) for m in ("loader", "resume", "skip")]
    assert by_mode["loader"]["rows"] == 24 and by_mode["loader"]["rows_per_s"] > 0
    assert all(f["anon_mb"] > 0 for f in figures)
    rows_read = {m: int(by_mode[m]["rows_read"].split()[0]) for m in ("resume", "skip")}
    assert rows_read["resume"] < rows_read["skip"] == 24  # 90% into the pass: from the place, not the pass again
    assert (tmp_path / "f.json").is_file() and (tmp_path / "launch.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # --readers train without --model: one line, exit 2
        bench.main(["--data", "--rows", "24", "--readers", "train"])


def test_parquet_is_converted_once_and_again_when_a_file_changes(tmp_path):
    from full.data.tables import open_table

    path = write_parquet(tmp_path / "src" / "train.parquet", pickapic_rows([1, 0, 1]))
    first = open_table(str(path), "train", data.PAIR_COLUMNS, None)
    arrow_file = first.cache_files[0]["filename"]
    assert open_table(str(path), "train", data.PAIR_COLUMNS, None).cache_files[0]["filename"] == arrow_file
    write_parquet(path, pickapic_rows([0, 0]))  # same path, new content: a new conversion
    again = open_table(str(path), "train", data.PAIR_COLUMNS, None)
    assert again.cache_files[0]["filename"] != arrow_file and again["label_0"] == [0.0, 0.0]
    write_parquet(tmp_path / "two" / "train-0.parquet", pickapic_rows([1]))
    other = [{**row, "label_0": "one"} for row in pickapic_rows([1])]  # a string label: not the first file's type
    write_parquet(tmp_path / "two" / "train-1.parquet", other)
    with pytest.raises(ValueError, match=r"train-1\.parquet does not have the columns and types of .*train-0"):
        open_table(str(tmp_path / "two"), "train", data.PAIR_COLUMNS, None)
    assert not list((Path(arrow_file).parent).glob("*.partial"))  # the failed conversion left nothing behind


# ---------------------------------------------------------------------------- bad input: counted, named, one line


def image_folder(root: Path, captions, missing=()) -> Path:
    """An image folder: metadata.jsonl naming one PNG per caption (label 1 for even rows); the files of the row ids
    in ``missing`` are not written."""
    import json

    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as meta:
        for i, caption in enumerate(captions):
            if i not in missing:
                Image.new("RGB", (20, 16), RED).save(root / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "caption": caption, "label": int(i % 2 == 0)}) + "\n")
    return root


def test_empty_captions_are_kept_counted_and_named(tmp_path, caplog):
    pairs = pickapic_rows([1, 0, 1, 0], captions=["a", "", "c", "  "])
    feedback = [{**row, "caption": c} for row, c in zip(feedback_table([1, 0, 1]), ["", "b", "c"])]
    with caplog.at_level(logging.WARNING, logger="full.data"):
        assert len(data.load_pair_rows(str(write_parquet(tmp_path / "p.parquet", pairs)))) == 4  # kept: CFG rows
        assert len(data.load_feedback_rows(str(write_parquet(tmp_path / "f.parquet", feedback)))) == 3
        assert len(data.load_feedback_rows(str(image_folder(tmp_path / "folder", ["x", "y", ""])))) == 3
    assert "2 rows have an empty caption (row ids 1, 3): kept, they train as unconditional" in caplog.text
    assert "1 row has an empty caption (row id 0)" in caplog.text
    assert "1 row has an empty caption (row id 2)" in caplog.text  # the image folder's metadata


def test_a_stream_counts_the_empty_captions_of_each_pass(tmp_path, caplog):
    from full.data.columns import ColumnMap
    from full.data.streaming import StreamedRows, open_stream

    path = write_parquet(tmp_path / "p.parquet", pickapic_rows([1, 0, 0.5, 1], captions=["", "b", "", ""]))
    stream = open_stream(str(path), "train", ColumnMap({n: n for n in data.PAIR_COLUMNS}), None, seed=0,
                         buffer_size=2)
    rows = StreamedRows(stream, "pairs", data.PairDataset(None, 8), name="s")
    for epoch in (0, 1):
        rows.set_epoch(epoch)
        with caplog.at_level(logging.WARNING, logger="full.data"):
            assert len(list(rows)) == 3
        assert f"s: pass {epoch} of this process's share: 2 rows have an empty caption (row ids " in caplog.text
        caplog.clear()  # the tie (row 2) is dropped, so not counted; each pass counts its own rows


def check_cli(capsys, *argv) -> tuple[int, str, str]:
    code = data_commands.main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_check_decodes_every_image_so_its_count_is_what_training_uses(tmp_path, capsys):
    rows = pickapic_rows([1, 0, 1, 0, 1])
    rows[3]["jpg_1"] = truncated_jpeg_bytes()  # loads (the header is fine), fails when decoded: training skips it
    path = write_parquet(tmp_path / "p.parquet", rows)
    code, out, _ = check_cli(capsys, path)
    assert code == 0 and "4 usable pairs; 1 more skipped as training skips them: an image does not decode " \
                         "(row id 3)" in out
    dataset = data.PairDataset(data.load_pair_rows(str(path)), 8)
    assert sum(dataset[i] is not None for i in range(len(dataset))) == 4  # what training keeps
    bad = write_parquet(tmp_path / "bad.parquet", [{**row, "jpg_0": truncated_jpeg_bytes()} for row in rows[:2]])
    code, _, err = check_cli(capsys, bad)
    assert code == 2 and len(err.splitlines()) == 1 and "no usable rows" in err and "row ids 0, 1" in err


def test_check_detects_feedback_as_the_trainer_does_and_takes_the_column_flags(tmp_path, capsys):
    path = write_parquet(tmp_path / "f.parquet", feedback_table([1, 0, 1]))
    code, out, _ = check_cli(capsys, path)  # no --schema: the trainer's detection (full.data.rows.source_format)
    assert code == 0 and "(feedback, detected" in out and "3 usable images (2 desirable, 1 undesirable)" in out
    assert check_cli(capsys, path, "--schema", "feedback")[0] == 0
    renamed = write_parquet(tmp_path / "r.parquet", [{"picture": r["image"], "prompt": r["caption"], "ok": r["label"]}
                                                     for r in feedback_table([1, 0])], binary_columns=("picture",))
    code, _, err = check_cli(capsys, renamed, "--data_format", "feedback")
    assert code == 2 and "--image_column" in err  # the message names a flag that check has ...
    code, out, _ = check_cli(capsys, renamed, "--image_column", "picture", "--caption_column", "prompt",
                             "--label_column", "ok")
    assert code == 0 and "2 usable images" in out  # ... and the flag works


def test_a_missing_image_file_is_named_with_its_row_id(tmp_path, caplog):
    folder = image_folder(tmp_path / "folder", ["a", "b", "c", "d"], missing=(2,))
    with caplog.at_level(logging.WARNING, logger="full.data"):
        rows = data.load_feedback_rows(str(folder))
    assert [r["row_id"] for r in rows] == [0, 1, 3]
    assert f"skipping row 2: missing file {folder / '2.png'}" in caplog.text
    assert "unreadable image bytes" not in caplog.text


def test_a_folder_without_metadata_says_what_was_looked_for_and_what_is_there(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(images / f"{i}.png")
    (images / "notes.txt").write_text("captions are somewhere else")
    with pytest.raises(ValueError, match=r"images has no \.parquet files and no metadata\.jsonl .* of an image folder "
                                         r"\(one row per image: file_name, caption, label\); it holds 4 files "
                                         r"\(3 \.png, 1 \.txt\)$"):
        data.load_feedback_rows(str(images))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .parquet files and no metadata.jsonl .*; it is empty$"):
        data.load_pair_rows(str(tmp_path / "empty"))


def test_convert_checks_its_output_before_converting(tmp_path, capsys):
    src = write_parquet(tmp_path / "pairs.parquet", pickapic_rows([1, 0]))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for output, said in ((blocker / "out.parquet", "is a file, not a directory"), (tmp_path, "is a directory")):
        for source in (src, tmp_path / "missing.parquet"):  # the output is checked first: the input is never read
            code = data_commands.main(["convert", "pairs-to-feedback", "--input", str(source), "--output", str(output)])
            err = capsys.readouterr().err.strip()
            assert code == 2 and len(err.splitlines()) == 1 and f"--output {output}" in err and said in err


def test_convert_and_cache_take_the_column_flags_their_messages_name(tmp_path, capsys):
    from full.cache import parse_args
    from full.data.cache_build import CONTENT_FLAGS
    from full.data.rows import load_training_rows

    renamed = [{"a": r["jpg_0"], "b": r["jpg_1"], "pref": r["label_0"], "prompt": r["caption"]}
               for r in pickapic_rows([1, 0, 1])]
    src = write_parquet(tmp_path / "r.parquet", renamed, binary_columns=("a", "b"))
    flags = ["--pair_image_columns", "a", "b", "--label_column", "pref", "--caption_column", "prompt"]
    args = parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", str(src), "--method", "dpo",
                       "--output_dir", str(tmp_path / "cache"), *flags])
    assert [r["row_id"] for r in load_training_rows(cli.config(DataConfig, args), "pairs")] == [0, 1, 2]
    assert {"caption_column", "image_column", "pair_image_columns", "label_column"} <= set(CONTENT_FLAGS)
    out = tmp_path / "f.parquet"
    assert data_commands.main(["convert", "pairs-to-feedback", "--input", str(src), "--output", str(out), *flags]) == 0
    assert len(data.load_feedback_rows(str(out))) == 2
    scored = write_parquet(tmp_path / "s.parquet", [{"image": jpeg_bytes(), "caption": "c", "aesthetic": 1.0}])
    assert data_commands.main(["convert", "scores-to-pairs", "--input", str(scored), "--output", str(out)]) == 2
    assert "'score' (the default of --score_column); it has [" in capsys.readouterr().err  # was a KeyError
