"""Data benchmark: start-up, throughput and peak memory of reading Pick-a-Pic-schema parquet as the trainers do, vs
the number of rows.

    python -m full.bench --data                        # 500, 4k, 16k rows of ~50 KB JPEGs in a temporary dir
    python -m full.bench --data --rows 500 16000 --readers loader train-stream --resolution 256 512 \\
        --allocator chosen none pool mmap --workdir /scratch/bench --out figures.json
    python -m full.bench --data --rows 1000000 --readers launch --image_px 16     # a launch at a million rows
    python -m full.bench --data --rows 500 16000 --readers train --model DIR --resolution 32 --image_px 256

For each size it writes the parquet once (a pool of 64 distinct noise JPEGs of ``--image_px`` px, default the
resolution, reused across rows: the bytes are all stored, only the encoding is saved), then runs each reader in a
fresh process:

* `loader`: what `full.train` does before the UNet, at its *second* launch (the first, which converts the parquet
  into the `datasets` Arrow cache and stores the image check, runs first in its own process: `1st launch s`):
  `load_pair_rows`, `PairDataset` with flips, a shuffled `DataLoader` of 8 pairs, every batch decoded;
* `launch`: the loader's two launches without the iteration (start-up only, for very large row counts);
* `stream`: `iter_source` (the streaming reader of the converters and Hub sources) decoding both images of every row;
* `train-stream`: what `full.train --streaming` reads (`full.data.streaming`): the shuffled stream (buffer of 1000
  rows), rows checked, `PairDataset` items with flips, batches of 8, every image decoded (`start s`: to the first
  batch; its rows/s are over the whole pass, that first batch included);
* `train`: `python -m full.train` itself on ``--model DIR`` (2 DPO steps of 2 pairs at ``--resolution``), launched
  twice in fresh processes as a user would: `1st launch s` is the first process's wall time (it converts the
  parquet), `start s` the second's, whole (imports, model, checks, 2 steps, saving), `start anon MB` its peak;
* `resume` / `skip`: a `--streaming` resume 90% into the pass, from the place a checkpoint keeps (`resume`) or by the
  skip-ahead of a checkpoint without one (`skip`: the share read again, checked, not decoded): `start s` is the time
  to the first item after the place, `rows read` the rows taken out of the parquet files by then (and the row groups
  read whole to fetch the buffered rows by id: `rg`).

`anon` is the peak of the process's anonymous resident memory (RssAnon: what the reader itself holds), `rss` the
peak resident set, which also counts pages of the memory-mapped Arrow file and parquet that the kernel can drop at
any time; `start` figures are the start-up's, the others the iteration's. `decode`: rows/s of decoding the two JPEGs
of a row alone, the ceiling of every reader. `--allocator` names settings of `full.data.allocators` (docs/scaling.md).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from full.data.allocators import ALLOCATOR_SETTINGS, NAMES as ALLOCATOR_NAMES

ROW_SIZES = (500, 4000, 16000)
POOL = 64  # distinct JPEGs
READERS = ("loader", "stream", "train-stream", "resume", "skip", "launch", "train")
COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")


def jpeg_pool(n: int = POOL, size: int = 256, quality: int = 95) -> list[bytes]:
    """``n`` distinct noise-textured JPEGs of ``size`` px (about 50 KB at 256 px: random noise compresses poorly,
    like photographs)."""
    import numpy as np
    from PIL import Image

    rng, pool = np.random.default_rng(0), []
    for i in range(n):
        base = rng.integers(0, 256, (max(1, size // 3), max(1, size // 3), 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BILINEAR)  # smooth-ish texture, ~50 KB at q95
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        pool.append(buffer.getvalue())
    return pool


def write_pickapic(path: Path, rows: int, pool: list[bytes], chunk: int = 1000) -> Path:
    """Pick-a-Pic v2 schema (`jpg_0, jpg_1, label_0, caption`), written in row groups of ``chunk`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
                        ("caption", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, use_dictionary=["label_0"]) as writer:  # images stored in full, each row
        for start in range(0, rows, chunk):
            ids = range(start, min(rows, start + chunk))
            writer.write_table(pa.table({"jpg_0": [pool[i % POOL] for i in ids],
                                         "jpg_1": [pool[(7 * i + 3) % POOL] for i in ids],
                                         "label_0": [float(i % 2) for i in ids],
                                         "caption": [f"a photo number {i}" for i in ids]}, schema=schema))
    return path


class PeakMemory:
    """Peaks of RssAnon and VmRSS of this process, sampled every 5 ms."""

    def __init__(self):
        self.anon = self.rss = 0
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
            self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) * 1024)
            self.rss = max(self.rss, int(fields["VmRSS"].split()[0]) * 1024)
            time.sleep(0.005)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return {"anon_mb": self.anon / 2**20, "rss_mb": self.rss / 2**20}


def _stream(path: str, resolution: int):
    from full.data.columns import ColumnMap
    from full.data.images import PairDataset
    from full.data.streaming import StreamedRows, open_stream

    stream = open_stream(path, "train", ColumnMap({c: c for c in COLUMNS}), None, seed=0, buffer_size=1000)
    return StreamedRows(stream, "pairs", PairDataset(None, resolution=resolution, random_flip=True), name=path)


def _resume(mode: str, path: str, resolution: int) -> tuple[float, str, int]:
    """(seconds and rows read to the first item after a place 90% into the pass, with the row groups read to fetch
    rows by id; items from there on); the place is found untimed."""
    streamed = _stream(path, resolution)
    streamed.set_epoch(0)
    usable = [mark for _, mark in streamed._usable()]  # checked, not decoded: the place after each usable row
    at = int(0.9 * len(usable))
    start = time.perf_counter()
    fresh = _stream(path, resolution)
    fresh.set_epoch(0)
    if mode == "resume":
        fresh.resume({"epoch": 0, "items": at, "position": usable[at - 1].state()})
    else:
        fresh.skip_items = at
    items = iter(fresh)
    next(items)
    shards = fresh.stream.shards
    seconds, rows_read = time.perf_counter() - start, f"{shards.rows_read} ({shards.groups_fetched} rg)"
    return seconds, rows_read, 1 + sum(1 for _ in items)


def _train(path: str, model: str, resolution: int) -> int:
    """`python -m full.train` as a user launches it: 2 DPO steps of 2 pairs on ``model``; the rows it trained on."""
    from full import train

    with tempfile.TemporaryDirectory(prefix="minipref-databench-run-") as out:
        train.main(["--pretrained_model_name_or_path", model, "--dataset_name", path, "--method", "dpo",
                    "--max_train_steps", "2", "--train_batch_size", "2", "--resolution", str(resolution),
                    "--output_dir", out, "--seed", "0"])
    return 4


def run_reader(mode: str, path: str, resolution: int = 256, model: str | None = None) -> dict:
    """One reader over the whole file (in this process): rows, seconds, peak memory."""
    import torch

    from full.data.images import PairDataset, collate_skip_none
    from full.data.sources import iter_source, load_pair_rows

    torch.set_num_threads(1)
    import datasets  # noqa: F401  (its import, seconds on a busy machine, is not the reader's time)

    memory, start, rows, startup, startup_memory, rows_read = PeakMemory(), time.perf_counter(), 0, 0.0, {}, None
    cpu = time.process_time()  # the iteration's CPU time too: a busy neighbour inflates wall time, less this
    if mode in ("loader", "launch", "convert"):
        dataset = PairDataset(load_pair_rows(path), resolution=resolution, random_flip=True)
        startup = time.perf_counter() - start  # the checks, and at a first launch the conversion
        startup_memory, memory = memory.stop(), PeakMemory()  # the start-up and the iteration measured apart
        start, cpu = time.perf_counter(), time.process_time()
        if mode == "loader":
            loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collate_skip_none,
                                                 generator=torch.Generator().manual_seed(0))
            rows = sum(len(batch["row_ids"]) for batch in loader)
    elif mode == "train-stream":
        from full.data.streaming import StreamingLoader

        streamed = _stream(path, resolution)
        streamed.set_epoch(0)
        batches = iter(StreamingLoader(streamed, 8, "cpu"))
        rows = len(next(batches)["row_ids"])
        startup = time.perf_counter() - start  # rows/s over the whole pass: the first batch filled the buffer
        rows += sum(len(batch["row_ids"]) for batch in batches)
    elif mode in ("resume", "skip"):
        startup, rows_read, rows = _resume(mode, path, resolution)
    elif mode in ("train", "train-first"):
        rows = _train(path, model, resolution)  # the whole process's time: `process_s`
    else:
        from PIL import Image

        from full.data.sources import as_image_bytes

        for _, row in iter_source(path, "train", COLUMNS, None):
            for column in ("jpg_0", "jpg_1"):
                with Image.open(io.BytesIO(as_image_bytes(row[column]))) as image:
                    image.convert("RGB")
            rows += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    timed = rows and mode not in ("resume", "skip", "train", "train-first")
    return {"mode": mode, "rows": rows, "startup_s": startup, "seconds": seconds, "rows_read": rows_read,
            "rows_per_s": rows / seconds if timed else None, "rows_per_cpu_s": rows / cpu if timed else None,
            **memory.stop(), **{f"startup_{k}": v for k, v in startup_memory.items()}}


def decode_rate(pool: list[bytes], rows: int = 300) -> float:
    """Rows/s of decoding two JPEGs per row and nothing else: the ceiling of every reader."""
    from PIL import Image

    start = time.perf_counter()
    for i in range(rows):
        for data in (pool[i % POOL], pool[(7 * i + 3) % POOL]):
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
    return rows / (time.perf_counter() - start)


def _in_process(mode: str, path: Path, resolution: int, env: dict, model: str | None = None) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "full.bench", "--data", "--_reader", mode, str(path),
                           "--resolution", str(resolution), *(["--model", model] if model else [])],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"reader {mode} on {path} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.splitlines()[-1]), "process_s": time.perf_counter() - started}


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = (("rows", 7), ("px", 4), ("allocator", 12), ("reader", 13), ("1st launch s", 13), ("start s", 8),
          ("start anon MB", 14), ("rows/s", 7), ("rows/cpu-s", 11), ("peak anon MB", 13), ("peak rss MB", 12),
          ("rows read", 14))


def plot_launch(figures: list[dict], path) -> Path:
    """Start-up seconds and peak anonymous memory against the number of rows, one line per reader (and allocator
    and resolution, when several ran): the curve of docs/scaling.md."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch

    lines: dict[str, list[dict]] = {}
    several = len({(f["allocator"], f["resolution"]) for f in figures}) > 1
    for f in figures:
        if f["startup_s"] is None or f["mode"] in ("resume", "skip"):
            continue
        label = f["mode"] + (f" ({f['allocator']}, {f['resolution']} px)" if several else "")
        lines.setdefault(label, []).append(f)
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    measures = (("startup_s", "start-up, s (train: the whole 2-step launch)"),
                ("startup_anon_mb", "peak anonymous memory of the start-up, MB"))
    for ax, (key, title) in zip(axes, measures):
        for (label, runs), marker, colour in zip(sorted(lines.items()), "osD^v<>", [f"C{i}" for i in range(9)]):
            points = sorted((p["n_rows"], p.get(key)) for p in runs if p.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker=marker, color=colour, label=f"{label}: 2nd launch")
            first = sorted((p["n_rows"], p["first_launch_s"]) for p in runs if p.get("first_launch_s") is not None)
            if key == "startup_s" and first:  # the one-time conversion (and header check), for contrast
                ax.plot(*zip(*first), marker=marker, color=colour, linestyle="--", mfc="none",
                        label=f"{label}: 1st launch (converts)")
        ax.set_xscale("log")
        ax.set_xlabel("rows in the table")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return Path(path)


def run(rows: list[int], readers: list[str], *, workdir: str | None = None, allocators=("chosen",),
        resolutions=(256,), image_px: int | None = None, model: str | None = None, out: str | None = None,
        plot: str | None = None) -> list[dict]:
    """The data benchmark (`python -m full.bench --data`; flags in `full.bench.data_parser`): for each allocator
    setting, resolution and row count, each reader in a fresh process; the figures, also written to ``out``."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="minipref-databench-"))
    base = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_NAMES}  # each setting as it is, alone
    figures = []
    print("".join(f"{h:>{w}}" for h, w in HEADER))
    for allocator in allocators:
        env = {**base, "OMP_NUM_THREADS": "1", **ALLOCATOR_SETTINGS[allocator]}
        for resolution in resolutions:
            px = image_px or resolution
            pool = jpeg_pool(size=px)
            print(f"# {allocator}: {ALLOCATOR_SETTINGS[allocator] or 'no settings'}; {px} px JPEGs, mean "
                  f"{sum(map(len, pool)) / POOL / 1024:.1f} KB; decode only: {decode_rate(pool):.0f} rows/s", flush=True)
            for n in rows:
                path = workdir / f"pickapic-{n}-{px}px" / "train.parquet"
                if not path.exists():
                    write_pickapic(path, n, pool)
                for mode in readers:
                    first, cache = None, workdir / "datasets-cache"
                    shutil.rmtree(cache, ignore_errors=True)  # every loader has a first launch: the conversion
                    env["HF_DATASETS_CACHE"] = str(cache)
                    if mode in ("loader", "launch"):
                        first = _in_process("convert", path, resolution, env)["startup_s"]
                    elif mode == "train":  # the first launch converts the parquet: its whole process
                        first = _in_process("train-first", path, resolution, env, model)["process_s"]
                    result = {"n_rows": n, "resolution": resolution, "allocator": allocator,
                              "parquet_mb": path.stat().st_size / 2**20, "first_launch_s": first,
                              **_in_process(mode, path, resolution, env, model)}
                    if mode == "train":  # a launch: the second process's wall time, its memory over the whole run
                        result["startup_s"], result["startup_anon_mb"] = result["process_s"], result["anon_mb"]
                    figures.append(result)
                    cells = (n, resolution, allocator, mode, _cell(result["first_launch_s"], ".2f"),
                             _cell(result["startup_s"], ".2f"), _cell(result.get("startup_anon_mb"), ".0f"),
                             _cell(result["rows_per_s"], ".0f"), _cell(result["rows_per_cpu_s"], ".0f"),
                             _cell(result["anon_mb"], ".0f"),
                             _cell(result["rss_mb"], ".0f"), _cell(result["rows_read"], "s"))
                    print("".join(f"{c:>{w}}" for c, (_, w) in zip(cells, HEADER)), flush=True)
    shutil.rmtree(workdir / "datasets-cache", ignore_errors=True)
    if out:
        Path(out).write_text(json.dumps(figures, indent=1))
    if plot:
        print(f"wrote {plot_launch(figures, plot)}")
    return figures
