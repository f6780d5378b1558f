"""Data benchmark: peak memory and throughput of reading Pick-a-Pic-schema parquet as the trainers do, vs rows.

    python -m full.bench --data                        # 1k, 4k, 16k rows of ~50 KB JPEGs in a temporary dir
    python -m full.bench --data --rows 1000 4000 --workdir /scratch/bench --out figures.json

For each size it writes the parquet once (a pool of 64 distinct noise JPEGs, 256 px, ~50 KB each, reused across
rows: the bytes are all stored, only the encoding is saved), then runs two readers, each in a fresh process:

* `loader`: what `full.train` does before the UNet: `load_pair_rows` (one checking pass over the memory-mapped
  Arrow table), `PairDataset` at 256 px, a shuffled `DataLoader` of 8 pairs, every batch decoded. The cache
  builder (`python -m full.cache`) reads through this same loader, then runs the encoders.
* `stream`: `iter_source` (the streaming reader of the converters and Hub sources) decoding both images of every
  row, in order.
* `train-stream`: what `full.train --streaming` reads (`full.data.streaming`): the shuffled stream (buffer of 1000
  rows), rows checked, `PairDataset` items at 256 px with flips, batches of 8, every image decoded.
* `skip`: what a resumed `--streaming` run does to reach its position: the same stream, rows checked, nothing
  decoded (`--readers` picks among the four).

It prints the loader's start-up (`load s`: the parquet converted into the `datasets` Arrow cache and the checking
pass), rows/s of the iteration after it, and peak memory: `anon` is the peak of the process's anonymous resident memory (RssAnon: what the
reader itself holds), `rss` the peak resident set, which also counts pages of the memory-mapped Arrow file and
parquet that the kernel can drop at any time. The goal (issue 15): `anon` flat in the number of rows, and rows/s
bounded by JPEG decoding (`decode` column: decoding the 2 JPEGs of a row alone, the same pool, one thread).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROW_SIZES = (1000, 4000, 16000)
# Arrow's own allocator (mimalloc) and glibc's heap keep the freed buffers of ~50 KB images for reuse, so a reader's
# resident memory grows with the rows it has read although it holds one batch (`--allocator default` shows it). The
# system allocator for Arrow, and mmap for blocks >= 64 KB in glibc, hand them back: docs/scaling.md.
ALLOCATORS = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_MMAP_THRESHOLD_": "65536"}
POOL = 64  # distinct JPEGs
READERS = ("loader", "stream", "train-stream", "skip")


def jpeg_pool(n: int = POOL, size: int = 256, quality: int = 95) -> list[bytes]:
    """``n`` distinct noise-textured JPEGs of about 50 KB (random noise compresses poorly, like photographs)."""
    import numpy as np
    from PIL import Image

    rng, pool = np.random.default_rng(0), []
    for i in range(n):
        base = rng.integers(0, 256, (size // 3, size // 3, 3), dtype=np.uint8)
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


def run_reader(mode: str, path: str) -> dict:
    """One reader over the whole file (in this process): rows, seconds, peak memory."""
    import torch

    from full.data.images import PairDataset, collate_skip_none
    from full.data.sources import iter_source, load_pair_rows

    torch.set_num_threads(1)
    if mode in ("train-stream", "skip"):
        import datasets  # noqa: F401  (its import, seconds on a busy machine, is not the reader's time)
    memory, start, rows, load_seconds, load_memory = PeakMemory(), time.perf_counter(), 0, 0.0, {}
    if mode == "loader":
        dataset = PairDataset(load_pair_rows(path), resolution=256, random_flip=True)
        load_seconds = time.perf_counter() - start  # parquet -> Arrow cache, and the checking pass
        load_memory, memory = memory.stop(), PeakMemory()  # the start-up and the iteration measured apart
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collate_skip_none,
                                             generator=torch.Generator().manual_seed(0))
        for batch in loader:
            rows += len(batch["row_ids"])
    elif mode in ("train-stream", "skip"):
        from full.data.columns import ColumnMap
        from full.data.streaming import StreamedRows, StreamingLoader, open_stream

        stream = open_stream(path, "train", ColumnMap({c: c for c in ("jpg_0", "jpg_1", "label_0", "caption")}),
                             None, seed=0, buffer_size=1000)
        streamed = StreamedRows(stream, "pairs", PairDataset(None, resolution=256, random_flip=True), name=path)
        streamed.set_epoch(0)
        if mode == "skip":
            rows = sum(1 for _ in streamed.usable_rows())
        else:
            rows = sum(len(batch["row_ids"]) for batch in StreamingLoader(streamed, 8, "cpu"))
    else:
        from PIL import Image

        from full.data.sources import as_image_bytes

        for _, row in iter_source(path, "train", ("jpg_0", "jpg_1", "label_0", "caption"), None):
            for column in ("jpg_0", "jpg_1"):
                with Image.open(io.BytesIO(as_image_bytes(row[column]))) as image:
                    image.convert("RGB")
            rows += 1
    seconds = time.perf_counter() - start
    return {"mode": mode, "rows": rows, "load_seconds": load_seconds, "seconds": seconds, "rows_per_s": rows / seconds,
            **memory.stop(), **{f"load_{k}": v for k, v in load_memory.items()}}


def decode_rate(pool: list[bytes], rows: int = 500) -> float:
    """Rows/s of decoding two JPEGs per row and nothing else: the ceiling of both readers."""
    from PIL import Image

    start = time.perf_counter()
    for i in range(rows):
        for data in (pool[i % POOL], pool[(7 * i + 3) % POOL]):
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
    return rows / (time.perf_counter() - start)


def run(rows: list[int], readers: list[str], *, workdir: str | None = None, allocator: str = "system",
        out: str | None = None) -> list[dict]:
    """The data benchmark (`python -m full.bench --data`; flags in `full.bench.data_parser`): for each row count,
    each reader in a fresh process; the figures, also written to ``out`` as JSON."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="minipref-databench-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "datasets-cache"), "OMP_NUM_THREADS": "1",
           **(ALLOCATORS if allocator == "system" else {})}
    pool = jpeg_pool()
    print(f"allocators: {ALLOCATORS if allocator == 'system' else 'defaults'}")
    print(f"JPEG pool: {POOL} images, mean {sum(map(len, pool)) / POOL / 1024:.1f} KB; decode only: "
          f"{decode_rate(pool):.0f} rows/s (2 JPEGs a row)")
    print(f"{'rows':>6} {'reader':>12} {'load s':>7} {'load anon MB':>13} {'rows/s':>8} {'peak anon MB':>13} "
          f"{'peak rss MB':>12} {'parquet MB':>11}")
    figures = []
    for n in rows:
        path = write_pickapic(workdir / f"pickapic-{n}" / "train.parquet", n, pool)
        for mode in readers:
            done = subprocess.run([sys.executable, "-m", "full.bench", "--data", "--_reader", mode, str(path)],
                                 env=env, capture_output=True, text=True, check=True)
            result = {"n_rows": n, "parquet_mb": path.stat().st_size / 2**20, **json.loads(done.stdout.splitlines()[-1])}
            figures.append(result)
            print(f"{n:>6} {mode:>12} {result['load_seconds']:>7.1f} {result.get('load_anon_mb', 0):>13.0f} "
                  f"{result['rows_per_s']:>8.0f} {result['anon_mb']:>13.0f} "
                  f"{result['rss_mb']:>12.0f} {result['parquet_mb']:>11.0f}", flush=True)
    if out:
        Path(out).write_text(json.dumps(figures, indent=1))
    return figures
