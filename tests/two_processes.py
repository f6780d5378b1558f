"""Run a command as 2 real processes on the CPU: `accelerate launch --multi_gpu --num_processes 2` (torchrun), gloo.

accelerate 1.x's `--cpu` launcher starts a single process, so the tests ask for `--multi_gpu` and hide CUDA; the
entry points then ask accelerate for the CPU (full/processes.py, full/run/accelerator.py). One intra-op thread per
process: the tests compare their tensors with those of a one-process run in the pytest process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch ... <command>` (a script path, or `-m module`) with 2 CPU processes; fails the test with
    the tail of both streams when the launch does not exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), *command]
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------------------------------------------------
# One launch for the cache (tests/test_cache.py) and the evaluation (tests/test_evaluate.py): both tests compare
# its outputs with a one-process run of the same argv. Mark them @pytest.mark.xdist_group("two_processes").
# ---------------------------------------------------------------------------------------------------------------


def cache_argv(model, dataset, out, method, *extra) -> list[str]:
    """`full.cache` at 32 px in float32, batches and shards of 4 (tests/test_cache.py's builds)."""
    return ["--pretrained_model_name_or_path", model, "--dataset_name", dataset, "--method", method, "--resolution",
            "32", "--output_dir", str(out), "--cache_dtype", "float32", "--batch_size", "4", "--shard_size", "4",
            *extra]


def evaluate_argv(model, clip, out) -> list[str]:
    """`full.evaluate` of the base model: 2 prompts x 2 seeds, 2 steps, one image per batch, the CLIP score."""
    return ["--out", str(out), "--base-model", model, "--prompts", "paper000", "--max-prompts", "2", "--seeds", "2",
            "--steps", "2", "--batch-size", "1", "--scorers", "clip", "--clip-model", clip, "--bootstrap", "200"]


@pytest.fixture(scope="session")  # registered in conftest.py, so every module shares one launch per worker
def two_process_jobs(tiny_sd15, tiny_clip, pickapic_parquet, tmp_path_factory):
    """(directory, CompletedProcess): `<dir>/cache` a Diff-contrast pair cache with CLIP embeddings, `<dir>/eval` an
    evaluation, each made by 2 processes (no --device: each process takes its own)."""
    out = tmp_path_factory.mktemp("two_processes")
    jobs = [["full.cache:main", cache_argv(tiny_sd15, pickapic_parquet, out / "cache",
                                                             "contrast", "--clip_model_name_or_path", tiny_clip)],
            ["full.evaluate:main", evaluate_argv(tiny_sd15, tiny_clip, out / "eval")]]
    return out, launch_two(str(ROOT / "tests" / "launch_driver.py"), json.dumps(jobs), timeout=500)
