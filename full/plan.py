"""What a run will do before it starts: effective batch, steps, learning rate, schedule, and per-GPU memory by engine.

    python -m full.presets sd15-dpo-full --plan --engine ddp --num_processes 8
    python -m full.presets sdxl-dpo-full --plan --engine zero3

Memory per GPU in bytes, from the parameter shapes of the real architectures (full/models/footprint.py builds
full/models/configs/*.json on the meta device: nothing is downloaded or allocated). N UNet parameters, P processes, w bytes of the weight dtype:
ddp keeps 4N fp32 weights + 4N gradients + the optimizer state S whole (+ 4N DDP buckets when P > 1); zero2 a w-byte
module + the fp32 master weights, gradients (w bytes) and S split P ways; zero3 the module split too; fsdp fp32 flat
shards of all three. S: AdamW 2 fp32 moments per element; Adafactor (no first moment) a row and a column second
moment per matrix; 8-bit AdamW 2 bytes per element + an fp32 absmax per 256. Sharded engines step flat 1-D shards,
where Adafactor cannot factor. Shared rows: the frozen reference (w bytes per weight, whole on every GPU: it stays
outside the engine), the EMA (fp32), the VAE and text encoders, and the activations: ESTIMATED by tracing one forward
on the meta device and summing what autograd saves (attention counted as flash attention saves it).
docs/full_finetuning.md explains each row; tests/test_plan.py checks the exact rows against real tensors.

The rectified-flow families (sd3: SD3.5-medium, flux: FLUX.1-dev; docs/flow_matching.md) are planned the same way
with their transformer in the UNet's place: its architecture, the 16-channel VAE and the T5-XXL encoder are in
full/models/configs too (the published config.json's architecture keys), the LoRA on the family's attention targets
(`Family.lora_targets`), and the activations traced through the transformer at its T5 length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from full.models.families import get_family
from full.models.footprint import activation_bytes_per_image, buffer_count, count, parameter_shapes

FAMILIES = {"sd15": ("sd15_unet", ("vae", "clip_text_l14")),
            "sdxl": ("sdxl_unet", ("vae", "clip_text_l14", "clip_text_bigg14")),
            "sd3": ("sd35m_transformer",
                    ("flow_vae", "clip_text_l14_projection", "clip_text_bigg14", "t5_xxl_encoder")),
            "flux": ("flux1_transformer", ("flow_vae", "clip_text_l14", "t5_xxl_encoder"))}
IMAGES_PER_EXAMPLE = {"paired": 2, "binary": 1, "self_play": 2, "online": 2}  # a method row's data kind -> UNet images
GIB = 2 ** 30


@dataclass(frozen=True)
class Engine:
    title: str
    shards_state: bool  # gradients and optimizer state split across processes
    shards_params: bool  # the weights too
    deepspeed: bool  # the module is held in the training dtype; the fp32 master weights live in the optimizer shard


ENGINES = {
    "ddp": Engine("DDP (accelerate MULTI_GPU; one process: no wrapper)", False, False, False),
    "zero2": Engine("DeepSpeed ZeRO-2 (optimizer state + gradients sharded)", True, False, True),
    "zero3": Engine("DeepSpeed ZeRO-3 (+ weights sharded)", True, True, True),
    "fsdp": Engine("FSDP FULL_SHARD (weights, gradients, optimizer state sharded)", True, True, False),
}


def engine(name: str) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    return ENGINES[name]


def denoiser_word(family: str) -> str:
    """What the trained network is called in a plan: the UNet, or the flow families' transformer."""
    return {"unet": "UNet"}.get(get_family(family).denoiser, get_family(family).denoiser)


def is_flow(family: str) -> bool:
    """A rectified-flow transformer (SD3, FLUX): planned from the run's own config, its T5 length, its LoRA targets."""
    return get_family(family).denoiser == "transformer"


def config_source(name: str) -> str:
    return f"full/models/configs/{name}.json"


# ---- Optimizer state

ADAMW_MOMENTS, BNB_BLOCK, BNB_MIN_8BIT_SIZE = 2, 256, 4096  # AdamW: exp_avg, exp_avg_sq; bitsandbytes' blockwise


def optimizer_state_bytes(shapes, optimizer: str) -> int:
    """Bytes of ``optimizer.state`` after one step on fp32 parameters of these shapes."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adamw":
            total += ADAMW_MOMENTS * 4 * n + 4  # + the fp32 `step` tensor
        elif optimizer == "adafactor":  # factored: rows = shape[:-1], cols = shape[:-2] + shape[-1:]; + the RMS
            factored = len(shape) >= 2
            total += 4 * ((math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:])) if factored else n) + 4
        elif optimizer == "adamw_8bit":
            total += (2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 8 * n
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}; optimizers: adamw, adafactor, adamw_8bit")
    return total


# ---- Memory per GPU


@dataclass(frozen=True)
class Row:
    label: str
    bytes: int
    note: str = ""
    estimated: bool = False


def weight_bytes(mixed_precision: str) -> int:
    return 4 if mixed_precision in (None, "no") else 2


def trained_rows(shapes, engine_name: str, processes: int, optimizer: str, mixed_precision: str) -> list[Row]:
    """Weights, gradients, optimizer state (and DDP's buckets) of the trained parameters on one GPU."""
    e, n, w, p = engine(engine_name), count(shapes), weight_bytes(mixed_precision), processes
    if not e.shards_state:
        rows = [Row("trained weights", 4 * n, "fp32 master weights, whole"),
                Row("gradients", 4 * n, "fp32, whole"),
                Row("optimizer state", optimizer_state_bytes(shapes, optimizer), f"{optimizer}, per-tensor state")]
        if p > 1:
            rows.append(Row("DDP gradient buckets", 4 * n, "a copy of the gradients (torch DDP, "
                                                          "gradient_as_bucket_view=False)", estimated=True))
        return rows
    flat = optimizer_state_bytes([(math.ceil(n / p),)], optimizer)
    if e.deepspeed:
        module = w * n // (p if e.shards_params else 1)
        weights = Row("trained weights", module + 4 * math.ceil(n / p),
                      f"{w}-byte module{' shard' if e.shards_params else ''} + fp32 master shard (1/{p})")
        grads = Row("gradients", w * math.ceil(n / p), f"{w}-byte, shard 1/{p}")
    else:
        weights = Row("trained weights", 4 * math.ceil(n / p), f"fp32 flat shard 1/{p}")
        grads = Row("gradients", 4 * math.ceil(n / p), f"fp32 flat shard 1/{p}")
    return [weights, grads, Row("optimizer state", flat, f"{optimizer} on a flat 1-D shard 1/{p}")]


def model_denoiser_config(settings: dict, family: str) -> tuple[dict | None, str]:
    """A flow family's transformer config read from the run's own pipeline (``pretrained_model_name_or_path``: SD3
    medium, SD3.5 medium and large are all `sd3`, from 2B to 8B parameters), and where it came from; (None, "") for
    a preset or a UNet family (planned from their published architecture)."""
    pretrained = settings.get("pretrained_model_name_or_path")
    if not is_flow(family) or not pretrained:
        return None, ""
    fam = get_family(family)
    raw = fam.denoiser_class().load_config(pretrained, subfolder=fam.denoiser, revision=settings.get("revision"))
    return {k: v for k, v in raw.items() if not k.startswith("_") or k == "_class_name"}, \
        f"{pretrained}/{fam.denoiser}/config.json"


def memory_rows(family: str, settings: dict, engine_name: str, processes: int, *, images: int,
                with_reference: bool, denoiser_config: dict | None = None) -> list[Row]:
    """Per-GPU memory of a run: ``settings`` are the trainer's flag values (train_mode, optimizer, mixed_precision,
    rank, use_ema, cached_dir, resolution, gradient_checkpointing; a flow family's max_sequence_length); ``images``
    the UNet images per micro-batch; ``denoiser_config``: the trained network's config instead of the family's."""
    if family not in FAMILIES:
        raise ValueError(f"no plan for model family {family!r}; planned: {', '.join(FAMILIES)}")
    unet_name, frozen_names = FAMILIES[family]
    unet_name = denoiser_config or unet_name
    unet_shapes, word = parameter_shapes(unet_name), denoiser_word(family)
    n, w = count(unet_shapes), weight_bytes(settings.get("mixed_precision"))
    full = settings.get("train_mode", "lora") == "full"
    optimizer = settings.get("optimizer") or "adamw"
    if not full and engine_name not in ("ddp", "zero2"):
        raise ValueError(f"a LoRA run is planned for ddp or zero2 (train.sh's LoRA configs), not {engine_name}")
    if settings.get("use_ema") and not full:
        raise ValueError("--use_ema applies to --train_mode full")
    if settings.get("use_ema") and engine(engine_name).shards_params:
        raise ValueError(f"--use_ema with {engine_name}: the trainer refuses EMA when the weights are sharded")
    if full:
        rows = trained_rows(unet_shapes, engine_name, processes, optimizer, settings.get("mixed_precision"))
        if with_reference:
            rows.append(Row(f"frozen reference {word}", w * n,
                            "weight dtype, whole on every GPU (outside the engine)"))
    else:
        lora = parameter_shapes(unet_name, lora_rank=settings.get("rank") or 8, targets=get_family(family).lora_targets)
        rows = [Row(f"frozen base {word}", w * n, f"weight dtype; the reference is this {word} with adapters off")]
        rows += [Row(r.label.replace("trained", "LoRA"), r.bytes, r.note, r.estimated)
                 for r in trained_rows(lora, engine_name, processes, optimizer, settings.get("mixed_precision"))]
    buffers = buffer_count(unet_name)
    if buffers:
        rows.append(Row(f"{word} buffers", w * buffers * (2 if full and with_reference else 1),
                        "fixed position table, weight dtype" + (", in the policy and the reference copy"
                                                                if full and with_reference else "")))
    if settings.get("use_ema"):
        rows.append(Row("EMA", 4 * n, "fp32 copy of the trained weights (diffusers EMAModel)"))
    if not settings.get("cached_dir"):
        frozen = sum(count(parameter_shapes(name)) for name in frozen_names)
        rows.append(Row("VAE + text encoders", w * frozen, "weight dtype; 0 with --cached_dir" if not is_flow(family)
                        else f"weight dtype; {family}'s published VAE, CLIP and T5-XXL encoders"))
    fam = get_family(family)
    text_tokens = settings.get("max_sequence_length") or getattr(fam, "script_sequence_length", 77)  # T5's, or CLIP's
    per_image = activation_bytes_per_image(unet_name, settings.get("resolution") or fam.default_resolution,
                                           bool(settings.get("gradient_checkpointing")), text_tokens)
    rows.append(Row("activations", per_image * images,
                    f"{images} image(s) x {per_image / GIB:.2f} GiB, bf16, "
                    f"{'with' if settings.get('gradient_checkpointing') else 'without'} gradient checkpointing",
                    estimated=True))
    return rows


# ---- Batch, learning rate, schedule, and the printed plan


def accumulation_for(preset_processes: int, accumulation: int, processes: int) -> int:
    """The accumulation that keeps a preset's effective batch on ``processes`` GPUs (rounded up; train.sh uses it)."""
    return max(1, math.ceil(preset_processes * accumulation / processes))


def schedule_text(settings: dict, lr: float) -> str:
    name, warmup = settings["lr_scheduler"], settings["lr_warmup_steps"]
    steps = None if settings.get("num_train_epochs") else settings["max_train_steps"]
    if name == "inverse_sqrt" and steps:
        end = lr * math.sqrt(warmup / steps) if steps > warmup else lr * steps / max(warmup, 1)
        return (f"inverse_sqrt: linear warm-up over {warmup} steps, then lr x sqrt({warmup} / step); "
                f"lr at step {steps}: {end:.4g}" + (" (the run ends inside the warm-up)" if steps <= warmup else ""))
    return f"{name}, {warmup} warm-up steps"


def describe(settings: dict, *, family: str, method: str, engine_name: str, processes: int, title: str = "") -> str:
    """The plan of a run from its final flag values (a preset's, or a trainer's parsed flags for --dry_run)."""
    import os

    import minipref

    row = minipref.METHODS[method]
    settings = settings | {"mixed_precision": settings.get("mixed_precision")  # None: the accelerate config's
                           or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")}
    options = {option.name: settings.get(option.name, option.default) for option in row.options}
    batch, accumulation = settings["train_batch_size"], settings.get("gradient_accumulation_steps") or 1
    per_example = IMAGES_PER_EXAMPLE[row.data]
    effective = processes * batch * accumulation
    lr = settings["learning_rate"] * (effective if settings.get("scale_lr") else 1)
    denoiser_config, source = model_denoiser_config(settings, family)
    rows = memory_rows(family, settings, engine_name, processes, images=batch * per_example,
                       with_reference=row.reference(options), denoiser_config=denoiser_config)
    total, steps = sum(r.bytes for r in rows), None if settings.get("num_train_epochs") else settings["max_train_steps"]
    unit = "pairs" if per_example == 2 else "images"
    lines = [title or f"{family} {method}, --train_mode {settings.get('train_mode', 'lora')}",
             f"engine       {engine_name}: {engine(engine_name).title}; {processes} process(es)",
             f"batch        {processes} x {batch} per GPU x {accumulation} accumulation = {effective} {unit} per "
             f"optimizer step ({effective * per_example} {denoiser_word(family)} images)",
             f"steps        {steps} optimizer steps = {steps * effective:,} {unit} seen" if steps else
             "steps        from --num_train_epochs and the data size",
             "learning     " + (f"{settings['learning_rate']:g} x {effective} (--scale_lr) = {lr:.4g}"
                                if settings.get("scale_lr") else f"{lr:.4g} (not scaled)")
             + f"; optimizer {settings.get('optimizer') or 'adamw'}",
             f"schedule     {schedule_text(settings, lr)}",
             f"{denoiser_word(family):<13}{count(parameter_shapes(denoiser_config or FAMILIES[family][0])):,} "
             f"parameters ({source or config_source(FAMILIES[family][0])})",
             "", f"memory per GPU ({engine_name}, {processes} process(es), "
                 f"resolution {settings.get('resolution') or get_family(family).default_resolution}):"]
    for r in rows:
        mark = "~" if r.estimated else " "
        lines.append(f"  {r.label:<24}{mark}{r.bytes / GIB:8.2f} GiB {r.bytes:>16,} B  {r.note}"
                     + ("  [ESTIMATED]" if r.estimated else ""))
    lines.append(f"  {'total':<24}~{total / GIB:8.2f} GiB {total:>16,} B  (~: estimated rows included; "
                 "CUDA context, allocator slack and engine buffers not counted)")
    return "\n".join(lines)


def engine_from_environment() -> tuple[str, int]:
    """(engine, processes) of the `accelerate launch` this process runs under (its environment variables)."""
    import os

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp", processes
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return ("zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "zero2"), processes
    return "ddp", processes
