"""`EvalConfig`: what `full.evaluate` generates, scores and reports (its flags, built with `full.cli.config`).

The library (`full/eval/evaluate.py`, `full/eval/checks.py`) takes this, never the parsed command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from full.eval.scorers import CLIP_MODEL, PICKSCORE_MODEL, PICKSCORE_PROCESSOR
from full.eval.stats import DEFAULT_BOOTSTRAP_SEED, DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_SEEDS = 5  # images per prompt and model, as Diffusion-KTO App. A


@dataclass(frozen=True)
class EvalConfig:
    out: str
    stages: str = "generate,score,report"
    # generate
    base_model: str | None = None
    lora: list[str] = field(default_factory=list)  # NAME=DIR (or DIR) of diffusers-format LoRAs
    full_model: list[str] = field(default_factory=list)  # NAME=DIR of --train_mode full outputs (DIR/unet, ...)
    base_name: str = "base"
    no_base: bool = False
    prompts: str = "paper000"
    prompt_column: str | None = None
    max_prompts: int | None = None
    seeds: int = DEFAULT_SEEDS
    seed_start: int = 0
    scheduler: str | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    lora_scale: float = 1.0
    batch_size: int = 4
    device: str | None = None
    dtype: str = "auto"
    no_safety_checker: bool = False
    # score
    scorers: str = "pickscore,clip"
    pickscore_model: str = PICKSCORE_MODEL
    pickscore_processor: str = PICKSCORE_PROCESSOR
    clip_model: str = CLIP_MODEL
    aesthetic_clip_model: str = CLIP_MODEL
    aesthetic_head: str | None = None
    hpsv2_version: str = "v2.1"
    imagereward_model: str = "ImageReward-v1.0"
    score_batch_size: int = 16
    fid_reference: str | None = None
    fid_inception_weights: str | None = None
    # report
    focus: str | None = None
    bootstrap: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED
    confidence: float = DEFAULT_CONFIDENCE
    zero_method: str = "wilcox"
    grid_prompts: int = 4
