"""The multi-GPU engine paths that run on a CPU: what a checkpoint asks of DeepSpeed ZeRO-2 (only the LoRA and its
optimizer state), and nothing extra under DDP or one process. The GPU run is docs/scaling.md's command."""

from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from full.run import checkpoints


class _RecordingAccelerator:
    is_main_process = True

    def __init__(self, distributed_type):
        self.distributed_type, self.saved = distributed_type, []

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir, **kwargs):
        self.saved.append(kwargs)
        from pathlib import Path

        Path(output_dir).mkdir(parents=True)


@pytest.mark.parametrize("engine,save,load", [
    (DistributedType.DEEPSPEED, {"exclude_frozen_parameters": True}, {"load_module_strict": False}),
    (DistributedType.MULTI_GPU, {}, {}),
    (DistributedType.MULTI_CPU, {}, {}),
    (DistributedType.NO, {}, {}),
])
def test_checkpoints_ask_deepspeed_for_the_trained_parameters_only(engine, save, load, tmp_path):
    accelerator = _RecordingAccelerator(engine)
    assert checkpoints.engine_state_kwargs(accelerator, saving=False) == load
    final = checkpoints.save_checkpoint(accelerator, tmp_path, 3, None)
    assert accelerator.saved == [save] and final == tmp_path / "checkpoint-3" and final.is_dir()
