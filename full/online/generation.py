"""SPIN's generation step: the opponent's samples for every training prompt, cached on disk.

The configurable diffusers pipeline scheduler (`--generation_scheduler`), `--generation_steps`,
`--generation_guidance_scale`, latents only. One safetensors shard per prompt batch, each written atomically: an
interrupted iteration resumes from the shards it already has and regenerates nothing else; a cache made with other
settings (or another opponent) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from full.models.families import get_family
from full.models.pipeline import Components

logger = logging.getLogger(__name__)

CACHE_DIR = "spin_cache"  # <output_dir>/spin_cache/iteration-k/shard-NNNNNN.safetensors
GENERATION_META = "generation.json"


@dataclass(frozen=True)
class GenerationConfig:
    """How the opponent samples (full.spin's --generation_* flags, built with `full.cli.config`)."""
    pretrained_model_name_or_path: str
    revision: str | None = None
    generation_scheduler: str | None = None  # a diffusers scheduler class name; None: the pipeline's own
    generation_steps: int = 50
    generation_guidance_scale: float = 7.5
    generation_batch_size: int = 8  # prompts per cached shard
    resolution: int = 512
    seed: int = 0


def generation_scheduler_class(config: GenerationConfig):
    """`--generation_scheduler` (a diffusers class name), or the class the pipeline ships with."""
    import diffusers
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, revision=config.revision)
    name = config.generation_scheduler or index["scheduler"][1]
    scheduler_class = getattr(diffusers, name, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise ValueError(f"--generation_scheduler {name!r} is not a diffusers scheduler class "
                         "(e.g. DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
    return scheduler_class


def generation_pipeline(parts: Components, unet, config: GenerationConfig):
    """The family's diffusers pipeline around the training denoiser (`generate_iteration` puts the opponent in)."""
    from diffusers import DiffusionPipeline

    family = get_family(parts.family)
    index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, revision=config.revision)
    scheduler = generation_scheduler_class(config).from_pretrained(config.pretrained_model_name_or_path,
                                                                   subfolder="scheduler", revision=config.revision)
    components = family.pipeline_components(parts) | {family.denoiser: unet, "scheduler": scheduler}
    pipe = family.pipeline_class()(**components, **family.pipeline_flags(index))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def folder_digest(folder: Path) -> str:
    """SHA-256 over the files of a snapshot folder (names and bytes, in sorted order): the opponent's identity."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def generation_settings(config: GenerationConfig, rows, iteration: int, output_dir: Path) -> dict:
    """What the cached samples of an iteration depend on; a cache made with other settings is refused."""
    opponent = "base" if iteration == 0 else folder_digest(output_dir / f"iteration-{iteration - 1}")
    ids = rows.row_ids.tolist() if hasattr(rows, "row_ids") else [r["row_id"] for r in rows]  # LazyRows: no reads
    row_ids = ",".join(map(str, ids))
    return {"iteration": iteration, "opponent_sha256": opponent, "model": config.pretrained_model_name_or_path,
            "scheduler": config.generation_scheduler or "pipeline default", "steps": config.generation_steps,
            "guidance_scale": config.generation_guidance_scale, "resolution": config.resolution, "seed": config.seed,
            "shard_size": config.generation_batch_size, "rows_sha256": hashlib.sha256(row_ids.encode()).hexdigest()}


class GeneratedLatents:
    """Row id -> the opponent's latents, read lazily (memory-mapped) from the shards of one iteration."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.where = {}
        for shard in sorted(directory.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for offset, row_id in enumerate(f.get_tensor("row_ids").tolist()):
                    self.where[row_id] = (str(shard), offset)

    def latents(self, row_id: int) -> Tensor:
        from safetensors import safe_open

        path, offset = self.where[row_id]
        with safe_open(path, framework="pt") as f:
            return f.get_slice("latents")[offset:offset + 1][0]  # (4, h, w)


def generate_iteration(pipe, rows, iteration: int, config: GenerationConfig, accelerator, output_dir: Path, dtype,
                       opponent, *, denoiser: str) -> dict:
    """Opponent samples for every row, one shard per `--generation_batch_size` prompts, each process a share.

    A shard is written to a temporary name and renamed, so it either exists complete or not at all; a rerun of the
    iteration skips the shards that exist (and refuses a cache made with other settings or another opponent).
    """
    from safetensors.torch import save_file
    from full.progress import progress_bar

    directory = output_dir / CACHE_DIR / f"iteration-{iteration}"
    settings = generation_settings(config, rows, iteration, output_dir)
    meta = directory / GENERATION_META
    if meta.is_file():
        cached = json.loads(meta.read_text())
        different = sorted(k for k in settings if cached.get(k) != settings[k])
        if different:
            raise ValueError(f"{directory} holds opponent samples made with other settings ({', '.join(different)}"
                             f" differ); delete it to regenerate, or rerun with the settings it was made with")
    accelerator.wait_for_everyone()  # every process has checked before the main one writes
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_json(meta, settings)
    accelerator.wait_for_everyone()

    size = config.generation_batch_size
    shards = [(j, rows[j * size:(j + 1) * size]) for j in range(math.ceil(len(rows) / size))]
    mine = [(j, chunk) for j, chunk in shards if j % accelerator.num_processes == accelerator.process_index]
    todo = [(j, chunk) for j, chunk in mine if not (directory / f"shard-{j:06d}.safetensors").is_file()]
    device = accelerator.device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    bar = progress_bar(todo, desc=f"opponent samples, iteration {iteration}",
                       main_process=accelerator.is_main_process)
    for j, chunk in bar:
        generator = torch.Generator(device).manual_seed((config.seed * 1_000_003 + iteration) * 1_000_033 + j)
        with opponent.playing(iteration) as theta_k, autocast:  # theta_k samples (the LoRA: its adapter)
            setattr(pipe, denoiser, theta_k)  # the family's network: pipe.unet or pipe.transformer
            latents = pipe([r["caption"] for r in chunk], num_inference_steps=config.generation_steps,
                           guidance_scale=config.generation_guidance_scale, height=config.resolution,
                           width=config.resolution, generator=generator, output_type="latent").images  # (b, 4, h, w)
        path, tmp = directory / f"shard-{j:06d}.safetensors", directory / f".shard-{j:06d}.tmp"
        save_file({"latents": latents.float().cpu().contiguous(),
                   "row_ids": torch.tensor([r["row_id"] for r in chunk], dtype=torch.long)},
                  str(tmp), metadata={"iteration": str(iteration)})
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    missing = [j for j, _ in shards if not (directory / f"shard-{j:06d}.safetensors").is_file()]
    if missing:
        raise RuntimeError(f"{directory}: shards {missing[:5]} are missing after generation")
    logger.info("iteration %d: %d opponent samples in %s (this process: %d shards generated, %d reused)",
                iteration, len(rows), directory, len(todo), len(mine) - len(todo))
    return {"directory": directory, "generated_shards": len(todo), "reused_shards": len(mine) - len(todo)}

