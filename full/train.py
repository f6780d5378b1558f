"""`python -m full.train` / `accelerate launch -m full.train`:
the offline trainer (sft, csft, bce, dpo, kto, contrast, dspo) (full/trainers/offline.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch full/train.py`: make the `full` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from full.cli import entry_point  # noqa: E402
from full.trainers.offline import main  # noqa: E402


def console() -> int:
    return entry_point(main, prog="full.train")


if __name__ == "__main__":
    sys.exit(console())
