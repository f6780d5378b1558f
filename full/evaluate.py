"""`python -m full.evaluate` / `minipref-evaluate`: generate with fixed seeds, score, compare (full/eval/evaluate.py)."""

import sys

from full.eval.evaluate import main


def console() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(console())
