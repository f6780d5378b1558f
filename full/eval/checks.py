"""What `python -m full.evaluate` checks before anything loads, besides its flags (full/evaluate.py checks those at
parse time): the files and models the flags name (a local path that is not there is one line, never a Hub lookup),
then `--focus` against the models the report will hold."""

from __future__ import annotations

import argparse
from pathlib import Path

from full.eval.generate import lora_spec, read_manifest
from full.paths import missing_local_path

# The scorers' model flags: a local-looking path that is not there is named at once (full/paths.py), instead of a
# minute of Hub retries and a traceback.
SCORER_MODEL_FLAGS = {"pickscore_model": "pickscore", "pickscore_processor": "pickscore", "clip_model": "clip",
                      "aesthetic_clip_model": "aesthetic", "imagereward_model": "imagereward"}


def check_out(out: str) -> None:
    """--out is a folder, or will be one: not a file, nor under one."""
    path = Path(out).expanduser()
    nearest = next(p for p in (path, *path.parents) if p.exists())
    if not nearest.is_dir():
        where = "is a file" if nearest == path else f"is under {str(nearest)!r}, which is a file"
        raise ValueError(f"--out {out!r} {where}; give a folder (created if missing)")


def missing_head_file(name: str) -> bool:
    """--aesthetic_head: a file here, or `owner/repo/file` on the Hub; anything else that is not here is missing."""
    if Path(name).expanduser().exists():
        return False
    parts = name.split("/")
    hub_file = len(parts) >= 3 and not name.startswith((".", "/", "~")) and "\\" not in name \
        and not Path(parts[0]).is_dir()
    return not hub_file


def check_paths(args: argparse.Namespace) -> None:
    """The flags that name files or models: a local path that is not there is one line now, never a Hub lookup."""
    check_out(args.out)
    if args.base_model and missing_local_path(args.base_model):
        raise ValueError(f"--base_model {args.base_model!r} does not exist (a local path; give a diffusers pipeline "
                         "folder or a Hub id)")
    for flag, scorer in SCORER_MODEL_FLAGS.items():
        value = getattr(args, flag)
        if value and missing_local_path(value):
            raise ValueError(f"scorer {scorer} cannot be loaded: --{flag} {value!r} does not exist (a local path, "
                             "not looked up on the Hub); nothing was generated")
    if args.aesthetic_head and missing_head_file(args.aesthetic_head):
        raise ValueError(f"--aesthetic_head {args.aesthetic_head!r} does not exist (a local .pth/.safetensors file, "
                         "or owner/repo/file on the Hub)")
    if args.fid_reference and not Path(args.fid_reference).expanduser().is_dir():
        raise ValueError(f"--fid_reference {args.fid_reference!r} is not a folder (of reference images)")
    if args.fid_inception_weights and not Path(args.fid_inception_weights).expanduser().is_file():
        raise ValueError(f"--fid_inception_weights {args.fid_inception_weights!r} is not a file")


def check_focus(args: argparse.Namespace, stages: list[str]) -> None:
    """--focus names a model of the report: one this run generates, or one already in --out's manifest."""
    if args.focus is None or "report" not in stages:
        return
    names = {r["model"] for r in read_manifest(Path(args.out))}
    if "generate" in stages:
        names |= {lora_spec(spec)[0] for spec in args.lora} | (set() if args.no_base else {args.base_name})
    if names and args.focus not in names:
        raise ValueError(f"--focus {args.focus!r} is not one of the evaluated models: {', '.join(sorted(names))}")
