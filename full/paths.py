"""Local path or Hub id? A name that reads as a local path but does not exist is reported as missing, never sent to
the Hub (where it would become a long lookup traceback, or a download of something else)."""

from __future__ import annotations

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
