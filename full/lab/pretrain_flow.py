"""The lab's world as a tiny Stable Diffusion 3: an `SD3Transformer2DModel` pretrained with rectified flow.

`python -m full.lab --family sd3` (docs/lab_flow.md). Same scenes, captions and VAE as the UNet lab
(full/lab/pretrain.py: `train_vae` and `encode_pool` with the same settings and seed); the denoiser and its loss
are SD3's, and the result is saved with `StableDiffusion3Pipeline.save_pretrained`, so `full.train`, `full.evaluate`
and plain diffusers load it as they load SD3.5:

| part | SD3.5-medium | here |
|---|---|---|
| VAE | 16 latent channels, shift 0.0609, scale 1.5305 | the UNet lab's (4 channels, factor 4); `shift_factor = mean(z)`, `scaling_factor = 1 / std(z - shift)` as SD3's were chosen |
| transformer (`SD3Transformer2DModel`) | 24 joint blocks, width 1536, patch 2 | 4 joint blocks, width 64 (2 heads x 32), patch 2: 8 x 8 latents -> 16 tokens |
| text encoders | CLIP-L, CLIP-G (with projection), T5-XXL | two `CLIPTextModelWithProjection` (2 layers x 32, 16 tokens, pooled 32 + 32) and a `T5EncoderModel` (1 layer x 64) |
| tokenizers | CLIP BPE x2, T5 SentencePiece | the UNet lab's CLIP tokenizer (every byte + the caption words) x2; a `T5Tokenizer` of the caption words |
| scheduler | `FlowMatchEulerDiscreteScheduler(shift=3.0)` | the same |

Training (`train_transformer`), as the diffusers SD3 scripts train (full/models/flow.py):

    sigma ~ SD3's script density (logit-normal(0, 1) on the shifted table)   flow.sample_timesteps
    x_t = (1 - sigma) z + sigma eps                                           flow.add_noise
    L = mean |v_theta(x_t, 1000 sigma, c) - (eps - z)|^2                      flow.velocity_target

with the three text encoders trained together with the transformer (the UNet lab trains its CLIP with the UNet:
there is no pretrained text encoder at this size), prompts encoded by the pipeline's own `encode_prompt` (so the
conditioning is exactly what sampling and the trainers compute), 10% empty captions for classifier-free guidance,
EMA weights saved. `held_out_flow_loss` measures the loss of the model before and after training on the same
fixed (latent, caption, sigma, noise) draws: the test's "pretraining lowered the flow loss".
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from full.lab import shapes
from full.lab.presets import FlowPretrainConfig
from full.lab.pretrain import (TOKEN_LENGTH, VOCABULARY, build_parts, build_tokenizer, ema_update, encode_pool,
                               optimizer_step, train_vae)

FAMILY = "sd3"


def cache_key(config: FlowPretrainConfig) -> dict:
    """What decides a pretrained flow model: its config, its tokenizer and the family."""
    return {**asdict(config), "vocabulary": VOCABULARY, "context": TOKEN_LENGTH, "family": FAMILY}


def build_t5_tokenizer():
    """A real `T5Tokenizer` (Unigram, SentencePiece "▁word" pieces) of the lab's words and their letters."""
    from transformers import T5Tokenizer

    letters = sorted({c for w in VOCABULARY for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in VOCABULARY] + [(c, -5.0) for c in letters] + [(",", -5.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_flow_parts(config: FlowPretrainConfig) -> dict:
    """The SD3 pipeline's parts, untrained: the VAE built as the UNet lab's (same seed), the rest seeded after it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    vae = build_parts(config)["vae"]  # seeded by config.seed exactly as the UNet lab's VAE
    torch.manual_seed(config.seed + 5)
    tokenizer = build_tokenizer(VOCABULARY)
    tokenizer_3 = build_t5_tokenizer()
    width = config.clip_text_width

    def clip_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TOKEN_LENGTH, projection_dim=width,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    joint = 2 * width  # the two CLIPs' hidden states concatenated = T5's width (the pipeline pads CLIP to T5's)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=joint, d_kv=joint // 4,
                                             d_ff=2 * joint, num_layers=1, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1))
    latent_size = shapes.RESOLUTION // 2 ** (len(config.vae_channels) - 1)  # 8
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=4, out_channels=4, num_layers=config.transformer_layers,
        attention_head_dim=config.transformer_head_dim, num_attention_heads=config.transformer_heads,
        joint_attention_dim=joint, caption_projection_dim=config.transformer_heads * config.transformer_head_dim,
        pooled_projection_dim=2 * width, pos_embed_max_size=latent_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's scheduler config
    return dict(transformer=transformer, vae=vae, text_encoder=clip_encoder(), tokenizer=tokenizer,
                text_encoder_2=clip_encoder(), tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
                tokenizer_3=tokenizer_3, scheduler=scheduler)


def pipeline(parts: dict):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**parts)


def encoders(parts: dict) -> list:
    return [parts["text_encoder"], parts["text_encoder_2"], parts["text_encoder_3"]]


def encode(pipe, prompts: list[str], config: FlowPretrainConfig):
    """The pipeline's own `encode_prompt` (with gradients): (N, 16 + t5_length, 64) hidden states, (N, 64) pooled."""
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=config.t5_length)
    return hidden, pooled


class FlowBatches:
    """Draws (latents, caption index, timesteps, sigmas, noise) the way SD3's script draws them."""

    def __init__(self, schedule, means, stds, captions, scaling, shift, config: FlowPretrainConfig, seed: int):
        from full.models import flow

        self.flow, self.schedule = flow, schedule
        self.means, self.stds, self.scaling, self.shift, self.config = means, stds, scaling, shift, config
        self.prompts = ["", *dict.fromkeys(captions)]
        self.caption_index = torch.tensor([self.prompts.index(c) for c in captions])
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, size: int, dropout: float):
        g, flow = self.generator, self.flow
        batch = torch.randint(0, len(self.caption_index), (size,), generator=g)
        z = self.means[batch] + self.stds[batch] * torch.randn(self.means[batch].shape, generator=g)
        latents = (z - self.shift) * self.scaling  # what full.models.pipeline.encode_images gives the trainers
        which = self.caption_index[batch]
        which = torch.where(torch.rand(size, generator=g) < dropout, torch.zeros_like(which), which)  # 0: ""
        noise = torch.randn(latents.shape, generator=g)
        timesteps, sigmas = flow.sample_timesteps(self.schedule, size, flow.SD3_SCRIPT_SAMPLING, generator=g)
        return latents, which, noise, timesteps, sigmas


def flow_loss(parts, pipe, batches: FlowBatches, latents, which, noise, timesteps, sigmas, config) -> torch.Tensor:
    from full.models import flow

    hidden, pooled = encode(pipe, batches.prompts, config)
    noisy = flow.add_noise(latents, noise, sigmas)  # x_t = (1 - sigma) x0 + sigma eps
    prediction = parts["transformer"](hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden[which],
                                      pooled_projections=pooled[which]).sample
    return (prediction - flow.velocity_target(latents, noise)).pow(2).mean()  # |v_theta - (eps - x0)|^2


@torch.no_grad()
def held_out_flow_loss(parts, pipe, batches: FlowBatches, draws, config) -> float:
    """The flow loss on fixed draws (no caption dropout), in eval mode: before vs after pretraining."""
    modules = [parts["transformer"], *encoders(parts)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    loss = sum(flow_loss(parts, pipe, batches, *d, config).item() for d in draws) / len(draws)
    for m, mode in zip(modules, modes):
        m.train(mode)
    return loss


def train_transformer(parts, means, stds, captions, scaling, shift, config: FlowPretrainConfig, log) -> dict:
    from full.models import flow

    pipe = pipeline(parts)
    schedule = flow.training_schedule(parts["scheduler"].config)
    batches = FlowBatches(schedule, means, stds, captions, scaling, shift, config, seed=config.seed + 2)
    held_out = FlowBatches(schedule, means, stds, captions, scaling, shift, config, seed=config.seed + 7)
    draws = [held_out.draw(64, 0.0) for _ in range(4)]
    loss_before = held_out_flow_loss(parts, pipe, held_out, draws, config)
    params = [*parts["transformer"].parameters(), *(p for e in encoders(parts) for p in e.parameters())]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    for module in (parts["transformer"], *encoders(parts)):
        module.train()
    running = None
    for step in range(config.unet_steps):
        loss = flow_loss(parts, pipe, batches, *batches.draw(config.unet_batch, config.caption_dropout), config)
        optimizer_step(optimizer, loss, config.unet_lr, step, config.unet_steps, clip_params=params)
        ema_update(ema, params, step, config.ema_decay)  # as the UNet lab's EMA
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        log("transformer", step + 1, config.unet_steps, loss=running)
    with torch.no_grad():
        for average, p in zip(ema, params):
            p.copy_(average)
    for module in (parts["transformer"], *encoders(parts)):
        module.eval()
    loss_after = held_out_flow_loss(parts, pipe, held_out, draws, config)
    return {"transformer_final_loss": running, "flow_loss_before": loss_before, "flow_loss_after": loss_after}


def pretrain(out, config: FlowPretrainConfig, log=lambda *a, **k: None) -> dict:
    """Build, train and `save_pretrained` the SD3 pipeline into `out`; returns (and writes) `out/pretrain.json`."""
    out = Path(out)
    start = time.perf_counter()
    parts = build_flow_parts(config)
    report = {"config": cache_key(config), "family": FAMILY}
    report.update(train_vae(parts["vae"], config, log))
    report["vae_seconds"] = time.perf_counter() - start
    means, stds, captions = encode_pool(parts["vae"], config)
    # SD3's VAE normalisation, latents = (z - shift) * scale, with shift = mean(z) and scale = 1 / std(z - shift)
    shift = float(means.mean())
    scaling = float(1.0 / (means - shift).std())
    parts["vae"].register_to_config(shift_factor=shift, scaling_factor=scaling)
    report.update(shift_factor=shift, scaling_factor=scaling)
    report.update(train_transformer(parts, means, stds, captions, scaling, shift, config, log))
    pipeline(parts).save_pretrained(str(out))
    report["seconds"] = time.perf_counter() - start
    report["parameters"] = {name: sum(p.numel() for p in parts[name].parameters())
                            for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    (out / "pretrain.json").write_text(json.dumps(report, indent=1))
    return report
