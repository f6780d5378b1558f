"""A `--streaming` resume restarts from the place a checkpoint keeps (full/data/stream_source.py): the same items in
the same order as an uninterrupted pass, reading at most a shuffle buffer and a row group more than the uninterrupted
pass reads from that place on, wherever in the epoch it stopped (the rows are counted, not timed)."""

from __future__ import annotations

from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from full import data
from full.data.columns import ColumnMap
from full.data.images import PairDataset
from full.data.streaming import StreamedRows, StreamingLoader, open_stream
from tests.data_helpers import pickapic_rows

PAIRS = ColumnMap({name: name for name in data.PAIR_COLUMNS})
BUFFER, GROUP = 8, 10  # shuffle buffer rows, parquet row group rows


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """120 pairs in two files of 60 rows, row groups of 10: rows 5 and 70 are ties, row 33 has garbage bytes."""
    rows = pickapic_rows([0.5 if i in (5, 70) else i % 2 for i in range(120)])
    rows[33]["jpg_1"] = b"not an image"
    table = pa.table({k: [r[k] for r in rows] for k in data.PAIR_COLUMNS})
    root = tmp_path_factory.mktemp("resume")
    for i in range(2):
        pq.write_table(table.slice(60 * i, 60), root / f"train-0000{i}-of-00002.parquet", row_group_size=GROUP)
    return root


def rows_of(path, rank=0, world=1):
    stream = open_stream(str(path), "train", PAIRS, None, seed=5, buffer_size=BUFFER, process_index=rank,
                         num_processes=world)
    return StreamedRows(stream, "pairs", PairDataset(None, 8), name="s")


def pass_ids(rows, epoch=1) -> list[int]:
    rows.set_epoch(epoch)
    return [item["row_id"] for item in rows]


@pytest.mark.parametrize("world", [1, 2, 3])  # 2: a file per process; 3: every third row of the whole stream
@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.95])
def test_a_resume_continues_the_pass_and_reads_a_buffer_not_the_epoch(source, world, fraction):
    for rank in range(world):
        uninterrupted = pass_ids(rows_of(source, rank, world))
        at = int(fraction * len(uninterrupted))
        first = rows_of(source, rank, world)
        first.set_epoch(1)
        trained = [item["row_id"] for item in islice(first, at)]  # the items trained on before the checkpoint
        state = first.state()
        assert trained == uninterrupted[:at] and state["items"] == at

        resumed = rows_of(source, rank, world)
        resumed.resume(state)
        assert pass_ids(resumed) == uninterrupted[at:]  # the same items in the same order, none twice
        shards = resumed.stream.shards
        share = sum(shards.length(s) for s in resumed.stream.order())
        after = share - state["position"]["source"]  # what the uninterrupted pass reads from the place on
        assert shards.rows_read <= after + BUFFER + GROUP  # the buffered rows, fetched by id, and one row group

        skipped = rows_of(source, rank, world)  # a checkpoint without a place: the share again from the start
        skipped.skip_items = at
        assert pass_ids(skipped) == uninterrupted[at:] and skipped.stream.shards.rows_read == share
        if fraction > 0.9:  # near the end of the epoch: a few rows instead of the whole share
            assert shards.rows_read <= BUFFER + GROUP < share / 2


def test_a_place_is_kept_for_the_pass_it_was_taken_in_and_used_once(source):
    rows = rows_of(source)
    rows.set_epoch(1)
    list(islice(rows, 20))
    state = rows.state()
    resumed = rows_of(source)
    resumed.resume(state)
    ids = pass_ids(resumed)
    assert pass_ids(resumed) == pass_ids(rows_of(source)) != ids  # the next pass starts at its beginning
    other = rows_of(source)
    other.resume(state)
    assert pass_ids(other, epoch=2) == pass_ids(rows_of(source), epoch=2)  # a place of another epoch is not used


def test_the_loader_keeps_each_process_place_and_falls_back_to_skipping_without_one(source):
    loader = StreamingLoader(rows_of(source), batch_size=3, device="cpu")
    loader.set_epoch(1)
    batches = iter(loader)
    seen = [next(batches)["row_ids"] for _ in range(4)]
    state = loader.state_dict()
    assert len(state["processes"]) == 1 and state["processes"][0]["items"] == 12

    def resumed(state, num_processes=1):
        again = StreamingLoader(rows_of(source), batch_size=3, device="cpu", num_processes=num_processes)
        again.load_state_dict(state)
        again.set_epoch(1)
        return [b["row_ids"] for b in again.skip_batches(4)], again.rows.stream.shards.rows_read

    rest, read = resumed(state)
    assert rest == [b["row_ids"] for b in batches] and seen + rest
    for other in ({"processes": [None]}, {"processes": [state["processes"][0]] * 2}):  # no place; 2 processes saved
        skipped, skipped_read = resumed(other)
        assert skipped == rest and skipped_read > read  # read again from the start of the epoch


def test_a_stream_refuses_a_checkpoint_object_that_is_not_its_place(source):
    loader = StreamingLoader(rows_of(source), batch_size=3, device="cpu")
    with pytest.raises(ValueError, match="no stream position"):
        loader.load_state_dict({"decay": 0.999, "shadow_params": []})  # an EMA's state at the stream's index
