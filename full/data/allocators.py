"""The memory allocators the readers run with: the one place they are chosen (docs/scaling.md, "Allocators", has
the measurements).

Images read from Arrow and decoded go through two allocators: Arrow's memory pool (the Arrow buffers of each batch
read from parquet) and glibc's malloc (Python bytes, PIL's decode buffers, tensors). Their settings are environment
variables read when a process starts, so the launcher sets them: `full/launch/train.sh` evaluates what this file
prints when run as a script (``python full/data/allocators.py``: ``export NAME="${NAME:-value}"`` lines, so a value
already in the environment wins), and `python -m full.bench --data --allocator NAME ...` measures each setting.

Chosen: Arrow's buffers from malloc (``ARROW_DEFAULT_MEMORY_POOL=system``): mimalloc, Arrow's default, kept 80-130
MB more of a stream's freed buffers. Not chosen: ``MALLOC_MMAP_THRESHOLD_=65536`` (every block of 64 KB or more
mapped fresh and unmapped when freed): it saved 30-85 MB of the loader's memory and 11-20% of the stream's, and
halved the rows/s of both, at 256 and 512 px; a 4 MB threshold saved less and cost 6-31% of the rows/s.
"""

ARROW_POOL = {"ARROW_DEFAULT_MEMORY_POOL": "system"}  # Arrow's buffers from malloc, not mimalloc


def mmap_threshold(size: int) -> dict:
    """glibc: blocks of ``size`` bytes or more mapped fresh and unmapped when freed (no dynamic threshold)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(size)}


ALLOCATOR_SETTINGS = {
    "chosen": ARROW_POOL,  # what the launcher sets
    "none": {},
    "pool": ARROW_POOL,
    "mmap": mmap_threshold(65536),
    "both": {**ARROW_POOL, **mmap_threshold(65536)},  # what the launcher set before the measurement
    "pool+mmap4m": {**ARROW_POOL, **mmap_threshold(4 << 20)},
}
CHOSEN = ALLOCATOR_SETTINGS["chosen"]
NAMES = sorted({name for setting in ALLOCATOR_SETTINGS.values() for name in setting})  # every variable set above


if __name__ == "__main__":  # imports nothing: the launcher runs it before anything is on the path
    for name, value in CHOSEN.items():
        print(f'export {name}="${{{name}:-{value}}}"')
