"""A launch checks rows without reading their images (full/data/checks.py): the same rows rejected, with the same
ids and reasons, as the row-by-row checker of the stream; image headers parsed once per table (at conversion, or by
the first process to load a table without a stored check) and read back from the check kept next to the table."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from full import data
from full.data import checks
from full.data.sources import RowReport, checked_feedback_label, checked_pair_label
from full.data.tables import open_table
from tests.data_helpers import jpeg_bytes, pickapic_rows, truncated_jpeg_bytes, write_parquet

REPO = Path(__file__).resolve().parents[1]


def skipped(caplog) -> list[str]:
    return re.findall(r"skipping row (\d+: [^\n]*)", caplog.text)


def malformed_pairs() -> list[dict]:
    rows = pickapic_rows([1, 0.3, 0, 1, 0.5, 1, 0, 1, 1, 0], captions=[f"c{i}" for i in range(10)])
    rows[3]["jpg_1"] = b"this is not an image"
    rows[5]["caption"] = None
    rows[6]["jpg_0"] = b""
    rows[7]["jpg_0"], rows[7]["jpg_1"] = b"junk", b"junk too"
    rows[8]["jpg_1"] = truncated_jpeg_bytes()  # the header is fine: caught when the item is decoded
    rows[9]["label_0"] = None
    rows[2]["caption"] = "   "
    return rows


def test_the_table_checks_reject_what_the_row_checker_rejects_with_the_same_ids_and_reasons(tmp_path, caplog):
    rows = malformed_pairs()
    path = write_parquet(tmp_path / "p.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="full.data"):
        loaded = data.load_pair_rows(str(path), keep_ties=True)
    by_table = skipped(caplog)
    caplog.clear()
    report = RowReport("rows")
    with caplog.at_level(logging.WARNING, logger="full.data"):
        kept = [i for i, row in enumerate(rows) if checked_pair_label(row, i, report) is not None]
    assert by_table == skipped(caplog) and len(by_table) == 6
    assert loaded.row_ids.tolist() == kept == [0, 2, 4, 8]
    assert "7: unreadable image bytes: jpg_0 and jpg_1" in by_table and "9: bad label_0 (not 0, 0.5 or 1): None" in by_table
    feedback = [{"image": r["jpg_0"], "caption": r["caption"], "label": int(r["label_0"] or 0) + (i == 4)}
                for i, r in enumerate(rows)]
    path = write_parquet(tmp_path / "f.parquet", feedback)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="full.data"):
        loaded = data.load_feedback_rows(str(path))
        by_table = skipped(caplog)
        caplog.clear()
        report = RowReport("rows")
        kept = [i for i, row in enumerate(feedback) if checked_feedback_label(row, i, report) is not None]
    assert by_table == skipped(caplog) and loaded.row_ids.tolist() == kept


def test_a_second_launch_reads_no_image_and_reports_the_same(tmp_path, caplog, monkeypatch):
    path = write_parquet(tmp_path / "p.parquet", malformed_pairs())
    parsed = []
    real = checks.looks_like_image
    monkeypatch.setattr(checks, "looks_like_image", lambda data: parsed.append(1) or real(data))
    with caplog.at_level(logging.WARNING, logger="full.data"):
        first = data.load_pair_rows(str(path))  # converts, and parses every header once
    assert len(parsed) == 2 * 10 - 1  # 10 rows of 2 images, one of them empty
    reported = skipped(caplog)
    caplog.clear()
    parsed.clear()
    with caplog.at_level(logging.WARNING, logger="full.data"):
        second = data.load_pair_rows(str(path))
    assert parsed == [] and skipped(caplog) == reported  # the headers come from the stored check
    assert second.row_ids.tolist() == first.row_ids.tolist() and list(second) == list(first)
    table = open_table(str(path), "train", data.PAIR_COLUMNS, None)
    arrow = Path(table.cache_files[0]["filename"])
    assert arrow.with_suffix(".check.json").is_file()  # next to the table, named like it


def test_a_table_without_a_stored_check_is_checked_by_one_process_only(tmp_path):
    """A table converted before checks were stored: of two processes loading it at once, one parses the headers
    (under a file lock) and the other reads its result."""
    cache = tmp_path / "cache"
    rows = pickapic_rows([1, 0, 1])
    rows[1]["jpg_0"] = b"junk"
    path = write_parquet(tmp_path / "p.parquet", rows)
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
              "from full.data import load_pair_rows; print('rows', load_pair_rows(sys.argv[1]).row_ids.tolist())")
    env = {**__import__("os").environ, "HF_DATASETS_CACHE": str(cache)}
    run = lambda: subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, env=env, text=True,  # noqa
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert "rows [0, 2]" in run().communicate(timeout=300)[0]
    stored = list((cache / "minipref-parquet").glob("*.check.json"))
    assert len(stored) == 1
    stored[0].unlink()  # as an older version left it
    outputs = [p.communicate(timeout=300)[0] for p in [run(), run()]]
    assert all("rows [0, 2]" in out and "skipping row 1: unreadable image bytes: jpg_0" in out for out in outputs)
    assert sum("checking the image headers" in out for out in outputs) == 1
    assert stored[0].is_file()


def test_image_bytes_are_checked_when_drawn_when_their_header_passes(tmp_path):
    rows = pickapic_rows([1, 0])
    rows[1]["jpg_1"] = truncated_jpeg_bytes()
    loaded = data.load_pair_rows(str(write_parquet(tmp_path / "p.parquet", rows)))
    dataset = data.PairDataset(loaded, 8)
    assert len(loaded) == 2 and dataset[0] is not None and dataset[1] is None
    assert checks.looks_like_image(jpeg_bytes()) and not checks.looks_like_image(b"junk")


@pytest.mark.parametrize("caption", ["\u3000", "\x1c ", "\t"])
def test_an_empty_caption_is_what_python_strips_to_nothing(tmp_path, caplog, caption):
    path = write_parquet(tmp_path / "p.parquet", pickapic_rows([1, 0], captions=[caption, "x"]))
    with caplog.at_level(logging.WARNING, logger="full.data"):
        data.load_pair_rows(str(path))
    assert "1 row has an empty caption (row id 0)" in caplog.text
