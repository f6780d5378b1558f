"""The lab's preference data: the pretrained model's own samples, compared by the synthetic rater.

As Pick-a-Pic was made (people compare two images the model drew for their prompt), and as the papers train:

1. the base model draws `images_per_caption` samples for every *training* caption (`shapes.TRAIN_CAPTIONS`),
   each from its own seed (`sample_images`: one `torch.Generator(seed)` per image, so an image does not depend
   on the batch it was drawn in);
2. consecutive samples of a caption form a pair, and `rater.label_pairs` says which one won (ties, flip noise);
3. the pairs are written in the Pick-a-Pic v2 schema (`caption, jpg_0, jpg_1, label_0, label_1`, JPEG bytes,
   plus the rater's `score_0, score_1`), which every offline trainer reads;
4. per-image binary feedback comes from the rater's scores through the repository's own converter,
   `python -m full.data convert scores-to-feedback --threshold T` on `scored.parquet` (image, caption, score):
   desirable when the score is at least the `desirable_quantile` of the base samples' scores, as Diffusion-KTO's
   synthetic "aesthetics" user calls an image desirable above a score (paper 001, Sec. 6). (Winner-once labels from
   the pairs, `convert pairs-to-feedback`, call half of all images desirable, many of them small shapes that only
   beat a smaller one: a weak signal for the methods that see one image at a time.);
5. a deliberately broken copy, `pairs_swapped.parquet`, has every winner and loser exchanged: a trainer that
   learns from it must move the rater's score *down*, which is what makes the lab's test able to fail.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from full.lab import rater as rater_lib
from full.lab.shapes import TRAIN_CAPTIONS


def load_pipeline(model_dir, lora_dir=None):
    """Any lab pipeline, SD1.5- or SD3-shaped, as diffusers reads its model_index.json (the lab saves no safety
    checker)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, batch_size: int = 64,
                  log=None):
    """One PIL image per (prompt, seed), each from its own `torch.Generator(seed)`; `log` hears every ~10%."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
        images += pipe(prompts[chunk], generator=generators, num_inference_steps=steps, guidance_scale=guidance).images
        if log is not None and (len(images) == len(prompts) or start // batch_size % 4 == 3):
            log(f"sampled {len(images)}/{len(prompts)} base images")
    return images


def jpeg(image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_pairs(path, captions, images_0, images_1, label_0, scores_0, scores_1) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    label_0 = np.asarray(label_0, dtype=np.float64)
    table = pa.table({
        "caption": list(captions),
        "jpg_0": pa.array([jpeg(im) for im in images_0], type=pa.binary()),
        "jpg_1": pa.array([jpeg(im) for im in images_1], type=pa.binary()),
        "label_0": label_0, "label_1": 1.0 - label_0,
        "score_0": np.asarray(scores_0, dtype=np.float64), "score_1": np.asarray(scores_1, dtype=np.float64),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_scored(path, captions, images, scores) -> Path:
    """(image, caption, score) rows: the input of the scores-to-* converters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": pa.array([jpeg(im) for im in images], type=pa.binary()), "caption": list(captions),
                      "score": np.asarray(scores, dtype=np.float64)})
    pq.write_table(table, path)
    return Path(path)


def convert(*argv: str) -> str:
    """`python -m full.data convert ...`, as a user runs it; returns what it printed."""
    command = [sys.executable, "-m", "full.data", "convert", *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def make_preference_data(model_dir, out_dir, *, images_per_caption: int, steps: int, guidance: float,
                         tie_rate: float, label_noise: float, desirable_quantile: float, seed: int = 10_000,
                         rater: str = "size", log=print) -> dict:
    """Sample, rate (by `rater`, a name of `rater.RATERS`), write `pairs.parquet`, `pairs_swapped.parquet` and
    `feedback.parquet` under `out_dir`."""
    if images_per_caption < 2 or images_per_caption % 2:
        raise ValueError(f"images_per_caption must be even and >= 2, got {images_per_caption}")
    out_dir = Path(out_dir)
    pipe = load_pipeline(model_dir)
    prompts = [c for c in TRAIN_CAPTIONS for _ in range(images_per_caption)]
    # seeds from 10000 on: the evaluation draws seeds 0.., so no evaluated image is a training image
    seeds = [seed + i for i in range(len(prompts))]
    images = sample_images(pipe, prompts, seeds, steps=steps, guidance=guidance, log=log)
    scores = rater_lib.rater_named(rater)().score(images, prompts)
    first, second = slice(0, None, 2), slice(1, None, 2)  # consecutive samples of one caption
    label_0 = rater_lib.label_pairs(scores[first], scores[second], tie_rate=tie_rate, label_noise=label_noise,
                                    seed=seed)
    captions = prompts[first]
    pairs = write_pairs(out_dir / "pairs.parquet", captions, images[first], images[second], label_0,
                        scores[first], scores[second])
    swapped = write_pairs(out_dir / "pairs_swapped.parquet", captions, images[first], images[second],
                          np.where(label_0 == 0.5, 0.5, 1.0 - label_0), scores[first], scores[second])
    scored, feedback = out_dir / "scored.parquet", out_dir / "feedback.parquet"
    write_scored(scored, prompts, images, scores)
    threshold = float(np.quantile(scores, desirable_quantile))
    converter = ["scores-to-feedback", "--input", str(scored), "--output", str(feedback), "--threshold", f"{threshold:.6g}"]
    converter_says = convert(*converter)
    fidelity = rater_lib.Fidelity().score(images, prompts)
    prompts_file = out_dir / "train_prompts.txt"  # SPO samples its own pairs for these
    prompts_file.write_text("".join(c + "\n" for c in TRAIN_CAPTIONS))
    summary = {"pairs": str(pairs), "pairs_swapped": str(swapped), "feedback": str(feedback),
               "prompts": str(prompts_file),
               "rater": rater, "n_pairs": len(captions), "n_ties": int((label_0 == 0.5).sum()), "tie_rate": tie_rate,
               "label_noise": label_noise, "desirable_quantile": desirable_quantile,
               "desirable_threshold": threshold, "converter": "python -m full.data convert " + " ".join(converter),
               "converter_says": converter_says, "base_mean_score": float(np.mean(scores)),
               "base_fidelity_on_train_captions": float(np.mean(fidelity))}
    (out_dir / "data.json").write_text(json.dumps(summary, indent=1))
    log(f"preference data: {summary['n_pairs']} pairs ({summary['n_ties']} ties) -> {pairs}; {converter_says}")
    return summary
