"""The processes of a launch: how many `accelerate launch` / torchrun started, and accelerate's view of them.

Training builds an `Accelerator` (full/run/accelerator.py); the jobs that are not training (`-m full.cache`,
`-m full.evaluate`) split work by process index and meet at barriers, so they need only accelerate's `PartialState`:
how many processes, which one this is, its device. Both ask accelerate for the CPU in the same case, here.
"""

from __future__ import annotations

import os


def launched_processes() -> int:
    """The processes the launcher started (`WORLD_SIZE`; 1 for a plain `python -m ...`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_ranks_needed(launched: int) -> bool:
    """Several processes on a machine without CUDA: accelerate must be asked for the CPU, else it reports each one
    as alone (distributed type "NO") and P processes would each do all the work (or train unaware of each other,
    writing to one directory). Asked, it gives P ranks over gloo."""
    import torch

    return launched > 1 and not torch.cuda.is_available()


def check_all_ranks(launched: int, num_processes: int) -> None:
    if launched != num_processes:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up {num_processes}")


def process_state():
    """`accelerate.PartialState` of this launch: one process, or the P processes of `accelerate launch`."""
    from accelerate import PartialState

    launched = launched_processes()
    state = PartialState(cpu=cpu_ranks_needed(launched))
    check_all_ranks(launched, state.num_processes)
    return state
