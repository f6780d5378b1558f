"""The LoRAs and the base model of `full.eval.evaluate`, checked before anything loads and identified by content.

Every `--lora` is resolved to the one weight file `pipe.load_lora_weights` will read (a Hub LoRA is downloaded
first), so a missing folder, a folder without weights or a Hub id that does not resolve is one line before any
model loads. The file's sha256 goes into each manifest row: a LoRA retrained in place (same folder, new weights)
no longer matches its old images, and they are drawn again. The base model's identity is its content fingerprint
(`full.paths.model_fingerprint`: configs in full, weights sampled, since a pipeline is gigabytes), so a base model
retrained in place is drawn again too, and one merely copied or touched is not.

A LoRA of another model family (SDXL on SD1.5, ...) is found from its safetensors header alone: the in-features
of the cross-attention key projection's LoRA matrix must be the base UNet's `cross_attention_dim`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from pathlib import Path

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # what the trainers write
# Skipped when guessing a folder's weight file, as diffusers does: a scheduler, optimizer or checkpoint state
# is no LoRA.
NOT_LORA = ("scheduler", "optimizer", "checkpoint")
# The cross-attention key projection's LoRA "down"/"A" matrix, (rank, cross_attention_dim), in the key spellings
# of diffusers (`attn2.to_k.lora.down`), peft (`attn2.to_k.lora_A`), kohya (`attn2_to_k.lora_down`) and old
# attention processors (`attn2.processor.to_k_lora.down`).
CROSS_ATTENTION_KEY_DOWN = re.compile(r"attn2[._](?:processor[._])?to_k(?:_lora)?[._](?:lora[._])?(?:down|lora_A)\b")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's "Error(s) in loading state_dict for X:" says little; its next line names the first mismatch
    return " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(error).__name__)


# ----------------------------------------------------------------------------------------------
# Which file a LoRA is.


def weight_file_name(names: list[str], where: str) -> str | None:
    """The weight file among a folder's (or Hub repo's) top-level file names, as diffusers would pick it, or None.
    Several candidates and none of them the trainers' name: ambiguous (diffusers would take the first listed)."""
    for suffix, default in zip((".safetensors", ".bin"), LORA_WEIGHT_NAMES):
        found = sorted(n for n in names if n.endswith(suffix) and not any(s in n for s in NOT_LORA))
        if default in found:
            return default
        if len(found) > 1:
            raise ValueError(f"{where} holds several weight files ({', '.join(found)}); pass the one to load as "
                             "NAME=DIR/FILE")
        if found:
            return found[0]
    return None


def local_weight_file(path: Path) -> Path:
    """The weight file of a local LoRA: `path` itself, or the one weight file at the top of the folder."""
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin"):
            raise ValueError(f"{str(path)!r} is not a .safetensors or .bin LoRA file")
        return path
    name = weight_file_name([p.name for p in path.iterdir() if p.is_file()], repr(str(path)))
    if name is None:
        raise ValueError(f"{str(path)!r} holds no LoRA weights ({LORA_WEIGHT_NAMES[0]} or another .safetensors/.bin "
                         "file at its top level); pass the folder a trainer wrote, e.g. runs/dpo/final")
    return path / name


def hub_weight_file(repo_id: str) -> Path:
    """Download a Hub LoRA's weight file (or find it in the cache) before any model loads."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        files = list_repo_files(repo_id)
    except (HfHubHTTPError, HFValidationError) as error:  # no such repo, gated, not a valid id
        raise ValueError(f"{repo_id!r} is not a local folder and not a LoRA on the Hub "
                         f"({_first_line(error)})") from error
    except Exception:  # offline or no network (httpx's errors are no OSErrors): only the cache can answer
        files = None
    if files is None:
        name, download = LORA_WEIGHT_NAMES[0], {"local_files_only": True}
    else:
        name, download = weight_file_name([f for f in files if "/" not in f], f"Hub repo {repo_id!r}"), {}
        if name is None:
            raise ValueError(f"Hub repo {repo_id!r} holds no LoRA weights (.safetensors/.bin) at its top level")
    try:
        return Path(hf_hub_download(repo_id, name, **download))
    except Exception as error:  # not in the cache (offline), a download cut off, ...
        raise ValueError(f"{repo_id!r} is not a local folder, and its LoRA weights could not be fetched from the Hub "
                         f"or its cache ({_first_line(error)}); download it and pass its folder") from error


def resolve_weight_file(name: str, lora: str) -> Path:
    """The file `--lora NAME=lora` stands for; every failure is one line naming the LoRA."""
    try:
        path = Path(lora).expanduser()
        if path.exists():
            return local_weight_file(path)
        if not HUB_ID.fullmatch(lora):  # parse_models lets only a Hub-looking name through
            raise ValueError(f"{lora!r} does not exist")
        return hub_weight_file(lora)
    except ValueError as error:
        raise ValueError(f"LoRA {name!r}: {error}") from error


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(files, root: Path) -> str:
    """One sha256 for several weight files: of each file's path under `root` and its own sha256, in the given order."""
    return hashlib.sha256("".join(f"{Path(f).relative_to(root)}:{file_sha256(Path(f))};" for f in files)
                          .encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Does it fit the base model? (Its header against the UNet's config: no tensor is read.)


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of each tensor of a safetensors file, from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def unet_config(base_model: str) -> dict | None:
    """The base model's UNet config from disk (a local folder, or a Hub id already in the cache), else None."""
    local = Path(base_model).expanduser() / "unet" / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if not HUB_ID.fullmatch(base_model):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(base_model, "unet/config.json")
    except ValueError:  # not a valid repo id ("a..b/c"): loading the pipeline will say so
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def check_family(name: str, weights: Path, base_model: str) -> None:
    """A LoRA made for another model family stops here, before the base model loads."""
    config = unet_config(base_model)
    width = config.get("cross_attention_dim") if config else None
    if not isinstance(width, int) or weights.suffix != ".safetensors":
        return  # the trial load of `load_lora` still names a mismatch before any image is drawn
    try:
        shapes = tensor_shapes(weights)
    except Exception as error:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"LoRA {name!r}: {str(weights)!r} is not a readable safetensors file "
                         f"({_first_line(error)})") from error
    widths = {shape[1] for key, shape in shapes.items() if CROSS_ATTENTION_KEY_DOWN.search(key) and len(shape) == 2}
    if widths and widths != {width}:
        raise ValueError(f"LoRA {name!r} ({weights}) is for a model with cross-attention width {sorted(widths)[0]}, "
                         f"but the base model {base_model!r} has {width} (another family, e.g. SDXL is 2048, "
                         "SD1.5 768, SD2 1024); evaluate it on the base model it was trained on")


# ----------------------------------------------------------------------------------------------
# The base model's identity, and loading a LoRA into the pipeline.


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def diffusers_load_errors_unlogged():
    """diffusers logs a failed LoRA load (a multi-line state-dict report) before raising it; we raise it as one
    line, so its log copy would only be a second, longer report of the same error."""
    logger, errors_dropped = logging.getLogger("diffusers.loaders.peft"), _DropErrors()
    logger.addFilter(errors_dropped)
    try:
        yield
    finally:
        logger.removeFilter(errors_dropped)


def load_lora(pipe, name: str, lora: str, weights: str | None, scale: float, base_model: str | None) -> None:
    """`pipe.load_lora_weights` of `weights` (the resolved file; `lora` itself when not resolved) as adapter `name`,
    the only active one; any failure is one line naming the LoRA and the base model."""
    source, file = (lora, {}) if weights is None else (str(Path(weights).parent), {"weight_name": Path(weights).name})
    try:
        with diffusers_load_errors_unlogged():
            pipe.load_lora_weights(source, adapter_name=name, **file)
        pipe.set_adapters([name], adapter_weights=[scale])
    except Exception as error:  # OSError, ValueError, torch's RuntimeError on a shape mismatch, ...
        raise ValueError(f"could not load LoRA {name!r} from {lora!r} into the base model {base_model!r} "
                         f"({type(error).__name__}: {_first_line(error)}); is it a LoRA of this model?") from error


# ----------------------------------------------------------------------------------------------
# A fully fine-tuned model (--train_mode full): its denoiser folder in place of the base model's.


DENOISER_FOLDERS = ("unet", "transformer")  # what `--train_mode full` writes (full/run/weights.py), per family


def full_model_folder(name: str, path: str) -> dict:
    """The denoiser folder of a full fine-tuning output and the sha256 of its weight files, or one line naming it."""
    folders = [d for d in DENOISER_FOLDERS if (Path(path) / d / "config.json").is_file()]
    if not folders:
        raise ValueError(f"full model {name!r}: {path!r} has no unet/ or transformer/ folder with a config.json "
                         "(expected the output_dir of a --train_mode full run; a LoRA goes with --lora)")
    folder = Path(path) / folders[0]
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise ValueError(f"full model {name!r}: {folder} holds no weight file")
    return {"denoiser": folders[0], "sha256": files_sha256(files, folder)}


@contextlib.contextmanager
def denoiser_of(pipe, model):
    """The pipeline with ``model``'s (a `full.eval.generate.ModelSpec`) fine-tuned denoiser in place of the base
    model's, restored afterwards."""
    base = getattr(pipe, model.denoiser)
    tuned = type(base).from_pretrained(model.full_model, subfolder=model.denoiser, torch_dtype=base.dtype)
    setattr(pipe, model.denoiser, tuned.to(base.device))
    try:
        yield pipe
    finally:
        setattr(pipe, model.denoiser, base)
