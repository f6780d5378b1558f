"""`python -m full.train_spm` / `minipref-train-spm`:
the step-aware preference model trainer of SPO (full/trainers/spm.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch full/train_spm.py`: make the `full` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from full.cli import entry_point  # noqa: E402
from full.trainers.spm import main  # noqa: E402


def console() -> int:
    return entry_point(main, prog="full.train_spm")


if __name__ == "__main__":
    sys.exit(console())
