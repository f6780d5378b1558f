"""
# Reward models that score generated images: PickScore, CLIP score, LAION aesthetics, HPSv2, ImageReward

Each scorer is a small class with one method, `score(images, prompts) -> list[float]` (one float per
(image, prompt) pair, higher is better), built from a local directory or a hub id. They are the automatic
metrics of the papers: PickScore and CLIP score in *Aligning Text-to-Image Diffusion Models using RL from
Human Utility* (paper 000, Sec. 4.3); LAION aesthetics, PickScore, HPS v2, CLIP and ImageReward in
*Aligning Diffusion Models by Optimizing Human Utility* (Diffusion-KTO, paper 001, Sec. 5) and in
*Diffusion Preference Alignment via Relative Text-Image Contrast* (paper 002, Sec. 4).

The recipes are the official ones, so numbers compare with published ones:

* **PickScore** (Kirstain et al. 2023, github.com/yuvalkirstain/PickScore): CLIP-H fine-tuned on
  Pick-a-Pic; `score = logit_scale.exp() * cos(text_emb, image_emb)` with the model
  `yuvalkirstain/PickScore_v1` and the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`
  (text padded and truncated to 77 tokens). Typical SD1.5 values are around 21 (paper 000 Table 1).
* **CLIP score** (Hessel et al. 2021, torchmetrics' `CLIPScore` definition):
  `max(100 * cos(text_emb, image_emb), 0)`, default model `openai/clip-vit-large-patch14` (torchmetrics'
  default). We clamp each image's score; torchmetrics clamps the batch mean, which is the same number
  whenever no single image scores below zero.
* **LAION aesthetic predictor v2** (github.com/christophschuhmann/improved-aesthetic-predictor): an MLP
  `Linear(768,1024)-Dropout-Linear(1024,128)-Dropout-Linear(128,64)-Dropout-Linear(64,16)-Linear(16,1)`
  (no activations, as in the released `sac+logos+ava1-l14-linearMSE.pth`) on the L2-normalised CLIP
  ViT-L/14 image embedding. The head weights are not on an official hub repo: download the `.pth` from that
  GitHub repository and pass its path (a `.safetensors` copy works too, or `owner/repo/file.pth` on the hub).
* **HPS v2** (`pip install hpsv2`) and **ImageReward** (`pip install image-reward`) through their own
  packages, imported only when asked for; without them `build_scorer` raises `ScorerUnavailable` with the
  install command, and the CLI skips that scorer and says so.

Scorers run under `torch.no_grad()` in float32 by default so that scores do not depend on the GPU kind.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from full.paths import missing_local_path

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"
MAX_TEXT_TOKENS = 77


class ScorerUnavailable(ImportError):
    """An optional scorer whose package is not installed (the message says what to install)."""


def _check_inputs(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] is a {type(image).__name__}, expected a PIL.Image.Image")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] is a {type(prompt).__name__}, expected a str")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _projected(output) -> torch.Tensor:
    """`get_image_features` / `get_text_features` return a tensor in transformers 4 and a
    `BaseModelOutputWithPooling` (the projection in `pooler_output`) in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """A transformers `CLIPModel` + processor that returns L2-normalised embeddings, shape (N, D)."""

    def __init__(self, model: str, processor: str | None = None, *, device: str | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 16):
        from transformers import AutoProcessor, CLIPModel

        self.device = device or default_device()
        self.dtype = dtype
        self.batch_size = batch_size
        missing = [name for name in dict.fromkeys((model, processor or model)) if missing_local_path(name)]
        if missing:  # a local path that is not there: say so, not after a minute of Hub retries
            raise ValueError(f"could not load CLIP model {model!r} / processor {processor or model!r}: "
                             f"{missing[0]!r} does not exist")
        try:
            self.processor = AutoProcessor.from_pretrained(processor or model)
            self.model = CLIPModel.from_pretrained(model).eval().to(self.device, dtype)
        except OSError as error:  # missing files, no network: say which model, not a hub stack trace
            raise ValueError(f"could not load CLIP model {model!r} / processor {processor or model!r}: {error}") from error

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            emb = _projected(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            out.append(emb.float() / emb.float().norm(dim=-1, keepdim=True))
        return torch.cat(out)  # (N, D)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor(text=list(texts[start:start + self.batch_size]), padding=True,
                                    truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
            emb = _projected(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                          attention_mask=tokens["attention_mask"].to(self.device)))
            out.append(emb.float() / emb.float().norm(dim=-1, keepdim=True))
        return torch.cat(out)  # (N, D)

    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """cos(image_i, prompt_i) for each pair, shape (N,)."""
        return (self.images(images) * self.texts(prompts)).sum(dim=-1)


class PickScore:
    """PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(text, image)`, the official recipe."""

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str | None = PICKSCORE_PROCESSOR, **kwargs):
        # A local PickScore directory that ships its own processor files needs no separate processor.
        if processor == PICKSCORE_PROCESSOR and any(
                os.path.isfile(os.path.join(model, f)) for f in ("preprocessor_config.json", "processor_config.json")):
            processor = model
        self.clip = ClipEmbedder(model, processor, **kwargs)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        _check_inputs(images, prompts)
        scale = self.clip.model.logit_scale.exp().float().item()
        return (scale * self.clip.cosine(images, prompts)).tolist()


class ClipScore:
    """CLIP score (Hessel et al. 2021) as torchmetrics defines it: `max(100 * cos(text, image), 0)`."""

    name = "clip"

    def __init__(self, model: str = CLIP_MODEL, processor: str | None = None, **kwargs):
        self.clip = ClipEmbedder(model, processor, **kwargs)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        _check_inputs(images, prompts)
        return (100.0 * self.clip.cosine(images, prompts)).clamp(min=0.0).tolist()


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head; the layer indices match the released state dict
    (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`). Dropout is inactive in eval mode."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)  # (N, D) -> (N,)


def _resolve_file(path_or_hub: str) -> str:
    """A local file, or `owner/repo/path/in/repo` downloaded (and cached) with huggingface_hub."""
    if os.path.isfile(path_or_hub):
        return path_or_hub
    parts = path_or_hub.split("/")
    if len(parts) < 3 or os.path.isabs(path_or_hub) or path_or_hub.startswith("."):
        raise ValueError(f"aesthetic head {path_or_hub!r} is not a file; pass a local .pth/.safetensors path "
                         "or owner/repo/filename on the Hugging Face Hub")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))


def load_aesthetic_head(path_or_hub: str) -> AestheticMLP:
    """Load the MLP head from a `.pth` state dict (as released) or a `.safetensors` file."""
    path = _resolve_file(path_or_hub)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "layers.0.weight" not in state:
        raise ValueError(f"{path} is not an improved-aesthetic-predictor head: expected keys layers.0.weight, "
                         f"layers.2.weight, ..., layers.7.weight; found {sorted(state)[:6]}")
    head = AestheticMLP(input_size=state["layers.0.weight"].shape[1])
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the aesthetic MLP: missing {missing}, unexpected {unexpected}")
    return head.eval()


class AestheticScore:
    """LAION aesthetic predictor v2: MLP head on L2-normalised CLIP ViT-L/14 image embeddings (about 1-10)."""

    name = "aesthetic"

    def __init__(self, head: str | None = None, clip_model: str = CLIP_MODEL, **kwargs):
        if head is None:
            raise ValueError("the aesthetic scorer needs its head weights: download sac+logos+ava1-l14-linearMSE.pth "
                             "from github.com/christophschuhmann/improved-aesthetic-predictor and pass its path")
        self.clip = ClipEmbedder(clip_model, None, **kwargs)
        self.head = load_aesthetic_head(head).to(self.clip.device)
        embed_dim = self.clip.model.config.projection_dim
        if self.head.input_size != embed_dim:
            raise ValueError(f"aesthetic head expects {self.head.input_size}-d image embeddings but {clip_model!r} "
                             f"gives {embed_dim}-d ones (the released head needs CLIP ViT-L/14, 768-d)")

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        _check_inputs(images, prompts)  # the prompt is unused: aesthetics is caption-free
        return self.head(self.clip.images(images)).tolist()


class HPSv2Score:
    """Human Preference Score v2 (Wu et al. 2023) through the `hpsv2` package (it fetches its own weights)."""

    name = "hpsv2"

    def __init__(self, version: str = "v2.1", **_):
        try:
            import hpsv2
        except ImportError as error:
            raise ScorerUnavailable(f"hpsv2 is not installed ({error}); pip install hpsv2") from error
        self.hpsv2, self.version = hpsv2, version

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        _check_inputs(images, prompts)
        # hpsv2.score takes one prompt for a list of images; score image by image, which is always valid.
        return [float(self.hpsv2.score([im], p, hps_version=self.version)[0]) for im, p in zip(images, prompts)]


class ImageRewardScore:
    """ImageReward (Xu et al. 2023) through the `image-reward` package (`import ImageReward`)."""

    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", *, device: str | None = None, **_):
        try:
            import ImageReward
        except ImportError as error:
            raise ScorerUnavailable(f"ImageReward is not installed ({error}); pip install image-reward") from error
        self.model = ImageReward.load(model, device=device or default_device())

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        _check_inputs(images, prompts)
        values = [self.model.score(p, im) for im, p in zip(images, prompts)]  # a float per single image
        return [float(v[0] if isinstance(v, (list, tuple)) else v) for v in values]


SCORERS: dict[str, Callable[..., object]] = {
    "pickscore": PickScore,
    "clip": ClipScore,
    "aesthetic": AestheticScore,
    "hpsv2": HPSv2Score,
    "imagereward": ImageRewardScore,
}


def scorer_factory(name: str) -> Callable[..., object]:
    """A built-in name, or `module.path:ClassName`: the extension point for your own reward.

    Any importable class (or function) built with keyword options only, whose instances have
    `score(images: list[PIL.Image], prompts: list[str]) -> list[float]` (higher is better), scores like the
    built-ins: `full.evaluate --scorers pickscore,my_rewards.jpeg:Compressibility` (docs/evaluation.md). Its
    name in scores.jsonl and the report is the string given here."""
    if name in SCORERS:
        return SCORERS[name]
    if ":" not in name:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {', '.join(SCORERS)}, or module.path:ClassName "
                         "for your own")
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"scorer {name!r}: cannot import module {module_name!r} ({error})") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"scorer {name!r}: module {module_name!r} has no class or function {attribute!r}")
    return factory


def build_scorer(name: str, **options):
    """`build_scorer("pickscore", model=..., device=...)` or `build_scorer("my.module:MyReward")`; unknown names
    raise ValueError listing the valid ones, optional packages that are missing raise ScorerUnavailable."""
    scorer = scorer_factory(name)(**options)
    if not callable(getattr(scorer, "score", None)):
        raise ValueError(f"scorer {name!r} has no score(images, prompts) method")
    return scorer


# ----------------------------------------------------------------------------------------------
# FID for style alignment (paper 002, Sec. 3 and Table 2): generated images vs. a reference folder.


def _uint8_batches(images: Sequence[Image.Image | str], batch_size: int = 32):
    """(B, 3, H, W) uint8 tensors; a batch is cut wherever the image size changes."""
    batch: list[torch.Tensor] = []
    for image in images:
        if not isinstance(image, Image.Image):  # a path: open lazily, thousands of images need not fit in memory
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        array = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W)
        if batch and (array.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.stack(batch)
            batch = []
        batch.append(array)
    if batch:
        yield torch.stack(batch)


def frechet_inception_distance(generated: Sequence[Image.Image | str], reference: Sequence[Image.Image | str], *,
                               feature: int | torch.nn.Module = 2048, weights_path: str | None = None,
                               device: str | None = None) -> dict:
    """FID (Heusel et al. 2017) with torchmetrics' `FrechetInceptionDistance`, never a hand-rolled Inception.

    Returns `{"fid": float, "n_generated", "n_reference", "feature"}`, or `{"fid": None, "unavailable":
    reason}` when the metric cannot run here: torchmetrics or torch-fidelity missing, or the InceptionV3
    weights not downloadable (offline). `weights_path` is torch-fidelity's `pt_inception-2015-12-05` file for
    offline use; `feature` may also be an `nn.Module` mapping uint8 (B, 3, H, W) to (B, D) features."""
    info = {"n_generated": len(generated), "n_reference": len(reference),
            "feature": feature if isinstance(feature, int) else type(feature).__name__}
    if len(generated) < 2 or len(reference) < 2:
        raise ValueError(f"FID needs at least 2 generated and 2 reference images, got {len(generated)} and {len(reference)}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        return {**info, "fid": None, "unavailable": f"torchmetrics is not installed ({error}); pip install torchmetrics torch-fidelity"}
    try:
        metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights_path)
    except Exception as error:  # noqa: BLE001 -- any failure to build Inception (import, download, file) is reported
        return {**info, "fid": None, "unavailable": f"could not load the InceptionV3 feature extractor: "
                                                    f"{type(error).__name__}: {error}"}
    metric = metric.to(device or default_device())
    for images, real in ((reference, True), (generated, False)):
        for batch in _uint8_batches(images):
            metric.update(batch.to(metric.device), real=real)
    return {**info, "fid": float(metric.compute())}
