"""An `--output_dir` belongs to one run.

Before any model loads, a trainer claims its output folder (`claim_output_dir`):
- the folder must be a writable directory (a file there, or no permission, is one line now, not a failure at the
  first checkpoint after minutes of training);
- the run's identity (`run_identity`: method, model family, base model, LoRA rank, data, and the layout that fixes
  the global batch: processes x micro-batch x accumulation) is written to `minipref_run.json`, and a copy goes
  into every checkpoint;
- a folder that already holds another run's work (checkpoints, trained weights, a run record) is refused unless
  this run resumes it (`--resume_from_checkpoint`) with the same identity, or `--overwrite_output_dir` clears it:
  a second run no longer mixes its weights and card with the first run's checkpoints, and
  `--resume_from_checkpoint latest` can no longer pick up a checkpoint of another method, family or rank;
- a checkpoint to resume from is checked for what `save_state` writes, so an empty or truncated folder is one line,
  not an IndexError from deep inside accelerate.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from full.paths import writable_folder
from full.run import checkpoints
from full.run.config import RunConfig

logger = logging.getLogger(__name__)

RECORD_NAME = checkpoints.RECORD_NAME
# What a run leaves that another run must not silently mix with (besides checkpoint-N/ folders).
RUN_FILES = (RECORD_NAME, "args.json", "README.md", "pytorch_lora_weights.safetensors", "spm_config.json",
             "spm_time_modulation.safetensors", "unet", "model_index.json")
DATA_FLAGS = ("dataset_name", "dataset_split_name", "cached_dir", "prompts_file", "max_train_samples")
LAYOUT_FIELDS = ("num_processes", "train_batch_size", "gradient_accumulation_steps")


def resolved(name):
    """A local path as an absolute path (the same data from another working directory); a Hub id as it is."""
    if isinstance(name, str) and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def run_identity(config: RunConfig, family: str | None, num_processes: int) -> dict:
    """What must be the same for a checkpoint to continue this run."""
    return {
        "method": config.method,
        "family": family,
        "base_model": resolved(config.model.pretrained_model_name_or_path),
        "train_mode": config.model.train_mode,
        "rank": config.flag("rank"),
        "data": {flag: resolved(config.flag(flag)) for flag in DATA_FLAGS if config.flag(flag) is not None},
        "num_processes": num_processes,
        "train_batch_size": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        # what a checkpoint holds besides the weights: accelerate loads its extra objects by position only
        "streaming": bool(config.flag("streaming")),
        "use_ema": bool(config.flag("use_ema")),
    }


def differences(recorded: dict, identity: dict) -> list[str]:
    """The entries that differ; a switch a record predates (``streaming``, ``use_ema``) counts as off."""
    def was(key, value):
        return recorded.get(key, False if isinstance(value, bool) else None)

    return [f"{key} {was(key, value)!r} (now {value!r})" for key, value in identity.items() if was(key, value) != value]


def read_record(folder: Path) -> dict | None:
    path = folder / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a run record ({error}): it was not written by minipref, or was damaged")


def previous_work(output_dir: Path) -> list[str]:
    """What an earlier run trained here: its checkpoints and its final outputs. A run record alone does not count: a
    run that stopped before its first checkpoint (a bad flag, bad data) left nothing to mix with."""
    found = [p.name for p in checkpoints.list_checkpoints(output_dir)]
    return found + [name for name in RUN_FILES if name != RECORD_NAME and (output_dir / name).exists()]


def check_checkpoint(checkpoint: Path, identity: dict) -> None:
    """`checkpoint` holds a complete `save_state` of a run with this identity."""
    needed = [checkpoints.PROGRESS_NAME] + [f"random_states_{i}.pkl" for i in range(identity["num_processes"])]
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    recorded = read_record(checkpoint)
    if recorded is None:
        missing.insert(0, RECORD_NAME)
    if missing:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: not a complete minipref checkpoint (missing "
                         f"{', '.join(missing)}); give another checkpoint, or start over without the flag")
    layout = [d for d in differences(recorded, identity) if d.split()[0] in LAYOUT_FIELDS]
    other = [d for d in differences(recorded, identity) if d.split()[0] not in LAYOUT_FIELDS]
    if other:
        raise ValueError(f"--resume_from_checkpoint {checkpoint} belongs to another run: {'; '.join(other)}. Resume "
                         "it with its own flags, or train into another --output_dir")
    if layout:
        raise ValueError(f"--resume_from_checkpoint {checkpoint} was written with another global batch layout: "
                         f"{'; '.join(layout)}. Resume with the same processes x --train_batch_size x "
                         "--gradient_accumulation_steps (the data position and the random streams depend on it)")


def claim_output_dir(config: RunConfig, family: str | None, accelerator) -> Path | None:
    """Check `--output_dir` and `--resume_from_checkpoint` for this run and record its identity; returns the
    checkpoint to resume from (None: start at step 0). Every process checks; the main process writes."""
    output_dir = Path(config.output_dir)
    writable_folder(output_dir, "--output_dir")
    identity = run_identity(config, family, accelerator.num_processes)
    checkpoint = checkpoints.resolve_checkpoint(config.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        check_checkpoint(checkpoint, identity)
    elif previous_work(output_dir) and not config.overwrite_output_dir:
        recorded = read_record(output_dir)
        whose = f"a run of {recorded.get('method')} on {recorded.get('family')}" if recorded else "another run"
        resume = " (--resume_from_checkpoint latest continues it)" if recorded == identity and \
            checkpoints.list_checkpoints(output_dir) else ""
        raise ValueError(f"--output_dir {output_dir} holds {whose}: {', '.join(previous_work(output_dir)[:6])}"
                         f"{resume}. Pass --overwrite_output_dir to delete them and start over, or choose another "
                         "--output_dir")
    accelerator.wait_for_everyone()  # every process has checked the folder as it was
    if accelerator.is_main_process:
        if checkpoint is None and config.overwrite_output_dir:
            clear_previous_work(output_dir)
        (output_dir / RECORD_NAME).write_text(json.dumps(identity, indent=1) + "\n")
    accelerator.wait_for_everyone()
    logger.info("%d process(es) x micro-batch %d x accumulation %d = global batch %d", accelerator.num_processes,
                config.train_batch_size, config.gradient_accumulation_steps,
                accelerator.num_processes * config.train_batch_size * config.gradient_accumulation_steps)
    return checkpoint


def clear_previous_work(output_dir: Path) -> None:
    removed = previous_work(output_dir)
    for checkpoint in checkpoints.list_checkpoints(output_dir):
        shutil.rmtree(checkpoint)
    for name in RUN_FILES:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if removed:
        logger.warning("--overwrite_output_dir: removed %s from %s", ", ".join(removed), output_dir)
