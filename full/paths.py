"""Local path or Hub id? A name that reads as a local path but does not exist is reported as missing, never sent to
the Hub (where it would become a long lookup traceback, or a download of something else). And what a local model
*is*, whatever path names it: `model_fingerprint`, the key of every cache built from a model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FILE_SUFFIXES = (".parquet", ".json", ".jsonl", ".txt", ".csv", ".safetensors", ".ckpt", ".bin")


def missing_local_path(name: str) -> bool:
    """True when `name` does not exist here and reads as a local path: absolute or relative (`/`, `.`, `~`), more
    than one `/`, a file suffix such as `.parquet` (not `-1.0`), or under a directory that exists here (`runs/x`)."""
    path = Path(name).expanduser()
    if path.exists():
        return False
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name \
        or path.suffix in FILE_SUFFIXES
    return looks_local or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".gguf")
SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def model_fingerprint(name: str | None, revision: str | None = None) -> str | None:
    """A content key for a model: for a local folder (or file), sha256 over every small file's bytes (configs,
    tokenizers) and, for each weight file, its size and SAMPLES evenly spaced 64 KiB reads (a full read of a 4 GB
    UNet at every launch would cost seconds; a retrained or another checkpoint differs in the sampled bytes). A Hub
    id is keyed by name and revision (the Hub's content address), None stays None."""
    if name is None:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return f"hub:{name}@{revision or 'main'}"
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            if file.suffix not in WEIGHT_SUFFIXES:
                digest.update(f.read())
                continue
            for i in range(SAMPLES):
                f.seek(max(0, size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()


def model_files(path: Path) -> list[Path]:
    """The files that make a model: a file itself; in a diffusers pipeline folder, model_index.json and the folders
    of the components it lists (an output folder or cache kept inside it must not change what the model is);
    otherwise every file below the folder but hidden caches."""
    if path.is_file():
        return [path]
    index = path / "model_index.json"
    if index.is_file():
        components = [key for key, value in json.loads(index.read_text()).items() if isinstance(value, list)]
        return [index] + sorted(f for c in components if (path / c).is_dir() for f in (path / c).rglob("*")
                                if f.is_file())
    return sorted(f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in
                                                                         f.relative_to(path).parts))


def writable_folder(value, flag: str) -> Path:
    """The folder ``flag`` names, created if missing and proven writable with a probe file (one per process: the
    processes of a launch check at once). A file in the way or no permission is one line naming the flag."""
    import os

    folder = Path(value).expanduser()
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    if nearest == folder and not folder.is_dir():
        raise ValueError(f"{flag} {str(folder)!r} is a file, not a folder; give a folder (created if missing)")
    if not nearest.is_dir():
        raise ValueError(f"{flag} {str(folder)!r} is under {str(nearest)!r}, which is a file, so it cannot be "
                         "written; give a folder (created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".minipref_write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{flag} {str(folder)!r} cannot be written: {error.strerror or error}") from None
    return folder
