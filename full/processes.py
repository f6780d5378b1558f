"""The processes of a job that is not training: `accelerate launch -m full.cache` / `-m full.evaluate`.

These jobs split work by process index and meet at barriers; they need no `Accelerator` (no model is prepared, no
gradient is reduced), only accelerate's `PartialState`: how many processes, which one this is, its device.
"""

from __future__ import annotations

import os


def process_state():
    """`accelerate.PartialState` of this launch: one process, or the P processes of `accelerate launch`.

    On a machine without CUDA, `PartialState()` of a multi-process launch reports each process as alone (its
    distributed type is "NO" unless asked for the CPU), so P processes would each do all the work. Asking for the
    CPU when several were launched gives P ranks over gloo, as `full/run/accelerator.py` does for training.
    """
    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=launched > 1 and not torch.cuda.is_available())
    if launched != state.num_processes:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up {state.num_processes}")
    return state
