"""`full.train --streaming`: train from the parquet files as a stream, without converting or downloading them first.

The default reader (`full.data.tables.open_table`) converts a source once into a memory-mapped Arrow table and
indexes it at random: `--num_train_epochs`, `--desirable_ratio`. Pick-a-Pic v2 on the Hub is hundreds of GB, and that
table would be a second copy on disk. With ``--streaming`` the rows are read from the parquet files (local, or the
Hub's through `huggingface_hub.HfFileSystem`) 64 at a time (`full.data.stream_source`):

    files -> rows with their row ids  (row id = position in the source, files in sorted order, as everywhere else)
          -> shuffle                  (seeded: file order + a buffer of --shuffle_buffer_size rows; new per epoch)
          -> this process's share     (its files when the process count divides them, else every P-th row)
          -> check                    (malformed rows warned with their row id and counted; ties dropped, counted)
          -> decode                   (per item, in --dataloader_num_workers threads; undecodable: the run's total)

Resume: a checkpoint holds each process's position in its pass (`StreamingLoader.state_dict`: the source rows read,
the shuffle generator's state, the row ids in the shuffle buffer and those shuffled out but not yet trained on), so a
resumed run fetches the buffered rows again by id and reads on from the row group where it stopped: at most a
buffer and a row group, wherever in the epoch it stopped; the same batches follow and the LoRA is bit-identical to
an uninterrupted run's (tests/test_streaming.py, tests/test_data_stream_resume.py counts the rows read). The rows
are not a `datasets.IterableDataset` for this reason: its ``state_dict()`` restores the shard and the row within it
but not the shuffle buffer, so the buffered rows would be missed for the epoch and the order after a resume would
differ. Where no position fits (a checkpoint of another process count) the share is read again from the start of the
epoch and the trained items are passed over without decoding. An epoch ends for every process when the first one's
share runs out (the shares differ by the rows dropped in each).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import torch

from full.data.columns import ColumnMap
from full.data.config import DataConfig
from full.data.images import FeedbackDataset, PairDataset, collate_skip_none
from full.data.rows import source_format
from full.data.sources import (FEEDBACK_COLUMNS, PAIR_COLUMNS, RowReport, checked_feedback_label, checked_pair_label,
                               feedback_item, note_empty_caption, pair_item)
from full.data.stream_source import ParquetShards, ShuffledStream, open_file
from full.data.tables import check_parquet_columns, hub_parquet_files, is_image_folder, parquet_files

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Files -> a seeded, shuffled, per-process stream of rows with their row ids (full/data/stream_source.py)
# ----------------------------------------------------------------------------------------------


def open_stream(dataset_name: str, split: str, columns: ColumnMap, max_rows: int | None, *, seed: int,
                buffer_size: int, process_index: int = 0, num_processes: int = 1) -> ShuffledStream:
    """This process's share of the source, shuffled (`full.data.stream_source.ShuffledStream`): rows
    ``{"row_id", <canonical columns>}``. Fails with one line (a missing column names its flag) before anything is
    decoded."""
    path = Path(dataset_name).expanduser()
    if path.exists() and is_image_folder(path):
        raise ValueError(f"--streaming reads parquet files; {path} is an image folder: drop --streaming (its table "
                         "holds the image paths only, not the images)")
    fs, files = (None, [str(f) for f in parquet_files(path, split)]) if path.exists() else \
        hub_parquet_files(dataset_name, split)
    with open_file(fs, files[0]) as first:  # its schema; a later file that differs fails when it is reached
        check_parquet_columns(first, columns, name=files[0])
    shards = ParquetShards(files, fs, dict(columns), max_rows)  # each file's rows and row groups, from the footers
    return ShuffledStream(shards, seed=seed, buffer_size=buffer_size, process_index=process_index,
                          num_processes=num_processes)


# ----------------------------------------------------------------------------------------------
# Rows -> checked, decoded items, with the skip-ahead of a resume
# ----------------------------------------------------------------------------------------------


class StreamedRows(torch.utils.data.IterableDataset):
    """The items of one process's stream: rows checked as `full.data.sources` checks a table's (same reasons, same
    row ids), then decoded by ``images.prepare`` (a `PairDataset` / `FeedbackDataset` without rows)."""

    def __init__(self, stream, kind: str, images, *, name: str, keep_ties: bool = False,
                 only_desirable: bool = False, decode_threads: int = 0):
        self.stream, self.kind, self.images, self.name = stream, kind, images, name
        self.keep_ties, self.only_desirable, self.decode_threads = keep_ties, only_desirable, decode_threads
        self.epoch, self.skip_items = 0, 0
        self.start, self.items, self.mark, self.at = None, 0, None, None  # a saved place to start at, the items
        # handed out this pass, the place after the last of them (or where the pass started: `at`)
        self.counts = {"read": 0, "usable": 0, "ties": 0, "malformed": 0}  # this process, this session
        self.report = RowReport(name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.report.kept = {}  # the empty captions are counted per pass: every pass reads the same rows again
        self.stream.set_epoch(epoch)  # a new shuffle per epoch, the same on every process
        self.images.set_epoch(epoch)  # new flips, crops and caption dropouts

    def checked(self, raw: dict) -> dict | None:
        """The row as the image dataset wants it, or None (reported and counted, or a tie / undesirable dropped)."""
        row_id = raw["row_id"]
        self.counts["read"] += 1
        if self.kind == "pairs":
            label = checked_pair_label(raw, row_id, self.report)
            if label is not None and label == 0.5:
                self.counts["ties"] += 1
                if not self.keep_ties:
                    return None
            row = None if label is None else pair_item(raw, row_id, {"jpg_0_won": label >= 0.5, "tie": label == 0.5})
        else:
            label = checked_feedback_label(raw, row_id, self.report)
            row = None if label is None or (self.only_desirable and not label) else \
                feedback_item(raw, row_id, {"desirable": label})
        if row is not None:
            note_empty_caption(raw, row_id, self.report)
        self.counts["malformed"] = sum(self.report.counts.values())
        self.counts["usable"] += row is not None
        return row

    def usable_rows(self):
        """The checked rows of a pass, not decoded."""
        return (row for row, _ in self._usable())

    def _usable(self):
        """``(row, mark)``: the usable rows of a pass and the stream's place after each; the pass starts at
        ``self.start`` (a `state` of this epoch, used once) when set."""
        self.stream.start, self.start = self.start and self.start["position"], None
        for raw, mark in self.stream.positioned():
            row = self.checked(raw)
            if row is not None:
                yield row, mark

    def state(self) -> dict:
        """Where this pass is: the items handed out and the stream's place after the last (None: the start of the
        epoch; read again and ``items`` passed over on a resume)."""
        return {"epoch": self.epoch, "items": self.items, "position": self.mark.state() if self.mark else self.at}

    def resume(self, state: dict) -> None:
        """Start the next pass where ``state`` (a `state` of the current epoch) was."""
        self.start = state

    def __iter__(self):
        skip, self.skip_items = self.skip_items, 0  # a resume without a place skips once, at the start of its epoch
        self.at = self.start and self.start["position"]
        self.items, self.mark = (self.start["items"] if self.start else 0) + skip, None
        rows = islice(self._usable(), skip, None)  # checked, not decoded: the skip costs reading only
        for item, self.mark in self._decoded(rows):
            self.items += 1
            yield item
        logger.info("%s: pass %d of this process's share: %s", self.name, self.epoch, self.summary())
        self.report.warn_kept(f"pass {self.epoch} of this process's share: ")

    def _decoded(self, rows):
        """``(item, mark)`` in stream order; with threads, a few items ahead are decoded at once (PIL releases the
        GIL)."""
        def prepare(pair):
            return self.images.prepare(pair[0], pair[0]["row_id"]), pair[1]  # the row id seeds its flips

        if not self.decode_threads:
            yield from map(prepare, rows)
            return
        with ThreadPoolExecutor(self.decode_threads) as pool:
            while chunk := list(islice(rows, 4 * self.decode_threads)):
                yield from pool.map(prepare, chunk)

    def summary(self) -> str:
        c = self.counts
        return (f"{c['read']} rows read, {c['usable']} usable, {c['ties']} ties "
                f"{'kept' if self.keep_ties else 'dropped'}, malformed: {self.report.summary()}")

    def check_usable(self) -> None:
        """Fail before the model loads when the share holds no usable row (reads until the first one)."""
        self.set_epoch(0)
        if next(self.usable_rows(), None) is None:
            raise ValueError(f"no usable rows in {self.name}: {self.summary()}")
        self.counts = dict.fromkeys(self.counts, 0)  # the training passes count anew
        self.report = RowReport(self.name)


class StreamingLoader:
    """Batches of a `StreamedRows`, on the device. `accelerate` does not prepare it (`shards_itself`): the
    stream is already this process's share. The run loop calls `set_epoch` and, on a resume, `skip_batches`; a
    checkpoint holds `state_dict` (the run loop registers it, `full.run.loop`)."""

    shards_itself = True

    def __init__(self, rows: StreamedRows, batch_size: int, device, *, process_index: int = 0,
                 num_processes: int = 1, gather=None):
        self.rows, self.batch_size, self.device = rows, batch_size, device
        self.loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=collate_skip_none)
        self.process_index, self.num_processes = process_index, num_processes
        self.gather = gather or (lambda states: states)  # every process's list of states, concatenated
        self.saved = None  # this process's state from the checkpoint a run resumes from

    def state_dict(self) -> dict:
        """Every process's place in its pass (`StreamedRows.state`; every process calls this when a checkpoint is
        saved, the main process writes it)."""
        return {"processes": self.gather([self.rows.state()])}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "processes" not in state:  # another object's file at this index
            raise ValueError("the checkpoint holds no stream position where a --streaming run keeps it: it was "
                             "written by a run without --streaming (resume without it, or start a new output_dir)")
        processes = state["processes"]
        self.saved = processes[self.process_index] if len(processes) == self.num_processes else None

    def set_epoch(self, epoch: int) -> None:
        self.rows.set_epoch(epoch)

    def skip_batches(self, batches: int) -> "StreamingLoader":
        """Resume mid-epoch after ``batches`` batches of this process's items: at the place the checkpoint saved
        (the buffered rows fetched again by id), or, for a checkpoint without one, by reading the share from the
        start of the epoch and passing over the trained items undecoded."""
        items, saved, self.saved = batches * self.batch_size, self.saved, None
        if saved and saved["position"] and saved["epoch"] == self.rows.epoch \
                and items - self.batch_size < saved["items"] <= items:  # the last batch of a pass may be short
            self.rows.resume(saved)
        else:
            self.rows.skip_items = items
        return self

    def __iter__(self):
        from accelerate.utils import send_to_device

        for batch in self.loader:
            yield None if batch is None else send_to_device(batch, self.device)


def make_streaming_loader(data: DataConfig, kind: str, accelerator) -> StreamingLoader:
    """`full.train --streaming`'s loader: this process's share of --dataset_name, checked and decoded per item."""
    fmt = source_format(data)
    if kind == "pairs" and fmt == "feedback":
        raise ValueError(f"--method {data.method} needs preference pairs {list(PAIR_COLUMNS)}, but "
                         f"{data.dataset_name} holds binary feedback {list(FEEDBACK_COLUMNS)}")
    if kind == "feedback" and fmt == "pairs":
        raise ValueError(f"--streaming --method {data.method} on pairs: the per-image labels (--feedback_policy) "
                         "need a pass over every pair first. Convert once (`python -m full.data convert "
                         f"pairs-to-feedback --input {data.dataset_name} --output feedback.parquet`) and stream "
                         "that, or drop --streaming")
    stream = open_stream(data.dataset_name, data.dataset_split_name, data.columns(fmt), data.max_train_samples,
                         seed=data.seed, buffer_size=data.shuffle_buffer_size,
                         process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    images = (PairDataset if kind == "pairs" else FeedbackDataset)(
        None, data.resolution, center_crop=not data.random_crop, random_flip=data.random_flip,
        caption_dropout=data.caption_dropout, seed=data.seed)
    rows = StreamedRows(stream, kind, images, name=f"{data.dataset_name} (stream)", keep_ties=data.keep_ties,
                        only_desirable=data.desirable_only, decode_threads=data.dataloader_num_workers)
    rows.check_usable()
    from accelerate.utils import gather_object

    return StreamingLoader(rows, data.train_batch_size, accelerator.device, process_index=accelerator.process_index,
                           num_processes=accelerator.num_processes,
                           gather=gather_object if accelerator.num_processes > 1 else None)


def report_stream_rows(loader, accelerator) -> dict[str, int]:
    """The rows every process read this session, said once: what the stream counterpart of the table's checking
    pass reports (each malformed row was warned about with its id when it was read)."""
    keys = list(loader.rows.counts)
    local = torch.tensor([loader.rows.counts[k] for k in keys], device=accelerator.device)
    totals = dict(zip(keys, accelerator.reduce(local, reduction="sum").tolist()))
    if accelerator.is_main_process:
        logger.warning("%s: this run read %d rows on %d process(es): %d usable, %d ties, %d malformed (row ids in "
                       "the warnings above)", loader.rows.name, totals["read"], accelerator.num_processes,
                       totals["usable"], totals["ties"], totals["malformed"])
    return totals
