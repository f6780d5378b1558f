"""The footprint of the real architectures, built on the meta device (nothing downloaded or allocated): their
parameter shapes (whole, or a LoRA's on given targets), fixed buffers, and the bytes autograd keeps for one image
through a UNet or a flow transformer (ESTIMATED by tracing one forward; attention counted as flash attention saves
it). The configs are full/models/configs/*.json: the architecture keys of the published config.json files.
`full.plan` turns these into per-GPU memory rows; tests/test_plan.py checks them against real tensors.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VAE_FACTOR = 8  # every family's VAE downsamples 3 times


# ---- Parameter shapes from configs (meta device)


def load_config(name: str) -> dict:
    """A config of full/models/configs (its `_class_name` kept; other `_` keys dropped)."""
    if name == "clip_text_l14_projection":  # SD3's text_encoder: CLIP ViT-L/14 with its projection
        return load_config("clip_text_l14") | {"_class_name": "CLIPTextModelWithProjection"}
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_") or k == "_class_name"}


def _build_on_meta(config: dict, dtype=torch.float32):
    kind, values = config.get("_class_name", "UNet2DConditionModel"), {k: v for k, v in config.items() if k[0] != "_"}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            if kind.startswith("CLIPText") or kind.startswith("T5"):
                import transformers

                config_class = transformers.CLIPTextConfig if kind.startswith("CLIPText") else transformers.T5Config
                return getattr(transformers, kind)(config_class(**values))
            import diffusers

            return getattr(diffusers, kind).from_config(values)
    finally:
        torch.set_default_dtype(default)


@lru_cache(maxsize=16)
def _shapes(config_json: str, lora_rank: int | None, targets: tuple[str, ...] | None) -> tuple[tuple[int, ...], ...]:
    model = _build_on_meta(json.loads(config_json))
    if lora_rank is None:
        return tuple(tuple(p.shape) for p in model.parameters())
    from full.models.lora import LORA_TARGET_MODULES

    shapes = []
    for name, module in model.named_modules():  # peft's match: the name is a target or ends with "." + target
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t)
                                                       for t in targets or LORA_TARGET_MODULES):
            shapes += [(lora_rank, module.in_features), (module.out_features, lora_rank)]  # peft's lora_A, lora_B
    return tuple(shapes)


def parameter_shapes(config: dict | str, lora_rank: int | None = None,
                     targets: tuple[str, ...] | None = None) -> tuple[tuple[int, ...], ...]:
    """The shapes of a model's parameters (``lora_rank``: of a LoRA on its attention projections instead, the
    modules ``targets`` names, default the UNet's `LORA_TARGET_MODULES`)."""
    config = load_config(config) if isinstance(config, str) else config
    return _shapes(json.dumps(dict(config), sort_keys=True, default=list), lora_rank,
                   None if targets is None else tuple(targets))


def count(shapes) -> int:
    return sum(math.prod(shape) for shape in shapes)


@lru_cache(maxsize=16)
def _buffer_count(config_json: str) -> int:
    return sum(b.numel() for b in _build_on_meta(json.loads(config_json)).buffers() if b.is_floating_point())


def buffer_count(config: dict | str) -> int:
    """Floating-point buffers: fixed tables held beside the weights (SD3's sin-cos position table, 384^2 x 1536)."""
    config = load_config(config) if isinstance(config, str) else config
    return _buffer_count(json.dumps(dict(config), sort_keys=True, default=list))


# ---- Activations (estimated)


class _FlashLikeAttention(torch.autograd.Function):
    """What flash / memory-efficient attention keeps for the backward: q, k, v, the output, the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the trace stops after the forward
        raise NotImplementedError


def _denoiser_inputs(config: dict, side: int, text_tokens: int, meta: dict) -> tuple[tuple, dict, tuple]:
    """(args, kwargs) of one forward of a UNet or a flow transformer on one image, and its checkpointed blocks."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    kind = config.get("_class_name", "UNet2DConditionModel")
    if kind == "SD3Transformer2DModel":  # CLIP-L + G (77, zero-padded to T5's width) then T5's tokens
        kwargs = {"hidden_states": torch.empty(1, config["in_channels"], side, side, **meta),
                  "encoder_hidden_states": torch.empty(1, 77 + text_tokens, config["joint_attention_dim"], **meta),
                  "pooled_projections": torch.empty(1, config["pooled_projection_dim"], **meta),
                  "timestep": torch.tensor([500.0], device="meta")}
        return (), kwargs, (JointTransformerBlock,)
    if kind == "FluxTransformer2DModel":  # packed 2x2 tokens
        tokens = (side // 2) ** 2
        kwargs = {"hidden_states": torch.empty(1, tokens, config["in_channels"], **meta),
                  "encoder_hidden_states": torch.empty(1, text_tokens, config["joint_attention_dim"], **meta),
                  "pooled_projections": torch.empty(1, config["pooled_projection_dim"], **meta),
                  "timestep": torch.tensor([0.5], device="meta"),
                  "img_ids": torch.empty(tokens, 3, device="meta"),
                  "txt_ids": torch.empty(text_tokens, 3, device="meta")}
        if config.get("guidance_embeds"):
            kwargs["guidance"] = torch.tensor([3.5], device="meta")
        return (), kwargs, (FluxTransformerBlock, FluxSingleTransformerBlock)
    kwargs = {"encoder_hidden_states": torch.empty(1, 77, config["cross_attention_dim"], **meta)}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled, **meta),
                                       "time_ids": torch.empty(1, 6, **meta)}
    args = (torch.empty(1, config["in_channels"], side, side, **meta), torch.tensor([500], device="meta"))
    return args, kwargs, (ResnetBlock2D, BasicTransformerBlock)


@lru_cache(maxsize=16)
def _traced(config_json: str, resolution: int, checkpointing: bool, text_tokens: int = 77) -> int:
    import torch.nn.functional as F

    config = json.loads(config_json)
    unet = _build_on_meta(config, torch.bfloat16)
    meta = {"device": "meta", "dtype": torch.bfloat16}
    args, kwargs, unit_types = _denoiser_inputs(config, resolution // VAE_FACTOR, text_tokens, meta)
    params = {id(p) for p in unet.parameters()}
    seen, kept, stack = set(), [], [None]
    saved: dict = {None: 0}
    unit_inputs = 0

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in seen and id(base) not in params:
            seen.add(id(t))
            kept.append(t)  # alive until the trace ends, so ids are not reused
            saved[stack[-1]] = saved.get(stack[-1], 0) + t.numel() * t.element_size()
        return t

    def enter(module, positional, kwargs):
        nonlocal unit_inputs
        stack.append(module)
        # what a checkpointed unit keeps: its input (the UNet's blocks: the first argument; the transformer blocks:
        # the image and text streams, by keyword)
        inputs = [positional[0]] if positional else [kwargs[k] for k in ("hidden_states", "encoder_hidden_states")
                                         if torch.is_tensor(kwargs.get(k))]
        unit_inputs += sum(t.numel() * t.element_size() for t in inputs)

    units = [m for m in unet.modules() if isinstance(m, unit_types)]  # checkpointed
    hooks = [h for m in units for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                        m.register_forward_hook(lambda *_: stack.pop() and None))]
    real_sdpa = F.scaled_dot_product_attention
    def flash_like(*qkv, **kw):  # diffusers' attention dispatcher passes query=, key=, value=
        q, k, v = (qkv + tuple(kw[name] for name in ("query", "key", "value") if name in kw))[:3]
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = flash_like
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for hook in hooks:
            hook.remove()
    inside = [v for k, v in saved.items() if k is not None]
    if checkpointing:  # kept: what is saved outside the units, each unit's input, and one unit recomputed at a time
        return saved[None] + unit_inputs + max(inside, default=0)
    return saved[None] + sum(inside)


def activation_bytes_per_image(unet_config: dict | str, resolution: int, checkpointing: bool,
                               text_tokens: int = 77) -> int:
    """ESTIMATED bytes autograd keeps for one image through the UNet or flow transformer (bf16), at ``resolution``
    pixels (``text_tokens``: a flow transformer's T5 tokens)."""
    config = load_config(unet_config) if isinstance(unet_config, str) else unet_config
    return _traced(json.dumps(dict(config), sort_keys=True, default=list), resolution, checkpointing, text_tokens)
