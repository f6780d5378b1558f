"""Session-scoped fixtures: the tiny offline models and datasets of `tests/tiny_models.py`, built once per worker.

Fixtures: `tiny_sd15`, `tiny_sdxl`, `tiny_sd3`, `tiny_flux`, `tiny_clip` (directories, str), `pickapic_parquet` (16 pairs, 32 px,
2 ties at the end), `feedback_parquet` (16 rows, half desirable), `quick_lab` (the quick CPU image lab: out dir,
results), `two_process_jobs` (a cache and an evaluation made by 2 launched processes, tests/two_processes.py). Each is
built lazily on first use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The repo root on sys.path, so `from tests.tiny_models import ...` and `import full` work under plain `pytest` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Never reach the network from a test: the tiny models live on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` converts local parquet into its Arrow cache: a per-run temporary one, never the user's ~/.cache.
if "HF_DATASETS_CACHE" not in os.environ:
    import tempfile

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="minipref-datasets-")

from tests import tiny_models  # noqa: E402
from tests.two_processes import two_process_jobs  # noqa: E402,F401  (registers the fixture)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per worker: no oversubscription on small CI boxes
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> str:
    return tiny_models.build_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    return tiny_models.build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    return tiny_models.build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    return tiny_models.build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    return tiny_models.build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def pickapic_parquet(tmp_path_factory) -> str:
    return tiny_models.make_pickapic_parquet(tmp_path_factory.mktemp("pickapic") / "train.parquet", 16, 32, n_ties=2)


@pytest.fixture(scope="session")
def feedback_parquet(tmp_path_factory) -> str:
    return tiny_models.make_feedback_parquet(tmp_path_factory.mktemp("feedback") / "train.parquet", 16, 32)


@pytest.fixture(scope="session")
def quick_lab(tmp_path_factory):
    """The quick CPU image lab (full/lab, `python -m full.lab --quick`), run once per worker: (out_dir, results).

    out_dir/model is its pretrained diffusers pipeline (StableDiffusionPipeline.save_pretrained), out_dir/data its
    preference parquet files. Mark every test that uses it `@pytest.mark.xdist_group("quick_lab")`, so the suite
    builds it on one worker only (minutes on 2 cores).
    """
    from full.lab.presets import QUICK
    from full.lab.run import run_lab

    out = tmp_path_factory.mktemp("lab")
    return out, run_lab(out, QUICK, launcher="inprocess", quiet=True)


def train_argv(model: str, dataset: str | None, output_dir, method: str, *extra: str, cached_dir: str | None = None,
               steps: int = 2) -> list[str]:
    """argv for `full.train.main`: a few real steps at 32 px, batch 2, no warmup, a visible learning rate."""
    argv = ["--pretrained_model_name_or_path", model, "--method", method, "--output_dir", str(output_dir),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--checkpointing_steps", "100",
            "--report_to", "none", "--seed", "0"]
    argv += ["--cached_dir", cached_dir] if cached_dir else ["--dataset_name", dataset]
    return argv + list(extra)


@pytest.fixture
def run_train():
    """Call the real entry point in-process: `run_train(model, dataset, out, method, *flags) -> summary dict`."""
    from full.trainers import offline as train

    def run(*args, **kwargs):
        return train.main(train_argv(*args, **kwargs))

    return run
