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


def single_process_of_a_multi_process_launch() -> str | None:
    """A warning when `accelerate launch --num_processes N` (N > 1) started this as its only process: without GPUs
    and without `--multi_gpu`, accelerate 1.x takes its simple launcher, which sets MASTER_ADDR for N processes
    but starts one (no WORLD_SIZE). The run is then one process with one process's batch, whatever N said."""
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        return ("accelerate launch asked for several processes but started only this one (its simple launcher, on a "
                "machine without GPUs): training runs as 1 process. For several CPU processes use "
                "`accelerate launch --multi_gpu --num_processes N` (torchrun; minipref then uses gloo on the CPU)")
    return None


def cpu_ranks_needed(launched: int) -> bool:
    """Several processes on a machine without CUDA: accelerate must be asked for the CPU, else it reports each one
    as alone (distributed type "NO") and P processes would each do all the work (or train unaware of each other,
    writing to one directory). Asked, it gives P ranks over gloo."""
    import torch

    return launched > 1 and not torch.cuda.is_available()


def check_sharding_engine_has_gpus(launched: int) -> None:
    """FSDP or DeepSpeed asked for (an accelerate config) on a machine without CUDA: accelerate would quietly run the
    processes as plain DDP over gloo, so a run meant to shard would not. Refused in one line instead."""
    import torch

    engines = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(variable, "").lower() == "true"]
    if engines and launched > 1 and not torch.cuda.is_available():
        raise ValueError(f"the accelerate config asks for {engines[0]}, which needs GPUs (no CUDA here): accelerate "
                         "would run plain DDP instead; launch with a DDP config (full/launch/accelerate/8gpu_ddp.yaml) "
                         "or on GPUs")


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
