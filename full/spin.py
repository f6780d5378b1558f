"""`python -m full.spin` / `accelerate launch -m full.spin`:
the SPIN-Diffusion trainer (full/trainers/spin.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch full/spin.py`: make the `full` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from full.cli import entry_point  # noqa: E402
from full.trainers.spin import main  # noqa: E402


def console() -> int:
    return entry_point(main, prog="full.spin")


if __name__ == "__main__":
    sys.exit(console())
