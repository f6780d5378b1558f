"""Build and pretrain the lab's text-to-image model: Stable Diffusion 1.5's architecture, 1-2 M parameters.

The parts are the ones `StableDiffusionPipeline` has, built from configs and trained here, so every `full/`
command loads the result exactly as it loads SD1.5 (`--pretrained_model_name_or_path runs/lab/model`):

| part | SD1.5 | here |
|---|---|---|
| VAE (`AutoencoderKL`) | 512 px -> 64 x 64 x 4, factor 8 | 32 px -> 8 x 8 x 4, factor 4 (3 blocks, 16-32-32 channels) |
| UNet (`UNet2DConditionModel`) | 320-640-1280-1280, cross-attention 768 | 32-64, cross-attention 64, one layer per block |
| text encoder (`CLIPTextModel`) | 12 layers, 768 wide, 77 tokens | 2 layers, 64 wide, 16 tokens |
| tokenizer (`CLIPTokenizer`) | byte-level BPE, 49k tokens | byte-level BPE, every byte + the caption words |
| scheduler | PNDM for sampling, DDPM betas for training | DDIM for sampling, the same DDPM betas (scaled_linear 0.00085-0.012, T = 1000) |

Training, in the order of the real thing:

1. **VAE** on rendered scenes: `L = mean |x - D(z)|^2 + kl_weight * KL(q(z|x) || N(0, I))`, z sampled.
   Afterwards `scaling_factor = 1 / std(z)` (SD1.5's 0.18215 was chosen the same way), so the UNet sees
   unit-variance latents.
2. **UNet and text encoder together** (SD1.5 kept a pretrained CLIP frozen; we have none, so the encoder learns
   the 36 captions with the UNet) on a fixed pool of encoded scenes: epsilon prediction,
   `L = mean |eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c)|^2`, with the caption replaced by ""
   for `caption_dropout` of the items so that classifier-free guidance works at sampling time. The weights
   saved are an exponential moving average (decay `ema_decay`), as in most diffusion pretraining.

Everything is seeded; `pretrain(out, config)` writes `out/` with `save_pretrained` and `out/pretrain.json`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from minipref.sft import BAD_PREFIX, GOOD_PREFIX

from full.lab import shapes
from full.lab.presets import PretrainConfig

# The words the tokenizer spells as one token each: every caption word, and the words of CSFT's prompt prefixes
# ("good image, " / "bad image, ", paper 001 Sec. 5.1.2; the comma is one byte, already a token). Spelt byte by byte
# the prefix was 8 tokens pretraining never saw and pushed the prompt past the context.
VOCABULARY = sorted({w for text in (*shapes.ALL_CAPTIONS, GOOD_PREFIX, BAD_PREFIX) for w in re.findall(r"[a-z]+", text)})
# The longest prompt any method uses, "good image, a magenta triangle on a light background", is 12 tokens:
# start, 10 words and the comma, end.
TOKEN_LENGTH = 16


# ---------------------------------------------------------------------------------------------------------------
# The parts, from configs
# ---------------------------------------------------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet: the 256 bytes as printable characters (printable ones stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def build_tokenizer(words: list[str], max_length: int = TOKEN_LENGTH):
    """A real `CLIPTokenizer`: every byte (so any text tokenizes) plus one token per caption word, made by merges."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    merges = []
    for word in sorted(set(words)):
        # "red" -> "r e d</w>" -> "re d</w>" -> "red</w>": merge the first two pieces until one is left
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as tmp:  # through files, the way a hub checkpoint ships them
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, pad_token="<|endoftext|>")


def cache_key(config: PretrainConfig) -> dict:
    """What decides a pretrained model: its config and its tokenizer (a cached model with other words is stale)."""
    return {**vars(config), "vocabulary": VOCABULARY, "context": TOKEN_LENGTH}


def build_parts(config: PretrainConfig) -> dict:
    """Untrained tokenizer, text encoder, VAE, UNet and the sampling scheduler, seeded by `config.seed`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(VOCABULARY)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=2 * config.text_width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKEN_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=shapes.RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=8)
    latent_size = shapes.RESOLUTION // 2 ** (len(config.vae_channels) - 1)  # 32 / 4 = 8
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=config.unet_channels, layers_per_block=1, cross_attention_dim=config.text_width,
        attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1], what the VAE (and every SD script) takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak (a multiplier for the peak learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: list, params: list, step: int, ema_decay: float) -> None:
    """EMA with a warm-up: decay min(d, (1 + step) / (10 + step)), so early weights are forgotten quickly."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    for average, p in zip(ema, params):
        average.lerp_(p.detach(), 1 - decay)


def optimizer_step(optimizer, loss, peak_lr: float, step: int, total: int, clip_params=None) -> None:
    """This step's learning rate (5% warm-up, cosine to 10%), backward, optional clipping at norm 1, AdamW step."""
    for group in optimizer.param_groups:
        group["lr"] = peak_lr * cosine_lr(step, total, total // 20)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()


# ---------------------------------------------------------------------------------------------------------------
# 1. The VAE
# ---------------------------------------------------------------------------------------------------------------


def train_vae(vae, config: PretrainConfig, log) -> dict:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()
    for step in range(config.vae_steps):
        images, _ = shapes.make_images(config.vae_batch, seed=config.seed * 1_000_003 + step)
        x = to_pixels(images)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = (reconstruction - x).pow(2).mean()
        # KL(q(z|x) || N(0, I)) per latent element; small: the latents only need to stay bounded and smooth
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + config.kl_weight * kl
        optimizer_step(optimizer, loss, config.vae_lr, step, config.vae_steps)
        log("vae", step + 1, config.vae_steps, mse=mse.item())
    vae.eval()
    return {"vae_final_mse": mse.item()}


@torch.no_grad()
def encode_pool(vae, config: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The UNet's training set: `pool_size` scenes, encoded once. Returns the posterior means and stds
    (N, 4, 8, 8) and the captions; each step draws a fresh latent sample from them."""
    images, scenes = shapes.make_images(config.pool_size, seed=config.seed + 1)
    means, stds = [], []
    for chunk in torch.split(to_pixels(images), 256):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), [s.caption for s in scenes]


# ---------------------------------------------------------------------------------------------------------------
# 2. The UNet (and the text encoder), on latents
# ---------------------------------------------------------------------------------------------------------------


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids  # (N, 16)


def train_unet(parts: dict, means, stds, captions, scaling_factor: float, config: PretrainConfig, log) -> dict:
    from diffusers import DDPMScheduler

    unet, text_encoder = parts["unet"], parts["text_encoder"]
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)  # the training noise, as every SD script
    # The vocabulary of prompts is small: encode each distinct one once per step and index into it.
    prompts = ["", *dict.fromkeys(captions)]
    ids = token_ids(parts["tokenizer"], prompts)
    caption_index = torch.tensor([prompts.index(c) for c in captions])
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(config.seed + 2)
    unet.train()
    text_encoder.train()
    running = None
    for step in range(config.unet_steps):
        batch = torch.randint(0, len(captions), (config.unet_batch,), generator=generator)
        latents = (means[batch] + stds[batch] * torch.randn(means[batch].shape, generator=generator)) * scaling_factor
        which = caption_index[batch]
        dropped = torch.rand(config.unet_batch, generator=generator) < config.caption_dropout
        which = torch.where(dropped, torch.zeros_like(which), which)  # index 0 is the empty prompt
        context = text_encoder(ids)[0][which]  # (B, 16, width)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.unet_batch,), generator=generator)
        # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        loss = (unet(noisy, timesteps, context).sample - noise).pow(2).mean()
        optimizer_step(optimizer, loss, config.unet_lr, step, config.unet_steps, clip_params=params)
        ema_update(ema, params, step, config.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        log("unet", step + 1, config.unet_steps, loss=running)
    with torch.no_grad():
        for average, p in zip(ema, params):
            p.copy_(average)
    unet.eval()
    text_encoder.eval()
    return {"unet_final_loss": running}


# ---------------------------------------------------------------------------------------------------------------
# Everything, saved as a pipeline
# ---------------------------------------------------------------------------------------------------------------


def pretrain(out, config: PretrainConfig, log=lambda *a, **k: None) -> dict:
    """Build, train and `save_pretrained` the pipeline into `out`; returns (and writes) `out/pretrain.json`."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    start = time.perf_counter()
    parts = build_parts(config)
    report = {"config": cache_key(config)}
    report.update(train_vae(parts["vae"], config, log))
    report["vae_seconds"] = time.perf_counter() - start
    means, stds, captions = encode_pool(parts["vae"], config)
    scaling_factor = float(1.0 / means.std())  # unit-variance latents for the UNet
    parts["vae"].register_to_config(scaling_factor=scaling_factor)
    report["scaling_factor"] = scaling_factor
    report.update(train_unet(parts, means, stds, captions, scaling_factor, config, log))
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    report["seconds"] = time.perf_counter() - start
    report["parameters"] = {name: sum(p.numel() for p in parts[name].parameters())
                            for name in ("unet", "vae", "text_encoder")}
    (out / "pretrain.json").write_text(json.dumps(report, indent=1))
    return report
