"""Run `full.train` once per argv given as JSON on the command line; under `accelerate launch` every process runs it.

    accelerate launch ... tests/distributed_driver.py '[["--method", "dpo", ...], ...]' [sgd]

The main process writes each run's per-step metrics to ``<output_dir>/history.json``; the LoRA is the run's own
``pytorch_lora_weights.safetensors``. One launch serves several methods: the processes start once. With ``sgd`` the
runs train with plain SGD instead of AdamW (`tests/sgd_runs.py` says why), and what each run changed in the LoRA is
written to ``<output_dir>/sgd_update.pt``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed  # noqa: E402
from accelerate import PartialState  # noqa: E402

from full.trainers import offline  # noqa: E402
from tests.sgd_runs import use_sgd, write_update  # noqa: E402

# Keep the process group between runs: `Accelerator.end_training` destroys it, and torchrun's rendezvous does not
# let a process initialise a second one. accelerate's state (same settings for every run) stays as well.
_destroy = torch.distributed.destroy_process_group
torch.distributed.destroy_process_group = lambda group=None: None

sgd = "sgd" in sys.argv[2:]
if sgd:
    use_sgd()
if "per_process_batch" in sys.argv[2:]:  # a deliberately wrong variant: KTO's and contrast's batch is per process
    offline.GlobalBatch = lambda accelerator: None
for argv in json.loads(sys.argv[1]):
    summary = offline.train(offline.parse_args(argv))
    if PartialState().is_main_process:
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        (output_dir / "history.json").write_text(json.dumps(summary["history"]))
        if sgd:
            write_update(output_dir)
_destroy()
