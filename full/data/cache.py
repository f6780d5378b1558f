"""Precompute what the frozen parts of the pipeline would recompute every step: VAE latents, prompt
embeddings (and SDXL's pooled embeddings and `add_time_ids`), and Diff-contrast's CLIP embeddings.

Preference training never updates the VAE or the text encoders, so their outputs for a dataset are a pure
function of the data: computing them once turns each step into UNet work only (`full/bench.py` measures
the gain). Build a cache, then train from it:

    python -m full.cache --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name yuvalkirstain/pickapic_v2 --method dpo --resolution 512 --output_dir cache/pickapic-sd15
    accelerate launch -m full.train --cached_dir cache/pickapic-sd15 --method dpo ...

Several processes share the encoding (`accelerate launch -m full.cache ...`, same flags), and a killed build
resumes when the same command is run again: full/data/cache_build.py says how. Layout of a cache directory
(built in `.<name>.building/` and renamed when complete, so a crash never leaves half a cache):

    cache_meta.json             family, model, revision, resolution, kind ("pairs" | "feedback"), shard list, ...
    build.json                  the flags that made it (a resumed build must repeat them)
    shard-00000.safetensors     per item i: latents [i, n, 4, h, w], prompt_embeds [i, n, L, D],
                                pooled [i, n, P] and time_ids [i, n, 6] (SDXL), desirable [i] (feedback),
                                embeddings [i, n, E] (CLIP, optional), row_ids [i];  n = 2 (pairs) or 1
    empty_prompt.safetensors    the embedding of "" (caption dropout still works from a cache)

What a cache fixes: one VAE posterior sample per image, the centre crop, no flips. CSFT's "good image" /
"bad image" prompts are encoded at cache time (`--method csft`), so a CSFT cache only serves CSFT.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Sequence

import torch

from full.paths import model_fingerprint

logger = logging.getLogger(__name__)

META_NAME = "cache_meta.json"
EMPTY_NAME = "empty_prompt.safetensors"
CACHE_VERSION = 2  # 2: the model is recorded by content (model_fingerprint), not by the path that named it


# ---------------------------------------------------------------------------------------------------------------
# Reading a cache
# ---------------------------------------------------------------------------------------------------------------


def read_cache_meta(cache_dir) -> dict:
    path = Path(cache_dir) / META_NAME
    if not path.is_file():
        raise ValueError(f"--cached_dir {cache_dir} has no {META_NAME}: build it with `python -m full.cache`")
    meta = json.loads(path.read_text())
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"cache {cache_dir} has version {meta.get('version')}, this code reads {CACHE_VERSION}: "
                         "rebuild it with `python -m full.cache --overwrite ...`")
    return meta


class CachedDataset(torch.utils.data.Dataset):
    """Items of a cache, read lazily (memory-mapped safetensors slices), with caption dropout re-drawn per epoch.

    Item: `latents` [n, 4, h, w], `prompt_embeds` [n, L, D], optional `pooled` [n, P], `time_ids` [n, 6],
    `embeddings` [n, E], `desirable` (bool, feedback caches), `row_id`.
    """

    def __init__(self, cache_dir, caption_dropout: float = 0.0, seed: int = 0):
        from safetensors.torch import load_file

        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.dir, self.meta = Path(cache_dir), read_cache_meta(cache_dir)
        self.kind, self.family = self.meta["kind"], self.meta["family"]
        self.caption_dropout, self.seed, self.epoch = caption_dropout, seed, 0
        self.index = [(s, j) for s, shard in enumerate(self.meta["shards"]) for j in range(shard["n"])]
        self.empty = load_file(str(self.dir / EMPTY_NAME))  # prompt_embeds [L, D], pooled [P]
        self._handles: dict[int, object] = {}  # opened lazily: safe_open handles are per process/worker

    @property
    def desirable(self) -> list[bool]:
        from safetensors import safe_open

        labels = []
        for shard in self.meta["shards"]:
            with safe_open(str(self.dir / shard["file"]), framework="pt") as f:
                labels += f.get_tensor("desirable").bool().tolist()
        return labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / self.meta["shards"][shard]["file"]), framework="pt")
        return self._handles[shard]

    def __getstate__(self):  # DataLoader workers re-open their own handles
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, index: int) -> dict:
        shard, j = self.index[index]
        f = self._handle(shard)
        item = {k: f.get_slice(k)[j : j + 1][0] for k in f.keys() if k not in ("row_ids", "desirable")}
        item["row_id"] = int(f.get_slice("row_ids")[j : j + 1][0])
        if self.kind == "feedback":
            item["desirable"] = bool(f.get_slice("desirable")[j : j + 1][0])
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index)
        if rng.random() < self.caption_dropout:  # the whole item (both images of a pair) loses its prompt
            n = item["latents"].shape[0]
            item["prompt_embeds"] = self.empty["prompt_embeds"].expand(n, *self.empty["prompt_embeds"].shape)
            if "pooled" in item:
                item["pooled"] = self.empty["pooled"].expand(n, *self.empty["pooled"].shape)
        return item


def collate_cached(items: Sequence[dict]) -> dict:
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0] if k not in ("row_id", "desirable")}
    batch["row_ids"] = [item["row_id"] for item in items]
    if "desirable" in items[0]:
        batch["desirable"] = torch.tensor([item["desirable"] for item in items], dtype=torch.bool)
    return batch



def check_cache_model(meta: dict, cache_dir, model: str, revision: str | None, vae: str | None) -> None:
    """Refuse a cache encoded by another checkpoint: its latents and prompt embeddings are that model's, and a
    LoRA trained on them against this UNet learns the difference between two encoders, silently. Compared by
    content (`full.paths.model_fingerprint`), so a relative path read from another working directory, a model
    retrained in place, or a copy of the same model in another folder are each told apart or recognised."""
    built = f"{meta.get('pretrained')}" + (f" (revision {meta['revision']})" if meta.get("revision") else "")
    wanted = model + (f" (revision {revision})" if revision else "")
    if meta.get("model_fingerprint") != model_fingerprint(model, revision) or meta.get("revision") != revision:
        raise ValueError(f"--cached_dir {cache_dir} was encoded by {built}, not --pretrained_model_name_or_path "
                         f"{wanted}: its latents and prompt embeddings belong to that checkpoint (their contents "
                         "differ). Train with the model it was built from, or rebuild it: python -m full.cache "
                         f"--pretrained_model_name_or_path {model} ...")
    if meta.get("vae_fingerprint") != model_fingerprint(vae):
        raise ValueError(f"--cached_dir {cache_dir} was encoded with VAE {meta.get('vae') or 'of the model'}, not "
                         f"--pretrained_vae_model_name_or_path {vae or '(none: the model VAE)'}; rebuild the cache")
