"""`python -m full.cache` / `minipref-cache` / `accelerate launch -m full.cache`: precompute latents and prompt
embeddings, shared over the launched processes and resumable (full/data/cache_build.py)."""

import logging
import sys

from full.cli import entry_point
from full.data.cache_build import build_cache


def console() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return entry_point(build_cache, prog="full.cache")


if __name__ == "__main__":
    sys.exit(console())
