"""Diff-contrast's `f(y, x)`: CLIP (image, prompt) embeddings per pair, computed once per (dataset, CLIP model) and
kept in a file, or read from two columns of the dataset."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class ClipPairEncoder:
    """`f(y, x)` of Diff-contrast (paper 002, Sec. 2.1 "Multi-Modal Embedding Distance Weights"; Sec. 3: "We
    leverage the CLIP encoder to compute multi-modal embeddings").

    The paper does not say how image and prompt are combined, so we concatenate the L2-normalised CLIP image
    and text embeddings: `f = [img / |img|, txt / |txt|]`. Then `cos(f, f') = (cos_img + cos_txt) / 2`, image
    and prompt similarity weighted equally, which is what "consider the context of both the prompt and image"
    asks for. Output (N, 2 * projection_dim).
    """

    def __init__(self, name_or_path: str, device="cpu", dtype=torch.float32):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name_or_path).to(device, dtype=dtype).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path)
        except Exception as error:
            raise ValueError(f"cannot load a CLIP model + processor from --clip_model_name_or_path="
                             f"{name_or_path!r}: {type(error).__name__}: {error}") from error
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images: list, captions: list[str]) -> Tensor:
        inputs = self.processor(text=list(captions), images=images, return_tensors="pt", padding="max_length",
                                truncation=True, max_length=self.processor.tokenizer.model_max_length)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        out = self.model(**inputs, return_dict=True)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # (N, P)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # (N, P)
        return torch.cat([image, text], dim=-1).cpu()  # (N, 2P)


def _decode_rgb(data: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def compute_pair_embeddings(rows: Sequence[dict], clip_model: str, device="cpu", batch_size: int = 64, *,
                            main_process: bool = True) -> dict[int, Tensor]:
    """`{row_id: [f(winner, caption), f(loser, caption)]}` (2, E) for pair rows of `full.data.load_pair_rows`.
    A row whose image does not decode is reported and left out (its training item is dropped anyway).
    `main_process=False` hides the bar (under `accelerate launch` every process encodes its own share)."""
    from full.progress import progress_bar

    encoder = ClipPairEncoder(clip_model, device=device)
    out: dict[int, Tensor] = {}
    for start in progress_bar(range(0, len(rows), batch_size), desc="CLIP embeddings", unit="batch",
                              main_process=main_process):
        images, captions, ids = [], [], []
        for row in rows[start : start + batch_size]:
            try:
                pair = [_decode_rgb(row["winner"]), _decode_rgb(row["loser"])]
            except Exception as error:
                logger.warning("row %s: cannot decode image for CLIP (%s); skipped", row["row_id"], error)
                continue
            images += pair
            captions += [row["caption"]] * 2
            ids.append(row["row_id"])
        if ids:
            emb = encoder(images, captions).reshape(len(ids), 2, -1)  # (2N, E) -> (N, 2, E): winner, loser
            out.update(zip(ids, emb))
    return out


def pair_embeddings(rows, clip_model: str, cache_file, device="cpu", *, source: str = "") -> dict[int, Tensor]:
    """`compute_pair_embeddings`, stored in `cache_file` and reused while the CLIP model and rows match."""
    from safetensors.torch import load_file, save_file

    cache_file = Path(cache_file)
    key = {"clip_model": str(clip_model), "source": source, "n_rows": str(len(rows)),
           "last_row_id": str(rows[-1]["row_id"])}
    if cache_file.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_file), framework="pt") as f:
            if f.metadata() == key:
                stored = load_file(str(cache_file))
                logger.info("reusing CLIP embeddings from %s", cache_file)
                return dict(zip(stored["row_ids"].tolist(), stored["embeddings"]))
    embeddings = compute_pair_embeddings(rows, clip_model, device)
    if not embeddings:
        raise ValueError("no image of the dataset could be decoded for the CLIP embeddings")
    ids = sorted(embeddings)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    save_file({"row_ids": torch.tensor(ids), "embeddings": torch.stack([embeddings[i] for i in ids])}, str(tmp), key)
    os.replace(tmp, cache_file)
    return embeddings


def embeddings_from_column(dataset_name: str, split: str, column: str, max_rows: int | None = None
                           ) -> dict[int, Tensor]:
    """Precomputed `f(y, x)` from columns `<column>_0` and `<column>_1` (embeddings of (jpg_0, caption) and
    (jpg_1, caption), lists of floats), oriented winner-first with `label_0`. Row ids match `load_pair_rows`."""
    from full.data.sources import iter_source

    names = ["label_0", f"{column}_0", f"{column}_1"]
    out = {}
    for row_id, row in iter_source(dataset_name, split, names, max_rows):
        emb = [row[f"{column}_0"], row[f"{column}_1"]]
        if row["label_0"] not in (0, 1) or any(e is None for e in emb):
            continue  # ties and rows without embeddings: load_pair_rows drops ties by default
        pair = torch.tensor(emb if row["label_0"] == 1 else emb[::-1], dtype=torch.float32)  # (2, E)
        out[row_id] = pair
    if not out:
        raise ValueError(f"--embedding_column {column!r}: no usable embeddings in {dataset_name}")
    return out

