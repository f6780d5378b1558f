"""A tiny CLIP for the lab, trained contrastively on its captioned scenes: the stand-in for PickScore's backbone.

Two `full/` methods need an image-text model besides the diffusion model:

* **Diff-contrast** (`full.train --method contrast --clip_model_name_or_path ...`) weights each pair by how alike
  its `f(image, prompt)` embeddings are to the other pairs' (paper 002, Sec. 2.1);
* **SPO**'s step-aware preference model (`full.train_spm --spm_model_name_or_path ...`) starts from a CLIP model
  (PickScore) and learns the preference on top (paper 003, Sec. 4.2).

A random CLIP would make the first a lottery and give the second nothing to start from, so the lab trains one the
way CLIP was trained (Radford et al. 2021): for a batch of N (image, caption) pairs, the symmetric cross-entropy
of the N x N cosine-similarity matrix scaled by a learned temperature, with the matching pairs on the diagonal.
Each batch holds every caption once (36 distinct captions, so no false negatives on the off-diagonal).
It learns what the captions name (colour, shape, background), not size: the preference is left to the SPM.

Saved with `save_pretrained` as a `CLIPModel` and a `CLIPProcessor` (the lab's tokenizer, 32 px images), which is
what `--clip_model_name_or_path` and `--spm_model_name_or_path` load.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from full.lab import shapes
from full.lab.presets import PretrainConfig
from full.lab.pretrain import VOCABULARY, build_tokenizer, optimizer_step, token_ids


def build_clip(config: PretrainConfig):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(config.seed + 3)
    tokenizer = build_tokenizer(VOCABULARY)
    width = config.clip_width
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                  image_size=shapes.RESOLUTION, patch_size=4)  # 8 x 8 patches of 4 px
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))
    size = shapes.RESOLUTION
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer)
    return model, processor


def normalised_pixels(images: np.ndarray, processor) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> CLIP's normalised (N, 3, 32, 32); the processor's resize and crop are no-ops at 32 px."""
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def pretrain_clip(out, config: PretrainConfig, log=lambda *a, **k: None) -> dict:
    model, processor = build_clip(config)
    ids = token_ids(processor.tokenizer, shapes.ALL_CAPTIONS)  # (36, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.clip_lr, weight_decay=1e-2)
    start = time.perf_counter()
    model.train()
    for step in range(config.clip_steps):
        rng = np.random.default_rng(config.seed * 7_919 + step)
        order = rng.permutation(len(shapes.ALL_CAPTIONS))
        images, _ = shapes.make_images(len(order), seed=int(rng.integers(2**31)),
                                       captions=[shapes.ALL_CAPTIONS[i] for i in order])
        # CLIPModel's return_loss: (CE(logits_per_text, diag) + CE(logits_per_image, diag)) / 2
        loss = model(input_ids=ids[order], pixel_values=normalised_pixels(images, processor), return_loss=True).loss
        optimizer_step(optimizer, loss, config.clip_lr, step, config.clip_steps)
        log("clip", step + 1, config.clip_steps, loss=loss.item())
    model.eval()
    out = Path(out)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    report = {"clip_final_loss": loss.item(), "clip_seconds": time.perf_counter() - start,
              "clip_retrieval_accuracy": retrieval_accuracy(model, processor, config.seed + 4)}
    (out / "clip.json").write_text(json.dumps(report, indent=1))
    return report


@torch.no_grad()
def retrieval_accuracy(model, processor, seed: int) -> float:
    """Fraction of fresh scenes whose most similar caption (of the 36) is their own: what the CLIP has learned."""
    images, scenes = shapes.make_images(4 * len(shapes.ALL_CAPTIONS), seed=seed)
    ids = token_ids(processor.tokenizer, shapes.ALL_CAPTIONS)
    logits = model(input_ids=ids, pixel_values=normalised_pixels(images, processor)).logits_per_image  # (N, 36)
    truth = torch.tensor([shapes.ALL_CAPTIONS.index(s.caption) for s in scenes])
    return float((logits.argmax(-1) == truth).float().mean())
