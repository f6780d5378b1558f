"""Per-step time and peak memory of every offline method against an SFT step on the same images.

    python -m full.bench                                   # tiny UNet on the CPU (seconds)
    python -m full.bench --config sd15 --device cuda --resolution 512 --batch_size 4 --dtype bf16
    python -m full.bench --data                            # the data loader vs rows (full/data/bench.py)

Models are built from configs with random weights (no download): `--config sd15` is the real SD1.5
architecture (860M-parameter UNet, its VAE and CLIP ViT-L text encoder). Every method runs the trainer's
own step (`full.denoise` + the method's row, LoRA rank 8, AdamW) on the same `2B` images: `B` pairs for the
paired methods, the same `2B` images as per-image feedback for the binary ones. Two modes:

* `uncached`: pixels through the VAE and token ids through the text encoder every step (tokenisation, which is
  negligible, is left out);
* `cached`: latents and prompt embeddings given, as `--cached_dir` training does.

Targets (issue 4): a DPO step <= 1.5x the SFT step (the reference forward is the only extra work); DPO peak
memory <= SFT peak + the activations of one no-grad forward; cached >= 1.5x faster than uncached at 512 px on GPU.
Peak memory is the increase over the memory held before the step (weights, optimizer state): CUDA's
`max_memory_allocated` on a GPU; on the CPU the process RSS sampled every millisecond, with glibc told to hand
large frees back to the OS so that RSS follows live tensors (coarser: +-1 MB, allocator slack included).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from minipref.methods import get_method

from full import models
from full.data.rows import data_kind_for
from full.trainers.denoise import StepInputs, denoise
from full.trainers.offline import objective_for, offline_methods, parse_args

METHODS = tuple(offline_methods())  # the offline rows of the method table

CONFIGS = {
    "tiny": dict(
        unet=dict(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        vae=dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32),
        text=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    ),
    "sd15": dict(  # runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json
        unet=dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, attention_head_dim=8, norm_num_groups=32),
        vae=dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                 sample_size=512),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
    ),
}


def build_parts(config: str) -> models.Components:
    """SD1.5-family components with random weights from a config (the pipeline is never downloaded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = CONFIGS[config]
    unet = UNet2DConditionModel(**spec["unet"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    parts = models.Components("sd15", f"<{config} config>", unet, scheduler, vae=AutoencoderKL(**spec["vae"]),
                              text_encoders=[CLIPTextModel(CLIPTextConfig(**spec["text"]))])
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        module.requires_grad_(False)
    models.add_lora(parts.unet, rank=8)
    return parts


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def release_freed_memory() -> None:
        """On glibc, make large frees return to the OS (fixed mmap threshold) and trim the heap, so that the
        resident set tracks live tensors and its peak during a step is that step's memory."""
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: no dynamic growth, big blocks are mmapped and unmapped
        libc.malloc_trim(0)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.release_freed_memory()
            self.base, self.high, self.running = self._rss(), self._rss(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.high = max(self.high, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = self.high - self.base


def method_args(method: str):
    extra = ["--embedding_column", "unused"] if get_method(method).needs_embeddings else []
    return parse_args(["--pretrained_model_name_or_path", "-", "--method", method, "--output_dir", "-",
                       "--dataset_name", "-", *extra])


def make_batch(parts, pairs: int, resolution: int, device, generator) -> dict:
    """One fixed batch: `pairs` pairs = 2 * pairs images, their token ids, latents and prompt embeddings."""
    pixels = torch.rand(2 * pairs, 3, resolution, resolution, generator=generator).mul(2).sub(1).to(device)
    ids = torch.randint(0, parts.text_encoders[0].config.vocab_size, (pairs, 77), generator=generator).to(device)
    with torch.no_grad():
        latents = models.encode_images(parts, pixels).float()
        hidden = parts.text_encoders[0](ids, return_dict=False)[0].float()
    return {"pixels": pixels, "ids": ids, "latents": latents, "hidden": hidden}


def step_inputs(parts, batch: dict, method: str, cached: bool) -> StepInputs:
    """The trainer's StepInputs: pairs (n=2, winners then losers) or the same 2B images as feedback (n=1)."""
    if cached:
        latents, hidden = batch["latents"], batch["hidden"]
    else:
        latents = models.encode_images(parts, batch["pixels"]).float()
        with torch.no_grad():
            hidden = parts.text_encoders[0](batch["ids"], return_dict=False)[0].float()
    pairs = hidden.shape[0]
    prompt = models.PromptEmbeds(hidden.repeat(2, 1, 1))  # (B, L, D) -> (2B, L, D): a pair shares its prompt
    if data_kind_for(method) == "pairs":
        embeddings = torch.nn.functional.normalize(torch.randn(pairs, 2, 64, device=latents.device), dim=-1)
        return StepInputs(latents, prompt, None, n=2, embeddings=embeddings)
    desirable = torch.arange(2 * pairs, device=latents.device) < pairs  # winners desirable, losers not
    return StepInputs(latents, prompt, None, n=1, desirable=desirable)


def run_step(parts, optimizer, batch, method, objective, cached, generator, dtype):
    device = batch["latents"].device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with autocast:
        inputs = step_inputs(parts, batch, method, cached)
        # the reference as the LoRA trainer makes it: the same UNet with its adapter off, no graph
        reference = lambda x, t, c: models.reference_forward(parts.unet, x, t, c)  # noqa: E731
        pred, ref_pred, target = denoise(parts.unet, reference, parts.noise_scheduler, "sd15", inputs,
                                         with_reference=objective.needs_reference, generator=generator,
                                         weight_dtype=dtype)
        out = objective.loss(pred, ref_pred, target, inputs)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_step(fn, device, steps: int, warmup: int) -> float:
    """Median seconds per call over `steps` calls, after `warmup` calls.

    GPU: wall time between synchronisations. CPU with one intra-op thread: the CPU time of this thread, which a
    busy neighbour on a shared machine does not inflate (with more threads: wall time).
    """
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.thread_time if not cuda and torch.get_num_threads() == 1 else time.perf_counter
    times = []
    for _ in range(steps):
        sync()
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


def peak_of_step(fn, device) -> int:
    """Bytes above the level before the call, at the call's peak (one warm call first)."""
    fn()
    with PeakMemory(device) as memory:
        fn()
    return memory.peak


def data_parser() -> argparse.ArgumentParser:
    """`python -m full.bench --data`'s flags (full/data/bench.py runs it)."""
    from full.data.allocators import ALLOCATOR_SETTINGS
    from full.data.bench import READERS, ROW_SIZES

    p = argparse.ArgumentParser(prog="full.bench --data", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=list(ROW_SIZES))
    p.add_argument("--workdir", default=None, help="where the parquet and the datasets cache go (default: a tmp dir)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--allocator", nargs="+", choices=tuple(ALLOCATOR_SETTINGS), default=["chosen"],
                   help="allocator settings to run the readers with (full/data/allocators.py): chosen (what "
                        "full/launch/train.sh sets), none, pool (ARROW_DEFAULT_MEMORY_POOL=system), mmap "
                        "(MALLOC_MMAP_THRESHOLD_=65536), both, pool+mmap4m")
    p.add_argument("--resolution", type=int, nargs="+", default=[256], help="training resolution(s), px")
    p.add_argument("--image_px", type=int, default=None, help="size of the JPEGs (default: the resolution)")
    p.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS[:2]),
                   help="which readers to run (default: loader stream)")
    p.add_argument("--plot", default=None, help="draw start-up time and memory against the rows into this PNG")
    p.add_argument("--model", default=None, help="--readers train: a diffusers SD1.5/SDXL folder full.train loads")
    p.add_argument("--_reader", nargs=2, help=argparse.SUPPRESS)  # internal: mode, path (one fresh process each)
    return p


def main(argv=None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--data" in argv:  # the data benchmark: full/data/bench.py
        from full.data import bench as data_bench

        parser = data_parser()
        args = parser.parse_args([a for a in argv if a != "--data"])
        if "train" in args.readers and not (args.model or args._reader):
            parser.error("--readers train runs full.train: give --model DIR (a diffusers SD1.5 or SDXL folder)")
        if args._reader:  # one reader in this fresh process: its figures as the last line of output
            print(json.dumps(data_bench.run_reader(*args._reader, resolution=args.resolution[0], model=args.model)))
            return {}
        return data_bench.run(args.rows, args.readers, workdir=args.workdir, allocators=args.allocator,
                              resolutions=args.resolution, image_px=args.image_px, model=args.model, out=args.out,
                              plot=args.plot)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=tuple(CONFIGS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4, help="pairs per step (2x images)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: stable figures on a shared box)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    parts = build_parts(args.config)
    models.place_components(parts, device, dtype, fixed_vae=True)
    from diffusers.training_utils import cast_training_params

    cast_training_params(parts.unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(models.lora_parameters(parts.unet), lr=1e-6)
    batch = make_batch(parts, args.batch_size, args.resolution, device, torch.Generator().manual_seed(0))
    generator = torch.Generator(device).manual_seed(0)

    # The memory a reference forward adds: one no-grad UNet forward over the 2B latents.
    def reference_only():
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        inputs = step_inputs(parts, batch, "dpo", cached=True)
        with autocast, torch.no_grad():
            noisy = batch["latents"].to(dtype)
            t = torch.full((noisy.shape[0],), 500, device=device)
            models.reference_forward(parts.unet, noisy, t, {"encoder_hidden_states": inputs.prompt.hidden.to(dtype)})

    # each method's objective resolved once (beta and its log line), not inside the timed step
    steps = {(method, cached): (lambda m=method, c=cached, o=objective_for(method_args(method), "sd15"):
                                run_step(parts, optimizer, batch, m, o, c, generator, dtype))
             for cached in (False, True) for method in args.methods}
    # Timing first; then memory, for which the CPU path changes how malloc returns memory (slower, exact peaks).
    seconds = {key: time_step(fn, device, args.steps, args.warmup) for key, fn in steps.items()}
    nograd_seconds = time_step(reference_only, device, args.steps, args.warmup)
    peaks = {key: peak_of_step(fn, device) for key, fn in steps.items()}
    nograd_peak = peak_of_step(reference_only, device)
    results = {"config": vars(args), "clock": "wall" if device.type == "cuda" or args.threads > 1 else "thread CPU",
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "nograd_forward": {"ms": nograd_seconds * 1e3, "peak_mb": nograd_peak / 2**20},
               "steps": {f"{m}/{'cached' if c else 'uncached'}": {"ms": seconds[m, c] * 1e3, "peak_mb": peaks[m, c] / 2**20}
                         for m, c in steps}}
    print_table(results, args.methods)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


def print_table(results: dict, methods) -> None:
    """Per method and mode: time and its ratio to SFT, next to what "SFT + one no-grad forward" predicts; peak
    memory next to the budget "SFT peak + no-grad forward peak"; and the speed-up a cache gives."""
    steps, nograd, cfg = results["steps"], results["nograd_forward"], results["config"]
    print(f"\n{cfg['config']} UNet, {cfg['resolution']} px, {cfg['batch_size']} pairs = {2 * cfg['batch_size']} "
          f"images, {cfg['dtype']}, {results['device_name']} ({results['clock']} time); "
          f"no-grad forward of the 2B images: {nograd['ms']:.1f} ms, +{nograd['peak_mb']:.1f} MB")
    header = ("method", "mode", "ms/step", "x SFT", "SFT+ref ms", "peak MB", "SFT+ref MB", "uncached/cached")
    print("".join(f"{h:>{w}}" for h, w in zip(header, (8, 10, 10, 8, 12, 10, 12, 17))))
    for mode in ("uncached", "cached"):
        sft = steps.get(f"sft/{mode}")
        for method in methods:
            row = steps[f"{method}/{mode}"]
            cells = [method, mode, f"{row['ms']:.1f}", f"{row['ms'] / sft['ms']:.2f}" if sft else "-",
                     f"{sft['ms'] + nograd['ms']:.1f}" if sft else "-", f"{row['peak_mb']:.1f}",
                     f"{sft['peak_mb'] + nograd['peak_mb']:.1f}" if sft else "-",
                     f"{steps[f'{method}/uncached']['ms'] / steps[f'{method}/cached']['ms']:.2f}"]
            print("".join(f"{c:>{w}}" for c, w in zip(cells, (8, 10, 10, 8, 12, 10, 12, 17))))


if __name__ == "__main__":
    main()
