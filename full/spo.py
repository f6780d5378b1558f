"""`python -m full.spo` / `accelerate launch -m full.spo`:
the SPO trainer; exits 2 when no pair passed the threshold (full/trainers/spo.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch full/spo.py`: make the `full` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from full.cli import entry_point  # noqa: E402
from full.trainers.spo import main_requiring_pairs  # noqa: E402


def console() -> int:
    return entry_point(main_requiring_pairs, prog="full.spo")


if __name__ == "__main__":
    sys.exit(console())
