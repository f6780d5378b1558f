"""Where rows come from: a parquet file, a directory of parquet files (a Hub snapshot's layout), or a Hub dataset.

`iter_source` streams rows in order (one Arrow batch of a local file at a time, or a Hub dataset with
``streaming=True``); `open_table` gives the memory-mapped `datasets` table that the trainers index at random.
Both fail with one line that names the file, the missing columns, or what to do when the Hub is unavailable.
`full/data/sources.py` checks the rows these return.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from full.data.columns import as_column_map, missing_columns_message
from full.paths import missing_local_path


def parquet_files(path: Path, split: str) -> list[Path]:
    """The parquet files of a local source. A directory may be a Hub snapshot such as
    ``pickapic_v2/data/{train,validation,test}-000NN-of-000MM.parquet``: when some files are named
    or nested after ``split`` only those are used, otherwise every parquet file under it."""
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if not files:  # an image folder has been ruled out (`is_image_folder`) before the parquet files are looked for
        raise ValueError(f"dataset directory {path} has no .parquet files and no {' / '.join(METADATA_FILES)} of an "
                         f"image folder (one row per image: file_name, caption, label); {directory_contents(path)}")
    return in_split([f.relative_to(path) for f in files], split, root=path)


def directory_contents(path: Path, kinds: int = 5) -> str:
    """What a directory holds, for a message: "it is empty" or "it holds 12 files (10 .png, 2 .txt)"."""
    from collections import Counter

    suffixes = Counter(f.suffix.lower() or "without extension" for f in path.rglob("*") if f.is_file())
    if not suffixes:
        return "it is empty"
    listed = ", ".join(f"{n} {suffix}" for suffix, n in suffixes.most_common(kinds))
    others = f", {len(suffixes) - kinds} other kinds" if len(suffixes) > kinds else ""
    total = sum(suffixes.values())
    return f"it holds {total} file{'s' if total != 1 else ''} ({listed}{others})"


def in_split(relative: list, split: str, root=None) -> list:
    """The files of ``split`` (named ``split-*`` or ``split.parquet``, or under a ``split`` directory), else all."""
    chosen = [f for f in relative if f.name.startswith(f"{split}-") or f.name == f"{split}.parquet"
              or split in f.parts[:-1]] or relative
    return [root / f for f in chosen] if root is not None else chosen


def hub_parquet_files(dataset_name: str, split: str):
    """``(filesystem, paths)`` of a Hub dataset's parquet files of ``split`` (`huggingface_hub.HfFileSystem`), for
    the streaming reader, which opens them like local files: one row group in memory at a time."""
    from pathlib import PurePosixPath

    check_hub_name(dataset_name)
    try:
        from huggingface_hub import HfFileSystem

        fs, root = HfFileSystem(), f"datasets/{dataset_name}"
        found = sorted(fs.glob(f"{root}/**/*.parquet"))
    except Exception as error:  # offline, no such repo, gated, ...
        raise ValueError(hub_failure(dataset_name, split, error)) from error
    if not found:
        raise ValueError(hub_failure(dataset_name, split, ValueError("no .parquet files in the repository")))
    relative = [PurePosixPath(f).relative_to(root) for f in found]
    return fs, [f"{root}/{f}" for f in in_split(relative, split)]


def iter_source(dataset_name: str, split: str, columns: Sequence[str] | Mapping[str, str], max_rows: int | None
                ) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_id, row)`` with ``row`` restricted to ``columns``, streaming: one Arrow batch of a local file
    in memory at a time, or a Hub dataset with ``streaming=True``. ``row_id`` is the row's position in the source
    (files in sorted order), so a reported id can be looked up. The cache builder and the converters read this
    way; the trainers index rows at random and use `open_table`. ``columns``: a list of names, or a
    `full.data.columns.ColumnMap` (rows then have its canonical names). An image folder is read through `open_table`
    (`datasets` keeps the paths; the images stay in their files)."""
    columns = as_column_map(columns)
    path = Path(dataset_name).expanduser()
    if path.exists() and is_image_folder(path):
        yield from enumerate(open_table(dataset_name, split, columns, max_rows))
        return
    for row_id, row in _iter_source_columns(dataset_name, split, columns, max_rows):
        yield row_id, {name: row[source] for name, source in columns.items()}


def _iter_source_columns(dataset_name: str, split: str, columns, max_rows: int | None) -> Iterator[tuple[int, dict]]:
    """`iter_source`'s rows with the source's column names."""
    path = Path(dataset_name).expanduser()
    if path.exists():
        import pyarrow.parquet as pq

        row_id = 0
        for file in parquet_files(path, split):
            try:
                parquet = pq.ParquetFile(file, pre_buffer=False)  # pre-buffering keeps what it read: memory grows
            except Exception as error:  # not a parquet file, truncated footer, ...
                raise ValueError(f"cannot read parquet file {file}: {error}") from error
            message = missing_columns_message(columns, parquet.schema_arrow.names, str(file))
            if message:
                raise ValueError(message)
            for batch in parquet.iter_batches(batch_size=256, columns=list(dict.fromkeys(columns.sources))):
                for row in batch.to_pylist():
                    if max_rows is not None and row_id >= max_rows:
                        return
                    yield row_id, row
                    row_id += 1
        return
    check_hub_name(dataset_name)
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"{dataset_name!r} is not a local path, and loading a Hub dataset needs the "
                         "`datasets` package: pip install datasets") from error
    # Streaming: rows arrive as the parquet shards download, nothing is kept (Pick-a-Pic v2 is hundreds of GB).
    try:
        hub = datasets.load_dataset(dataset_name, split=split, streaming=True)
    except Exception as error:
        raise ValueError(hub_failure(dataset_name, split, error)) from error
    if hub.features is not None:
        message = missing_columns_message(columns, list(hub.features),
                                          f"Hub dataset {dataset_name!r} (split {split!r})")
        if message:
            raise ValueError(message)
    hub = hub.select_columns(list(dict.fromkeys(columns.sources)))
    for column, feature in (hub.features or {}).items():
        if isinstance(feature, datasets.Image):  # keep the encoded bytes; we decode (and catch) ourselves
            hub = hub.cast_column(column, datasets.Image(decode=False))
    for row_id, row in enumerate(hub):
        if max_rows is not None and row_id >= max_rows:
            return
        yield row_id, row


def open_table(dataset_name: str, split: str, columns: Sequence[str] | Mapping[str, str], max_rows: int | None):
    """The source as a `datasets.Dataset`: Arrow, memory-mapped from disk, restricted to ``columns`` and with them
    renamed to their canonical names (``columns``: a list of names, or a `full.data.columns.ColumnMap`).

    A local parquet file or directory is converted once into the `datasets` cache (``HF_DATASETS_CACHE``, the size
    of the parquet data; later runs reuse it); an image folder with a metadata file (`is_image_folder`) is read by
    `datasets`' ``imagefolder`` builder (the cache holds the paths, the images stay in their files); a Hub name is
    downloaded into the same cache. Images stay encoded bytes (``Image(decode=False)``): the torch datasets decode
    them lazily, one item at a time.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    columns = as_column_map(columns)
    path = Path(dataset_name).expanduser()
    if path.exists() and is_image_folder(path):
        table = _load_image_folder(datasets, path, split)
        where = f"image folder {path} (metadata {', '.join(sorted(set(METADATA_FILES) & names_under(path)))})"
    elif path.exists():
        files = parquet_files(path, split)
        for file in files:  # the same one-line errors as the streaming reader, before `datasets` sees the files
            check_parquet_columns(file, columns)
        table, where = _convert_parquet(datasets, [str(f) for f in files]), str(path)
    else:
        check_hub_name(dataset_name)
        try:
            table = datasets.load_dataset(dataset_name, split=split)
        except Exception as error:
            raise ValueError(hub_failure(dataset_name, split, error)) from error
        where = f"Hub dataset {dataset_name!r} (split {split!r})"
    message = missing_columns_message(columns, table.column_names, where)
    if message:
        raise ValueError(message)
    table = table.select_columns(columns.sources)
    renames = {source: name for name, source in columns.items() if source != name}
    if renames:  # metadata only: the Arrow buffers are shared
        table = table.rename_columns(renames)
    for column, feature in table.features.items():
        if isinstance(feature, datasets.Image):  # keep the encoded bytes; we decode (and catch) ourselves
            table = table.cast_column(column, datasets.Image(decode=False))
    if max_rows is not None and max_rows < len(table):
        table = table.select(range(max_rows))  # a contiguous range: an index view, nothing copied
    return table


# ----------------------------------------------------------------------------------------------
# A local image folder with a metadata file (the diffusers / `datasets` "imagefolder" convention)
# ----------------------------------------------------------------------------------------------

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def names_under(path: Path) -> set[str]:
    return {p.name for p in path.rglob("metadata.*")}


def is_image_folder(path: Path) -> bool:
    """A directory with a ``metadata.jsonl`` (or .csv/.parquet) anywhere under it: one row per image, its
    ``file_name`` relative to the metadata file, and the other columns (``caption``, ``label``) as they are."""
    return path.is_dir() and bool(set(METADATA_FILES) & names_under(path))


def _load_image_folder(datasets, path: Path, split: str):
    """`datasets.load_dataset("imagefolder", data_dir=...)`: the images become an ``image`` column, the metadata
    columns stay. ``drop_labels``: a ``label`` column comes from the metadata, never from the folder names. A folder
    without ``split``'s subdirectory is all one "train" split."""
    try:
        folder = datasets.load_dataset("imagefolder", data_dir=str(path), drop_labels=True)
    except Exception as error:  # a metadata row naming a missing file, an unparsable metadata line, ...
        raise ValueError(f"cannot read image folder {path}: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from error
    if split not in folder:
        raise ValueError(f"image folder {path} has no split {split!r} (it has {sorted(folder)}); "
                         "pass --dataset_split_name")
    return folder[split]


def _convert_parquet(datasets, files: list[str]):
    """Local parquet -> one Arrow file in the `datasets` cache, then a memory-mapped `datasets.Dataset` over it.

    Not `datasets.load_dataset("parquet")`: its reader, Arrow's dataset scanner (`ParquetFileFragment.to_batches`),
    reads row groups ahead of the writer into a queue that nothing bounds, so the conversion's memory grew with the
    file (396 -> 582 -> 868 MB for 1k -> 4k -> 16k rows, docs/scaling.md; `pyarrow.total_allocated_bytes()` climbed
    to 8 row groups). `ParquetFile.iter_batches` reads one batch when asked: the conversion holds one batch.
    The Arrow file is named by the files' paths, sizes and modification times (a changed file is converted again);
    the processes of a launch take a file lock, so one converts and the others reuse its file. The same pass parses
    the header of every image (`full.data.checks`) and keeps the rows that are not images in ``KEY.check.json``
    next to the Arrow file, so that no launch has to read the images to check them.
    """
    import hashlib
    import json
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from filelock import FileLock  # a dependency of `datasets`

    from full.data.checks import _is_binary, _is_image_struct, bad_image_rows, write_check

    stats = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:20]
    directory = converted_directory()
    directory.mkdir(parents=True, exist_ok=True)
    arrow_file = directory / f"{key}.arrow"
    with FileLock(str(arrow_file) + ".lock"):
        if not arrow_file.exists():
            schema = pq.read_schema(files[0])  # with its `huggingface` metadata: the features (Image, ...) survive
            images = [f.name for f in schema if _is_binary(f.type) or _is_image_struct(f.type)]
            bad, rows = {name: [] for name in images}, 0
            partial = arrow_file.with_name(f"{key}.{os.getpid()}.partial")
            with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:  # datasets' format
                for file in files:
                    for batch in pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=256):
                        try:
                            table = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                            partial.unlink()
                            raise ValueError(f"{file} does not have the columns and types of {files[0]} "
                                             f"({error}); give the files of one schema") from error
                        writer.write_table(table)
                        for name in images:
                            bad[name] += bad_image_rows(table.column(name), rows)
                        rows += table.num_rows
            write_check(arrow_file.with_suffix(".check.json"), rows, bad)
            os.replace(partial, arrow_file)  # a kill mid-conversion leaves no half file under the final name
    return datasets.Dataset.from_file(str(arrow_file))


def converted_directory() -> Path:
    """Where converted parquet sources (``KEY.arrow``) and the image checks of tables (``KEY.check.json``) live."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "minipref-parquet"


def check_parquet_columns(file, columns: Sequence[str] | Mapping[str, str], name: str | None = None) -> None:
    """One line naming the flag of each column ``file`` (a path or an open file called ``name``) lacks, and the
    columns it has."""
    import pyarrow.parquet as pq

    name = name or str(file)
    try:
        names = pq.read_schema(file).names
    except Exception as error:  # not a parquet file, truncated footer, ...
        raise ValueError(f"cannot read parquet file {name}: {error}") from error
    message = missing_columns_message(as_column_map(columns), names, name)
    if message:
        raise ValueError(message)


def check_hub_name(dataset_name: str) -> None:
    if missing_local_path(dataset_name) or "/" not in dataset_name:
        raise ValueError(f"dataset {dataset_name!r} not found: expected a parquet file, a directory of "
                         "parquet files, or a Hub dataset name such as 'yuvalkirstain/pickapic_v2'")


def hub_failure(dataset_name: str, split: str, error: Exception) -> str:
    """No such repo / split, offline, gated, ...: one line that says what to do instead."""
    return (f"{dataset_name!r} is neither a local path nor a loadable Hub dataset (split {split!r}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Download its parquet "
            "files (e.g. `huggingface-cli download yuvalkirstain/pickapic_v2 --repo-type dataset --include "
            "'data/train-*' --local-dir pickapic_v2`) and pass the directory: --dataset_name pickapic_v2/data")
