"""Building a latent cache (`python -m full.cache`, or `accelerate launch -m full.cache` on several GPUs): fixed
shards of rows, each encoded by one process, written atomically, so a killed build resumes where it stopped.

Rows `0 .. N-1` (the checked rows of `full.data.rows.load_training_rows`, in their order) are cut into shards of
`--shard_size`: shard `k` holds rows `[k S, (k+1) S)`. The processes list the shards not on disk yet, and process
`p` of `P` encodes every `P`-th of them, starting at the `p`-th (disjoint and balanced, also on a resume with
another `P`), writing each as `shard-<k>.safetensors` in `.<output_dir>.building/` (to a temporary name first,
then renamed: a file with the final name is always complete). When every process has finished, the main process
writes `cache_meta.json` and renames the directory to `--output_dir`.

What makes the result independent of `P`, of the batch that an image fell in and of the shards already built:

* each image's VAE posterior sample comes from its own generator, seeded by `(--seed, row index, image slot)`,
  never from a generator shared by the whole build;
* batches never cross a shard boundary: shard `k` is always encoded in the same batches, whichever process
  encodes it and whenever (so a 2-process build gives the same tensors as a 1-process one, `tests/test_cache.py`);
  Diff-contrast's CLIP embeddings are computed in batches of `--batch_size` over a process's shards, the same
  batches when `--shard_size` is a multiple of `--batch_size` (else equal up to float round-off);
* the build directory keeps `build.json`, the flags that decide what the cache holds: a rerun with the same flags
  skips the shards on disk and encodes the rest, a rerun with other flags or another checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minipref.methods import get_method
from full.paths import model_fingerprint
from full.data.cache import CACHE_VERSION, EMPTY_NAME, META_NAME
from full.data.config import DataConfig
from full.models.config import ModelConfig

logger = logging.getLogger(__name__)

BUILD_NAME = "build.json"
# The flags that decide what a cache holds; a resumed build must repeat them (not --output_dir, --device, --overwrite:
# they say where and how, not what). --batch_size is here because float sums depend on what is batched together.
CONTENT_FLAGS = ("pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path",
                 "dataset_name", "dataset_split_name", "data_format", "caption_column", "image_column",
                 "pair_image_columns", "label_column", "feedback_policy", "keep_ties", "max_train_samples", "method",
                 "resolution", "clip_model_name_or_path", "shard_size", "batch_size", "cache_dtype", "mixed_precision",
                 "seed")


@dataclass(frozen=True)
class CacheConfig:
    """What `full.cache` builds: the trainers' data and model configs, and how the cache is cut and stored."""
    data: DataConfig
    model: ModelConfig
    output_dir: str
    clip_model_name_or_path: str | None = None  # Diff-contrast's f(y, x) embeddings (pairs only)
    shard_size: int = 1024
    batch_size: int = 8
    cache_dtype: str = "float16"
    mixed_precision: str = "no"  # dtype of the frozen encoders while caching
    device: str | None = None
    overwrite: bool = False

    def content(self) -> dict:
        """The CONTENT_FLAGS' values."""
        flat = {**vars(self.data), **vars(self.model), **vars(self)}
        return {name: flat[name] for name in CONTENT_FLAGS}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def build_record(config: CacheConfig, rows) -> dict:
    """What this build makes: its content flags, and the rows it reads (their number and a digest of their ids)."""
    digest = hashlib.sha256(rows.row_ids.tobytes()).hexdigest()[:16]
    return {"version": CACHE_VERSION, "flags": config.content(),
            "n_rows": len(rows), "rows_digest": digest}


def check_resumable(building: Path, record: dict, output_dir) -> bool:
    """True when `building` holds a build of the same record (resume it); raises when it holds another one."""
    path = building / BUILD_NAME
    if not path.is_file():
        return False
    previous = json.loads(path.read_text())
    changed = [f"--{k} {previous['flags'].get(k)!r} -> {v!r}" for k, v in record["flags"].items()
               if previous["flags"].get(k) != v]
    if previous.get("n_rows") != record["n_rows"] or previous.get("rows_digest") != record["rows_digest"]:
        changed.append(f"the rows ({previous.get('n_rows')} -> {record['n_rows']})")
    if changed:
        raise ValueError(f"--output_dir {output_dir} has an unfinished build ({building}) made with other flags: "
                         f"{'; '.join(changed)}. Rerun with the same flags to finish it, or pass --overwrite to "
                         "start over")
    return True


def write_shard(path: Path, tensors: dict[str, Tensor], n_undecodable: int) -> None:
    """Write a shard atomically: a shard under its final name is complete. A shard whose every image failed to
    decode is a file without tensors (it still counts as done), its drop count in the metadata."""
    from safetensors.torch import save_file

    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial),
              metadata={"n_undecodable": str(n_undecodable)})
    os.replace(partial, path)


def image_generators(seed: int, indices: list[int], n: int, device) -> list[torch.Generator]:
    """One generator per image, `n` per item: the VAE sample of image `slot` of row `index` is the same whichever
    process, batch or run draws it."""
    return [torch.Generator(device).manual_seed((seed * 1_000_003 + index) * 2 + slot)
            for index in indices for slot in range(n)]


def encode_batch(parts, batch: dict, indices: list[int], config: CacheConfig, kind: str, embeddings, device) -> dict[str, Tensor]:
    """One collated batch (`full.data.images.collate_skip_none`) -> the shard tensors of its items."""
    from full.models import pipeline as models
    from minipref import csft_prompts

    pixels = batch["pixel_values"]  # (B, n, 3, R, R)
    b, n = pixels.shape[:2]
    generators = image_generators(config.data.seed, indices, n, device)
    latents = models.encode_images(parts, pixels.flatten(0, 1).to(device), generators)  # (B*n, 4, h, w)
    captions = [c for c in batch["captions"] for _ in range(n)]  # item-major, like the latents
    if get_method(config.data.method).label_in_prompt:  # CSFT, a binary method: kind == "feedback", n == 1
        captions = csft_prompts(captions, batch["desirable"])
    prompt = models.encode_prompts(parts, captions, device)
    item = {"latents": latents.reshape(b, n, *latents.shape[1:]),
            "prompt_embeds": prompt.hidden.reshape(b, n, *prompt.hidden.shape[1:])}
    if models.get_family(parts.family).uses_time_ids:  # SDXL: its pooled embedding and micro-conditioning
        item["pooled"] = prompt.pooled.reshape(b, n, -1)
        item["time_ids"] = models.sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"],
                                                config.data.resolution)  # (B, n, 6)
    if embeddings is not None:
        item["embeddings"] = torch.stack([embeddings[r] for r in batch["row_ids"]])
    item = {k: v.to(getattr(torch, config.cache_dtype)).cpu() for k, v in item.items()}
    item["row_ids"] = torch.tensor(batch["row_ids"], dtype=torch.long)
    if kind == "feedback":
        item["desirable"] = batch["desirable"].to(torch.uint8)
    return item


def encode_shard(parts, dataset, shard: range, config: CacheConfig, kind: str, embeddings, device, bar) -> tuple[dict, int]:
    """The tensors of one shard (its batches never cross the shard's edges) and how many items it dropped."""
    from full.data.images import collate_skip_none

    pieces, dropped = [], 0
    for start in range(shard.start, shard.stop, config.batch_size):
        indices = list(range(start, min(start + config.batch_size, shard.stop)))
        items = [dataset[i] for i in indices]  # None: the image did not decode (reported with its row id)
        if embeddings is not None:  # and the items CLIP could not read
            items = [None if it is None or it["row_id"] not in embeddings else it for it in items]
        kept = [i for i, it in zip(indices, items) if it is not None]
        dropped += len(indices) - len(kept)
        batch = collate_skip_none(items)
        if batch is not None:
            pieces.append(encode_batch(parts, batch, kept, config, kind, embeddings, device))
        bar.update(1)
    tensors = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]} if pieces else {}
    return tensors, dropped


def _write_empty_prompt(parts, path: Path, store_dtype, device) -> None:
    """The embedding of "" (caption dropout from a cache), with the model family in its metadata: the main process
    reads the family back when it writes cache_meta.json, even after a resume that loaded no model."""
    from safetensors.torch import save_file

    from full.models import pipeline as models

    empty = models.encode_prompts(parts, [""], device)
    tensors = {"prompt_embeds": empty.hidden[0].to(store_dtype).cpu().contiguous()}
    if empty.pooled is not None:
        tensors["pooled"] = empty.pooled[0].to(store_dtype).cpu().contiguous()
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"family": parts.family})
    os.replace(partial, path)


def finish(building: Path, out: Path, n_shards: int, config: CacheConfig, kind: str) -> dict:
    """Main process, once every process is done: index the shards, write cache_meta.json, rename into place."""
    from safetensors import safe_open

    shards, n_undecodable = [], 0
    for k in range(n_shards):
        path = building / shard_name(k)
        if not path.is_file():
            raise RuntimeError(f"{path} is missing after every process finished; rerun the same command to build it")
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("row_ids").get_shape()[0] if "row_ids" in f.keys() else 0
            n_undecodable += int(f.metadata()["n_undecodable"])
        if n:
            shards.append({"file": path.name, "n": n})
        else:
            path.unlink()  # nothing in it: not part of the cache
    if not shards:
        raise ValueError(f"nothing could be cached from {config.data.dataset_name}: every image failed to decode")
    with safe_open(str(building / EMPTY_NAME), framework="pt") as f:
        family = f.metadata()["family"]
    model, data = config.model, config.data
    meta = {"version": CACHE_VERSION, "family": family, "pretrained": model.pretrained_model_name_or_path,
            "revision": model.revision, "variant": model.variant, "vae": model.pretrained_vae_model_name_or_path,
            "model_fingerprint": model_fingerprint(model.pretrained_model_name_or_path, model.revision),
            "vae_fingerprint": model_fingerprint(model.pretrained_vae_model_name_or_path),
            "resolution": data.resolution, "kind": kind, "csft_prompts": get_method(data.method).label_in_prompt,
            "has_embeddings": config.clip_model_name_or_path is not None, "dataset_name": data.dataset_name,
            "n_items": sum(s["n"] for s in shards), "n_undecodable": n_undecodable, "shards": shards,
            "dtype": config.cache_dtype}
    (building / META_NAME).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(building, out)
    logger.info("cached %d items in %d shards at %s (%d items dropped: undecodable images)", meta["n_items"],
                len(shards), out, n_undecodable)
    return meta


def build_cache(config: CacheConfig) -> Path:
    """Build the cache that ``config`` describes (its flags: full/cache.py)."""
    from full.data.embeddings import compute_pair_embeddings
    from full.data.images import FeedbackDataset, PairDataset
    from full.data.rows import data_kind_for, load_training_rows
    from full.models import pipeline as models
    from full.models.pipeline import WEIGHT_DTYPES
    from full.processes import process_state
    from full.progress import progress_bar

    state, data, model = process_state(), config.data, config.model
    # the family first (its model_index.json only): a model the cache cannot serve fails before any row is read
    models.get_family(models.detect_family(model.pretrained_model_name_or_path, model.revision)).refuse("cache")
    kind = data_kind_for(data.method)
    if kind != "pairs" and config.clip_model_name_or_path:
        raise ValueError("--clip_model_name_or_path: Diff-contrast embeddings are for pairs")
    out = Path(config.output_dir)
    building = out.with_name(f".{out.name}.building")
    if out.exists() and not config.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    # Every process reads the rows, as the trainer does (datasets' file lock lets one convert a parquet source):
    # no collective waits on this pass, which takes long on a large source.
    rows = load_training_rows(data, kind)
    record = build_record(config, rows)
    resumed = not config.overwrite and check_resumable(building, record, out)  # every process checks: all refuse
    state.wait_for_everyone()  # ... before the main process touches the directory
    if state.is_main_process:
        if not resumed:
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            (building / f"{BUILD_NAME}.partial").write_text(json.dumps(record, indent=1))
            os.replace(building / f"{BUILD_NAME}.partial", building / BUILD_NAME)  # a record is whole or absent
    state.wait_for_everyone()

    ranges = [range(s, min(s + config.shard_size, len(rows))) for s in range(0, len(rows), config.shard_size)]
    remaining = [k for k in range(len(ranges)) if not (building / shard_name(k)).is_file()]
    state.wait_for_everyone()  # every process has listed the shards on disk before any process writes one
    todo = remaining[state.process_index::state.num_processes]  # the same lists everywhere: disjoint, balanced
    logger.info("process %d of %d: %d shards to encode (%d of %d left%s)", state.process_index, state.num_processes,
                len(todo), len(remaining), len(ranges), ", resuming" if resumed else "")
    need_empty = state.is_main_process and not (building / EMPTY_NAME).is_file()
    if todo or need_empty:
        device = torch.device(config.device or (state.device if state.num_processes > 1 else
                                              "cuda" if torch.cuda.is_available() else "cpu"))
        parts = models.load_components(model.pretrained_model_name_or_path, revision=model.revision,
                                       variant=model.variant, vae_path=model.pretrained_vae_model_name_or_path)
        models.place_components(parts, device, WEIGHT_DTYPES[config.mixed_precision],
                                fixed_vae=bool(model.pretrained_vae_model_name_or_path))
        with torch.no_grad():
            if need_empty:
                _write_empty_prompt(parts, building / EMPTY_NAME, getattr(torch, config.cache_dtype), device)
            embeddings = None
            if config.clip_model_name_or_path and todo:  # f(y, x) for the rows of this process's shards only
                import numpy as np

                keep = np.zeros(len(rows), dtype=bool)
                for k in todo:
                    keep[ranges[k].start:ranges[k].stop] = True
                embeddings = compute_pair_embeddings(rows.subset(keep), config.clip_model_name_or_path, device,
                                                     batch_size=config.batch_size, main_process=state.is_main_process)
            dataset = (PairDataset if kind == "pairs" else FeedbackDataset)(rows, data.resolution, seed=data.seed)
            n_batches = sum(-(-len(ranges[k]) // config.batch_size) for k in todo)
            with progress_bar(total=n_batches, desc="caching latents and prompts", unit="batch",
                              main_process=state.is_main_process) as bar:
                for k in todo:
                    tensors, dropped = encode_shard(parts, dataset, ranges[k], config, kind, embeddings, device, bar)
                    write_shard(building / shard_name(k), tensors, dropped)
    state.wait_for_everyone()
    if state.is_main_process:
        finish(building, out, len(ranges), config, kind)
    state.wait_for_everyone()  # every process returns once the cache is in place
    return out
