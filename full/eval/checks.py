"""What `python -m full.evaluate` checks before anything loads, besides its flags (full/evaluate.py checks those at
parse time): the files and models the flags name (a local path that is not there is one line, never a Hub lookup),
then `--focus` against the models the report will hold."""

from __future__ import annotations

from pathlib import Path

from full.eval.config import EvalConfig
from full.eval.generate import lora_spec, read_manifest
from full.paths import missing_local_path, writable_folder

# The scorers' model flags: a local-looking path that is not there is named at once (full/paths.py), instead of a
# minute of Hub retries and a traceback.
SCORER_MODEL_FLAGS = {"pickscore_model": "pickscore", "pickscore_processor": "pickscore", "clip_model": "clip",
                      "aesthetic_clip_model": "aesthetic", "imagereward_model": "imagereward"}


def missing_head_file(name: str) -> bool:
    """--aesthetic_head: a file here, or `owner/repo/file` on the Hub; anything else that is not here is missing."""
    if Path(name).expanduser().exists():
        return False
    parts = name.split("/")
    hub_file = len(parts) >= 3 and not name.startswith((".", "/", "~")) and "\\" not in name \
        and not Path(parts[0]).is_dir()
    return not hub_file


def check_paths(config: EvalConfig) -> None:
    """The flags that name files or models: a local path that is not there is one line now, never a Hub lookup.
    Last, --out is created (and proven writable): a run that stops on a bad flag leaves no folder behind."""
    if config.base_model and missing_local_path(config.base_model):
        raise ValueError(f"--base_model {config.base_model!r} does not exist (a local path; give a diffusers pipeline "
                         "folder or a Hub id)")
    for flag, scorer in SCORER_MODEL_FLAGS.items():
        value = getattr(config, flag)
        if value and missing_local_path(value):
            raise ValueError(f"scorer {scorer} cannot be loaded: --{flag} {value!r} does not exist (a local path, "
                             "not looked up on the Hub); nothing was generated")
    if config.aesthetic_head and missing_head_file(config.aesthetic_head):
        raise ValueError(f"--aesthetic_head {config.aesthetic_head!r} does not exist (a local .pth/.safetensors file, "
                         "or owner/repo/file on the Hub)")
    if config.fid_reference and not Path(config.fid_reference).expanduser().is_dir():
        raise ValueError(f"--fid_reference {config.fid_reference!r} is not a folder (of reference images)")
    if config.fid_inception_weights and not Path(config.fid_inception_weights).expanduser().is_file():
        raise ValueError(f"--fid_inception_weights {config.fid_inception_weights!r} is not a file")
    writable_folder(config.out, "--out")


def check_focus(config: EvalConfig, stages: list[str]) -> None:
    """--focus names a model of the report: one this run generates, or one already in --out's manifest."""
    if config.focus is None or "report" not in stages:
        return
    names = {r["model"] for r in read_manifest(Path(config.out))}
    if "generate" in stages:
        names |= {lora_spec(spec)[0] for spec in config.lora} | (set() if config.no_base else {config.base_name})
    if names and config.focus not in names:
        raise ValueError(f"--focus {config.focus!r} is not one of the evaluated models: {', '.join(sorted(names))}")
