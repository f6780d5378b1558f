"""The generate stage of `full.eval.evaluate`: prompt sets, the models compared, the manifest, and images drawn with
fixed seeds (image `(prompt, seed)` starts from its own CPU `torch.Generator(seed)`, so it is the same whatever the
batch size or device, and every model gets the same seeds: a paired comparison)."""

from __future__ import annotations

import csv
import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from full.eval.loras import (HUB_ID, check_family, denoiser_of, file_sha256, full_model_folder, load_lora,
                             resolve_weight_file)
from full.paths import missing_local_path
from full.progress import progress_bar

PROMPT_SETS_DIR = Path(__file__).resolve().parent / "prompts"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
# Settings that must agree between a resumed run and the images already in the manifest.
SETTING_KEYS = ("base_model", "lora", "lora_scale", "full_model", "scheduler", "steps", "guidance", "height", "width",
                "negative_prompt", "dtype")
# What the weights were (full/eval/loras.py): an image whose row differs from this run's was drawn by other weights
# at the same path (a LoRA retrained in place) and is drawn again, not reused.
IDENTITY_KEYS = ("base_model_identity", "lora_sha256")

# ----------------------------------------------------------------------------------------------
# Prompt sets: a shipped set by name, a .txt/.csv/.json/.jsonl/.parquet file, or hf:<dataset>[:<split>].


def _rows_to_prompts(rows: list, column: str | None, source: str) -> list[tuple[str | None, str]]:
    """Rows of a table (dicts) or plain strings -> (optional id, prompt)."""
    if all(isinstance(r, str) for r in rows):
        return [(None, r) for r in rows]
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{source}: expected a list of strings or of objects with a prompt field")
    columns = list(rows[0]) if rows else []
    column = column or next((c for c in ("prompt", "caption", "text", "Prompt") if c in columns), None)
    if column is None or any(column not in r for r in rows):
        raise ValueError(f"{source}: no prompt column {column or ''!r} (columns: {columns}); pass --prompt_column")
    id_column = next((c for c in ("prompt_id", "id") if c in columns), None)
    return [(str(r[id_column]) if id_column else None, r[column]) for r in rows]


def load_prompts(source: str, column: str | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """[(prompt_id, prompt)] from `source`; ids come from the file (a `prompt_id`/`id` column, or
    `id<TAB>prompt` lines in a .txt) or are the zero-padded row index."""
    shipped = PROMPT_SETS_DIR / ("paper000_appendix.txt" if source == "paper000" else f"{source}.txt")
    path = shipped if NAME_PATTERN.match(source) and shipped.is_file() else Path(source)
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        try:
            import datasets
        except ImportError as error:
            raise ValueError(f"{source}: reading a Hub dataset needs the `datasets` package ({error}); "
                             "pip install datasets, or export the column to a .txt/.csv file") from error
        table = datasets.load_dataset(name, split=split or "test")
        # Keep only the text columns: Pick-a-Pic-like datasets also carry image bytes.
        wanted = [c for c in (column, "prompt", "caption", "text", "Prompt", "prompt_id", "id") if c in table.column_names]
        pairs = _rows_to_prompts(table.select_columns(list(dict.fromkeys(wanted))).to_list(), column, source)
    elif not path.is_file():
        shipped_names = ", ".join(sorted(["paper000"] + [p.stem for p in PROMPT_SETS_DIR.glob("*.txt")]))
        raise ValueError(f"prompt set {source!r} is neither a file nor a shipped set ({shipped_names}) nor hf:<dataset>")
    elif path.suffix == ".txt":
        lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        pairs = [tuple(ln.split("\t", 1)) if "\t" in ln else (None, ln.strip()) for ln in lines]
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            pairs = _rows_to_prompts(list(csv.DictReader(f)), column, source)
    elif path.suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        data = [json.loads(ln) for ln in text.splitlines() if ln.strip()] if path.suffix == ".jsonl" else json.loads(text)
        if isinstance(data, dict):  # {"id": "prompt", ...}
            data = [{"prompt_id": k, "prompt": v} for k, v in data.items()]
        pairs = _rows_to_prompts(data, column, source)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pairs = _rows_to_prompts(pq.read_table(path).to_pylist(), column, source)
    else:
        raise ValueError(f"{source}: unsupported prompt file type {path.suffix!r} (use .txt, .csv, .json, .jsonl, .parquet)")

    prompts = [(pid if pid is not None else f"{i:04d}", str(text).strip()) for i, (pid, text) in enumerate(pairs)]
    prompts = [(pid.strip(), text) for pid, text in prompts if text]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"{source}: no prompts found")
    ids = [pid for pid, _ in prompts]
    duplicates = sorted({pid for pid in ids if ids.count(pid) > 1})
    if duplicates:
        raise ValueError(f"{source}: duplicate prompt ids {duplicates[:5]}")
    if len({file_stem(pid) for pid in ids}) != len(ids):  # ids become file names
        raise ValueError(f"{source}: prompt ids collide once made file-safe ({file_stem.__doc__})")
    return prompts


def file_stem(prompt_id: str) -> str:
    """characters other than letters, digits, '.', '_' and '-' become '_'"""
    return re.sub(r"[^A-Za-z0-9._-]", "_", prompt_id)


# ----------------------------------------------------------------------------------------------
# Models and the manifest.


@dataclass(frozen=True)
class ModelSpec:
    name: str
    lora: str | None  # None for the base model
    weights: str | None = None  # the LoRA's weight file, once resolved (`resolve_loras`)
    sha256: str | None = None  # of that file (of a full model's weight files): its identity in the manifest
    full_model: str | None = None  # a --train_mode full output whose denoiser folder replaces the base model's
    denoiser: str | None = None  # that folder's name, "unet" or "transformer" (`resolve_loras`)


def lora_spec(spec: str) -> tuple[str, str]:
    """`NAME=DIR` -> (NAME, DIR); a plain `DIR` is named after its folder."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (Path(spec.rstrip("/")).name, spec)


def parse_models(loras: list[str], base_name: str = "base", include_base: bool = True, *,
                 full_models: list[str] = ()) -> list[ModelSpec]:
    """`--lora NAME=DIR` (or just `DIR`, named after its folder) and `--full_model NAME=DIR` -> [base, lora...,
    full...], validated."""
    models = [ModelSpec(base_name, None)] if include_base else []
    for spec in loras:
        name, path = lora_spec(spec)
        # A local-looking path that is not there is missing, never a Hub lookup (full/paths.py).
        is_hub_id = not missing_local_path(path) and HUB_ID.fullmatch(path) is not None
        if not os.path.exists(path) and not is_hub_id:
            raise ValueError(f"LoRA {name!r}: {path!r} does not exist (expected a directory from a trainer or a hub id)")
        models.append(ModelSpec(name, path))
    for spec in full_models:
        name, path = lora_spec(spec)
        models.append(ModelSpec(name, None, full_model=path))
    names = [m.name for m in models]
    for name in names:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"model name {name!r} may only contain letters, digits, '.', '_' and '-'")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}; name LoRAs with --lora NAME=DIR")
    if not models:
        raise ValueError("nothing to evaluate: give --lora or keep the base model")
    return models


def resolve_loras(models: list[ModelSpec], base_model: str) -> list[ModelSpec]:
    """Each LoRA's weight file (a Hub LoRA downloaded), its sha256, and a check that it fits the base model's family:
    all before any model loads, so a bad --lora is one line instead of a failure after the other models' images."""
    resolved = []
    for model in models:
        if model.full_model is not None:
            model = replace(model, **full_model_folder(model.name, model.full_model))
        elif model.lora is not None:
            weights = resolve_weight_file(model.name, model.lora)
            check_family(model.name, weights, base_model)
            model = replace(model, weights=str(weights), sha256=file_sha256(weights))
        resolved.append(model)
    return resolved


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_manifest(out: Path) -> list[dict]:
    """The manifest's rows, one per (model, prompt_id, seed): a regenerated image's newer row wins."""
    parts = sorted(out.glob("manifest.part-*.jsonl"))  # left by processes of a multi-process run (merged at its end)
    rows = {(r["model"], r["prompt_id"], r["seed"]): r
            for path in [out / "manifest.jsonl", *parts] for r in read_jsonl(path)}
    return list(rows.values())


def merge_manifest_parts(out: Path) -> None:
    """Append the processes' manifest parts to manifest.jsonl and remove them (main process, after all finished)."""
    parts = sorted(out.glob("manifest.part-*.jsonl"))
    if parts:
        with (out / "manifest.jsonl").open("a", encoding="utf-8") as manifest:
            for path in parts:
                manifest.write(path.read_text(encoding="utf-8"))
        for path in parts:
            path.unlink()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # atomic: an interrupted write never leaves half a file


# ----------------------------------------------------------------------------------------------
# Stage 1: generation.


def load_pipeline(base_model: str, *, scheduler: str | None, dtype: str, device: str, safety_checker: bool):
    """`AutoPipelineForText2Image` (SD1.5, SDXL, ...) with an optional scheduler swapped in by class name."""
    import diffusers
    import torch
    from packaging.version import Version

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    # diffusers 0.42 renamed the keyword (torch_dtype still works there, with a deprecation warning).
    dtype_key = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(base_model, **{dtype_key: torch_dtype}, **extra)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load the base model {base_model!r}: {error}") from error
    if scheduler is not None:
        compatible = sorted(c.__name__ for c in pipe.scheduler.compatibles)
        cls = getattr(diffusers, scheduler, None)
        if cls is None or scheduler not in compatible:
            raise ValueError(f"unknown or incompatible scheduler {scheduler!r}; compatible: {', '.join(compatible)}")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_resolution(pipe) -> int | None:
    unet = getattr(pipe, "unet", None)
    return unet.config.sample_size * pipe.vae_scale_factor if unet is not None else None


def check_resumable(existing: list[dict], models: list[ModelSpec], prompts: list[tuple[str, str]], settings: dict,
                    lora_scale: float, manifest_path: Path) -> None:
    """A resumed run must use the settings (and prompts) the manifest was made with."""
    prompt_text = dict(prompts)
    for row in existing:
        model = next((m for m in models if m.name == row["model"]), None)
        if model is None:
            continue
        if row["prompt_id"] in prompt_text and prompt_text[row["prompt_id"]] != row["prompt"]:
            raise ValueError(f"{manifest_path} has prompt id {row['prompt_id']!r} as {row['prompt']!r}, but this "
                             f"run's prompt set has {prompt_text[row['prompt_id']]!r}; use a new --out")
        wanted = {**settings, "lora": model.lora, "lora_scale": lora_scale if model.lora else None,
                  "full_model": model.full_model}
        for key in SETTING_KEYS:
            if row.get(key) != wanted[key]:
                raise ValueError(f"{manifest_path} has {row['model']!r} images made with {key}={row.get(key)!r}, "
                                 f"but this run asks for {key}={wanted[key]!r}; use a new --out or the same settings")


def identity(model: ModelSpec, settings: dict) -> dict:
    """The weights an image of `model` is drawn with (IDENTITY_KEYS); None where unknown (a Hub base model)."""
    return {"base_model_identity": settings.get("base_model_identity"), "lora_sha256": model.sha256}


def images_done(existing: list[dict], models: list[ModelSpec], settings: dict, out: Path) -> set:
    """(model, prompt_id, seed) of the images on disk that the same weights drew: the same path is not enough, a
    LoRA retrained in place must not be scored by its old images."""
    current = {m.name: identity(m, settings) for m in models}
    return {(r["model"], r["prompt_id"], r["seed"]) for r in existing
            if (out / r["path"]).is_file() and r["model"] in current
            and all(r.get(key) == current[r["model"]][key] for key in IDENTITY_KEYS)}


def generate(pipe, models: list[ModelSpec], prompts: list[tuple[str, str]], seeds: list[int], out: Path, *,
             settings: dict, batch_size: int = 4, lora_scale: float = 1.0, process_index: int = 0,
             num_processes: int = 1) -> int:
    """Generate every missing (model, prompt, seed) image, and every one drawn by other weights than this run's (a
    retrained LoRA); returns how many were made (by this process).

    Under `accelerate launch` process ``p`` of ``P`` takes every P-th image of each model (if missing) and records it in
    ``manifest.part-<p>.jsonl``; each image's noise comes from its own seed, so the images are those of one process.
    """
    manifest_path = out / "manifest.jsonl"
    existing = read_manifest(out)
    check_resumable(existing, models, prompts, settings, lora_scale, manifest_path)
    done = images_done(existing, models, settings, out)
    # Every P-th image of the full list (not of the missing ones): which process owns an image never depends on
    # what the others have written already.
    jobs = {m.name: [(pid, p, s) for pid, p in prompts for s in seeds][process_index::num_processes] for m in models}
    jobs = {name: [(pid, p, s) for pid, p, s in todo if (name, pid, s) not in done] for name, todo in jobs.items()}
    with_lora = [m for m in models if m.lora is not None and jobs[m.name]]
    for model in with_lora:  # a LoRA that does not load fails now, not after the other models' images
        load_lora(pipe, model.name, model.lora, model.weights, lora_scale, settings.get("base_model"))
        pipe.unload_lora_weights()
    if num_processes > 1:
        manifest_path = out / f"manifest.part-{process_index}.jsonl"
    total = sum(len(j) for j in jobs.values())
    made = 0
    with manifest_path.open("a", encoding="utf-8") as manifest, \
            progress_bar(total=total, desc="generate", unit="img", main_process=process_index == 0) as bar:
        for model in models:
            if not jobs[model.name]:
                continue
            with ExitStack() as weights:  # the model's weights on the pipeline, taken off again at the end
                if model.lora is not None:
                    load_lora(pipe, model.name, model.lora, model.weights, lora_scale, settings.get("base_model"))
                    weights.callback(pipe.unload_lora_weights)
                if model.full_model is not None:
                    weights.enter_context(denoiser_of(pipe, model))
                made += _generate_model(pipe, model, jobs[model.name], out, manifest, bar, settings=settings,
                                        batch_size=batch_size, lora_scale=lora_scale)
    return made


def _generate_model(pipe, model: ModelSpec, todo: list, out: Path, manifest, bar, *, settings: dict, batch_size: int,
                    lora_scale: float) -> int:
    """The images ``todo`` of one model, with its weights on ``pipe``; each recorded in ``manifest`` as it is saved."""
    import torch

    made = 0
    (out / "images" / model.name).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        # One CPU generator per image: its noise depends on (seed) only, not on batch or device.
        generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
        result = pipe(prompt=[p for _, p, _ in batch], generator=generators,
                      negative_prompt=[settings["negative_prompt"]] * len(batch) if settings["negative_prompt"] else None,
                      num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                      height=settings["height"], width=settings["width"])
        nsfw = getattr(result, "nsfw_content_detected", None) or [None] * len(batch)
        for (pid, prompt, seed), image, flagged in zip(batch, result.images, nsfw):
            rel = Path("images") / model.name / f"{file_stem(pid)}_seed{seed}.png"
            image.save(out / rel)
            row = {"model": model.name, "prompt_id": pid, "prompt": prompt, "seed": seed, "path": str(rel),
                   **settings, "lora": model.lora, "lora_scale": lora_scale if model.lora else None,
                   "full_model": model.full_model,
                   **identity(model, settings), "nsfw": flagged}
            manifest.write(json.dumps(row) + "\n")
            manifest.flush()  # resumable: every finished image is recorded at once
        made += len(batch)
        bar.update(len(batch))
    return made


