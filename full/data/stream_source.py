"""`--streaming`'s rows: this process's share of the parquet files in a seeded order, with a position that a
checkpoint holds and a resume restarts from (`full.data.streaming` checks and decodes the rows).

One pass (an epoch) of process p of P::

    shards  = the files, in an order drawn from (seed, epoch)
    source  = process p's files (every P-th of that order) when P divides the file count, else all of them;
              read one after the other, a parquet batch at a time, each row with its row id (its position in the
              source, files in sorted order, as the table reader counts rows)
    buffer  = the shuffle buffer: rows are appended; when it holds --shuffle_buffer_size rows it is permuted, the
              first half of the permutation is emitted and the rest kept; at the end of the source what is left is
              permuted and emitted (the buffer of `datasets`' `IterableDataset.shuffle`, 5.x, with its per-epoch
              seeds: the first epoch permutes with ``default_rng(seed)``; unlike it, the files are read one after
              the other, not interleaved)
    share   = what the buffer emits; with all the files, every P-th row of it (the ``datasets`` split by node)

A `Mark` is the position just after an emitted row: the source rows read so far, the generator's state, the row ids
in the buffer and those permuted out but not emitted yet. Restarting from it (`ShuffledStream.start`) fetches those
rows again by id (at most a buffer's worth, from the row groups that hold them), then reads the source from the row
group that holds the next row: the rest of the pass is the same rows in the same order, and nothing before the mark
is read again (tests/test_data_stream_resume.py counts the rows).
"""

from __future__ import annotations

from bisect import bisect_right
from contextlib import nullcontext
from itertools import accumulate

import numpy as np


# Parquet read through a buffer of this size, not a column chunk at a time (a row group's images at once), and not
# pre-buffered (pre-buffering keeps what it read): one row group's decoded batches at most.
READ_BUFFER = 8 << 20


def open_file(fs, file):
    """A local path as it is (pyarrow opens it), a Hub file as a file object of ``fs`` that reads byte ranges."""
    return fs.open(file, "rb") if fs is not None else nullcontext(file)


class ParquetShards:
    """The parquet files of a source: rows read in order from any row on, or fetched by row id. ``rows_read`` counts
    the rows taken out of the files (with the rows of a row group that precede a start in it, which are read and
    dropped); ``groups_fetched`` the row groups read to fetch rows by id (parquet reads a row group whole)."""

    def __init__(self, files: list, fs, columns: dict, max_rows: int | None):
        import pyarrow.parquet as pq

        self.files, self.fs, self.columns, self.max_rows = files, fs, dict(columns), max_rows
        self.groups = []  # per file: the first row (within the file) of each row group, and its end
        for file in files:
            with open_file(fs, file) as handle:
                meta = pq.read_metadata(handle)
            self.groups.append([0, *accumulate(meta.row_group(g).num_rows for g in range(meta.num_row_groups))])
        self.offsets = [0, *accumulate(g[-1] for g in self.groups)]  # each file's first row id
        self.rows_read = self.groups_fetched = 0

    def length(self, shard: int) -> int:
        """Rows of file ``shard`` in the source (--max_train_samples counts the first rows of the source)."""
        end = self.offsets[shard + 1] if self.max_rows is None else min(self.offsets[shard + 1], self.max_rows)
        return max(0, end - self.offsets[shard])

    def _rows(self, table, row_ids) -> list[dict]:
        """The rows of an Arrow batch or table as dicts of the canonical columns, with their row ids."""
        values = {name: table.column(source).to_pylist() for name, source in self.columns.items()}
        return [{"row_id": row_id, **{name: column[i] for name, column in values.items()}}
                for i, row_id in enumerate(row_ids)]

    def read(self, shard: int, start: int = 0):
        """Rows of file ``shard`` from its row ``start`` on, 64 at a time in memory (pyarrow decodes the row group
        that holds ``start`` from its first row: those rows before ``start`` are read, not kept)."""
        import pyarrow.parquet as pq

        end, bounds = self.length(shard), self.groups[shard]
        if start >= end:
            return
        group = bisect_right(bounds, start) - 1
        row = bounds[group]
        with open_file(self.fs, self.files[shard]) as handle:
            parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=READ_BUFFER)
            for batch in parquet.iter_batches(batch_size=64, row_groups=range(group, len(bounds) - 1),
                                              columns=list(dict.fromkeys(self.columns.values()))):
                first, row = row, row + batch.num_rows
                batch = batch.slice(min(max(0, start - first), batch.num_rows),
                                    max(0, min(row, end) - max(first, start)))
                self.rows_read += min(row, end) - first
                first_id = self.offsets[shard] + max(first, start)
                yield from self._rows(batch, range(first_id, first_id + batch.num_rows))
                if row >= end:
                    return

    def fetch(self, row_ids) -> dict[int, dict]:
        """``{row_id: row}`` for the given ids, each read from the row group that holds it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        wanted: dict[tuple[int, int], list[int]] = {}
        for row_id in sorted(set(map(int, row_ids))):
            shard = bisect_right(self.offsets, row_id) - 1
            local = row_id - self.offsets[shard]
            wanted.setdefault((shard, bisect_right(self.groups[shard], local) - 1), []).append(row_id)
        rows = {}
        for (shard, group), ids in wanted.items():
            with open_file(self.fs, self.files[shard]) as handle:
                table = pq.ParquetFile(handle, pre_buffer=False, buffer_size=READ_BUFFER).read_row_group(
                    group, columns=list(dict.fromkeys(self.columns.values())))
            first = self.offsets[shard] + self.groups[shard][group]
            self.rows_read, self.groups_fetched = self.rows_read + len(ids), self.groups_fetched + 1
            taken = table.take(pa.array([i - first for i in ids], type=pa.int64()))
            rows.update((row["row_id"], row) for row in self._rows(taken, ids))
        return rows


class Mark:
    """The position just after an emitted row: ``flush`` (what the buffer held when it last emitted) and how many of
    the rows it emitted have been passed. `state` is what a checkpoint keeps."""

    __slots__ = ("flush", "emitted")

    def __init__(self, flush: dict, emitted: int):
        self.flush, self.emitted = flush, emitted

    def state(self) -> dict:
        f = self.flush
        return {"epoch": f["epoch"], "source": f["source"], "rng": f["rng"], "buffer": f["buffer"],
                "pending": f["out"][self.emitted - f["first"]:], "emitted": self.emitted}


class ShuffledStream:
    """One process's share of ``shards``, shuffled per epoch (the module doc); iterating it yields the rows of a
    pass (``{"row_id", <columns>}``), `positioned` the rows with the `Mark` after each."""

    def __init__(self, shards: ParquetShards, *, seed: int, buffer_size: int, process_index: int = 0,
                 num_processes: int = 1):
        if buffer_size <= 0:
            raise ValueError(f"the shuffle buffer must hold at least one row, got {buffer_size}")
        self.shards, self.seed, self.buffer_size = shards, seed, buffer_size
        self.rank, self.world = process_index, num_processes
        self.by_file = len(shards.files) % num_processes == 0  # else every P-th row of the whole stream
        self.epoch, self.start = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        """The files this process reads in this epoch, in order."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards.files)).tolist()
        return order[self.rank::self.world] if self.by_file else order

    def generator(self) -> np.random.Generator:
        """The buffer's generator: ``default_rng(seed)`` in the first epoch, then one drawn from it and the epoch (as
        `datasets` shifts a shuffled dataset's generator per epoch)."""
        if not self.epoch:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(int(np.random.default_rng(self.seed).integers(0, 1 << 63)) - self.epoch)

    def __iter__(self):
        return (row for row, _ in self.positioned())

    def _source(self, start: int):
        """The rows of this process's files in this epoch's order, from the ``start``-th on."""
        for shard in self.order():
            length = self.shards.length(shard)
            if start < length:
                yield from self.shards.read(shard, start)
            start = max(0, start - length)

    def positioned(self):
        """``(row, mark)`` of this pass, from ``self.start`` (a `Mark.state` of this epoch; used once) if set."""
        start, self.start = self.start, None
        rng, size, (step, offset) = self.generator(), self.buffer_size, self._step()
        if start is None or start["epoch"] != self.epoch:
            start = {"source": 0, "buffer": [], "pending": [], "emitted": 0}
        else:
            rng.bit_generator.state = start["rng"]
        source, emitted = start["source"], start["emitted"]
        mine = [i for k, i in enumerate(start["pending"]) if (emitted + k) % step == offset]
        fetched = self.shards.fetch(start["buffer"] + mine) if start["buffer"] or mine else {}
        buffer = [fetched[i] for i in start["buffer"]]
        pending = [fetched.get(i) for i in start["pending"]]  # None: another process's row, not fetched
        flush = {"epoch": self.epoch, "source": source, "rng": rng.bit_generator.state, "buffer": start["buffer"],
                 "out": start["pending"], "first": emitted}
        yield from self._emit(flush, pending)
        emitted += len(pending)
        for row in self._source(source):
            buffer.append(row)
            source += 1
            if len(buffer) >= size:
                keep = size // 2
                order = rng.permutation(len(buffer))
                out, buffer = [buffer[i] for i in order[:size - keep]], [buffer[i] for i in order[size - keep:]]
                yield from self._emit(self._flush(source, rng, buffer, out, emitted), out)
                emitted += len(out)
        if buffer:
            out = [buffer[i] for i in rng.permutation(len(buffer))]
            yield from self._emit(self._flush(source, rng, [], out, emitted), out)

    def _flush(self, source: int, rng, buffer: list, out: list, first: int) -> dict:
        return {"epoch": self.epoch, "source": source, "rng": rng.bit_generator.state,
                "buffer": [row["row_id"] for row in buffer], "out": [row["row_id"] for row in out], "first": first}

    def _step(self) -> tuple[int, int]:
        """(P, p) when this process takes every P-th row of the stream from the p-th, else (1, 0)."""
        return (1, 0) if self.by_file else (self.world, self.rank)

    def _emit(self, flush: dict, rows: list):
        step, offset = self._step()
        for k, row in enumerate(rows):
            if (flush["first"] + k) % step == offset:
                yield row, Mark(flush, flush["first"] + k + 1)
