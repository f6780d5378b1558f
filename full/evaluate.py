"""`python -m full.evaluate` / `minipref-evaluate`: generate with fixed seeds, score, compare (full/eval/evaluate.py)."""

import sys

from full.eval.evaluate import main


def console() -> int:
    """An input error is one line on stderr and exit status 2, as the other entry points (full/cli.py)."""
    try:
        main()
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # argparse's own exit (status 2, or 0 for --help)
            raise
        print(stop.code, file=sys.stderr)  # main's one-line input error, which Python would exit with status 1
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(console())
