"""The step-aware preference model (SPM): a PickScore-style CLIP scorer that also reads the timestep.

Paper 003, "Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference
Optimization" (Liang et al. 2024), Sec. 4.2 and Supplementary Sec. 2. SPO needs to rank *intermediate* denoising
samples, so the scorer takes ``(image, prompt, t)``:

    s(x0_hat, c, t) = exp(logit_scale) * cos( E_img(x0_hat, t), E_txt(c) )                    (Eq. (3), PickScore)

* ``x0_hat`` is not the noisy sample itself: "we estimate x0 from the noisy sample directly, following DDIM"
  (Sec. 4.2). In the authors' code that is the diffusion model's ``pred_original_sample`` (one DDIM x0 prediction,
  CFG 5) decoded by the VAE, both when the SPM is trained (``full/trainers/spm.py``) and when SPO ranks candidates
  (each candidate ``x_{t-1}`` is scored through *its own* x0 prediction, at its own timestep). The helpers in
  `full/online/preference.py` (:func:`predicted_x0`, :func:`decode_latents`, :func:`clip_pixel_values`) do those steps.
* ``E_img`` is CLIP's vision transformer with DiT's time-conditional adaptive LayerNorm (Supp. Sec. 2, Fig. 10): a
  sinusoidal embedding of ``t`` goes through an MLP (Linear-SiLU-Linear) shared by every block; per block a Linear
  predicts ``shift1, scale1, gate1, shift2, scale2, gate2``; "Scale, Shift" follows each LayerNorm,
  ``LN(x) * (1 + scale) + shift``, and "Scale" multiplies the attention and MLP outputs before the residual,
  ``(1 + gate) * f(x)``. The authors' code also modulates the pooled output after ``post_layernorm``; so do we.
  Every modulation Linear starts at zero, so **at initialisation the SPM is exactly the plain scorer** (PickScore),
  as the paper requires ("ensuring that the SPM's output matches the pretrained PickScore model's output").
* ``time_conditioned=False`` is the plain scorer: PickScore itself, or the "SPM w/o step" ablation (Table 9) when
  fine-tuned on noisy x0 estimates.

How the conditioning is attached. Rather than copying transformers' ``CLIPEncoderLayer`` (whose forward signature
changed between transformers 4.x and 5.x), we leave the ``CLIPModel`` untouched and register forward hooks on the
four sub-modules every version has (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``) and on
``post_layernorm``. Each hook rescales its module's output with the modulation computed for the current batch. The
CLIP state dict is unchanged (``save_pretrained`` writes a plain ``CLIPModel``); the new parameters live in
``self.time_modulation`` and are saved next to it as safetensors. (The hooks read a per-call state that is cleared
when the image tower returns, so gradient checkpointing of the vision tower, which re-runs it during backward, is
not supported; calling ``spm.clip`` directly raises instead of using a stale ``t``.)

Use in SPO (as the authors' sampler does): ``k`` candidates ``x_prev`` (k * B, candidate-major) were drawn from one
``x_t``; the next denoising step's UNet forward at ``t_prev`` gives each candidate's own x0 prediction::

    out = unet(x_prev, t_prev, ...)                                     # with CFG, as in sampling
    images = decode_latents(vae, predicted_x0(x_prev, out, t_prev, scheduler))
    scores = spm.score_images(images, t_prev, prompts=prompts * k)      # (k * B,)
    best, worst, keep = best_worst_pair(scores.view(k, -1), THRESHOLD["sd15"])

At the last step the candidates are clean: decode them directly and score them at ``t = 0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from full.online.preference import clip_pixel_values

SPM_CONFIG_NAME = "spm_config.json"
TIME_WEIGHTS_NAME = "spm_time_modulation.safetensors"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore ships no processor of its own


# ----------------------------------------------------------------------------------------------------------------
# The time modulation (DiT adaLN-Zero, Supp. Sec. 2) and the hooks that apply it
# ----------------------------------------------------------------------------------------------------------------


class TimeModulation(nn.Module):
    """``t -> (per-block shift/scale/gate x 2, pooled shift/scale)``; zero-initialised, so every factor starts at 0."""

    def __init__(self, hidden_size: int, num_layers: int, frequency_dim: int = 256):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        # DiT's sinusoid: cos first, frequencies exp(-ln(10^4) i / half) (flip_sin_to_cos, no shift).
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(frequency_dim, hidden_size)  # Linear-SiLU-Linear
        for linear in (self.time_embedding.linear_1, self.time_embedding.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, 6 * hidden_size) for _ in range(num_layers))
        self.pooled = nn.Linear(hidden_size, 2 * hidden_size)
        for linear in [*self.blocks, self.pooled]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, timesteps: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        emb = F.silu(self.time_embedding(self.time_proj(timesteps).to(self.pooled.weight.dtype)))  # (B, E)
        out = {}
        for i, block in enumerate(self.blocks):
            names = ("shift1", "scale1", "gate1", "shift2", "scale2", "gate2")
            for name, value in zip(names, block(emb).chunk(6, dim=-1)):  # each (B, E)
                out[f"{i}.{name}"] = value.to(dtype)
        out["pooled.shift"], out["pooled.scale"] = (v.to(dtype) for v in self.pooled(emb).chunk(2, dim=-1))
        return out


class _ModulationState:
    """The modulation of the batch being encoded; set by :meth:`StepAwarePreferenceModel.image_embeds` only."""

    values: dict[str, Tensor] | None = None


class _ModulateHook:
    """A forward hook: ``out * (1 + scale) + shift`` (LayerNorms) or ``out * (1 + gate)`` (attention / MLP).

    A callable object, not a closure, so that ``copy.deepcopy`` of the model gives hooks that read the *copy's* state.
    """

    def __init__(self, state: _ModulationState, scale: str, shift: str | None = None):
        self.state, self.scale, self.shift = state, scale, shift

    def __call__(self, module, inputs, output):  # a forward hook: (module, its inputs, its output)
        values = self.state.values
        if values is None:
            raise ValueError("the time-conditioned CLIP vision tower was called without a timestep; "
                             "call StepAwarePreferenceModel (score / image_embeds), not its .clip directly")
        hidden = output[0] if isinstance(output, tuple) else output  # CLIPAttention returns (out, weights)
        # (B, E) -> (B, 1, E) for token sequences, (B, E) for the pooled output
        shape = (hidden.shape[0],) + (1,) * (hidden.ndim - 2) + (hidden.shape[-1],)
        hidden = hidden * (1 + values[self.scale].view(shape))
        if self.shift is not None:
            hidden = hidden + values[self.shift].view(shape)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class StepAwarePreferenceModel(nn.Module):
    """PickScore-style CLIP scorer with optional time-conditional adaLN in its vision tower (paper 003, Sec. 4.2).

    ``clip`` is a transformers ``CLIPModel``; ``processor`` its ``CLIPProcessor`` (tokenizer + image processor, used
    for the tokenizer and the resize / crop / normalisation constants). ``timesteps`` are diffusers training
    timesteps in ``[0, num_train_timesteps)``, the same ``t`` the diffusion model sees.
    """

    def __init__(self, clip, processor, *, time_conditioned: bool = True, num_train_timesteps: int = 1000,
                 frequency_dim: int = 256):
        super().__init__()
        if not hasattr(clip, "vision_model") or not hasattr(clip, "text_model"):
            raise ValueError(f"clip must be a transformers CLIPModel, got {type(clip).__name__}")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self.clip, self.processor = clip, processor
        self.time_conditioned, self.num_train_timesteps = bool(time_conditioned), num_train_timesteps
        self.frequency_dim = frequency_dim
        vision = clip.vision_model
        self.image_size = clip.config.vision_config.image_size
        self._state = _ModulationState()
        self._hooks = []
        if self.time_conditioned:
            layers = list(vision.encoder.layers)
            self.time_modulation = TimeModulation(clip.config.vision_config.hidden_size, len(layers), frequency_dim)
            self.time_modulation.to(device=clip.logit_scale.device, dtype=clip.logit_scale.dtype)
            for i, layer in enumerate(layers):
                missing = [n for n in ("layer_norm1", "self_attn", "layer_norm2", "mlp") if not hasattr(layer, n)]
                if missing:
                    raise ValueError(f"CLIP vision layer {i} ({type(layer).__name__}) has no {missing}: this "
                                     "transformers version names the encoder layer's modules differently")
                for module, scale, shift in ((layer.layer_norm1, "scale1", "shift1"), (layer.self_attn, "gate1", None),
                                             (layer.layer_norm2, "scale2", "shift2"), (layer.mlp, "gate2", None)):
                    hook = _ModulateHook(self._state, f"{i}.{scale}", f"{i}.{shift}" if shift else None)
                    self._hooks.append(module.register_forward_hook(hook))
            hook = _ModulateHook(self._state, "pooled.scale", "pooled.shift")
            self._hooks.append(vision.post_layernorm.register_forward_hook(hook))

    @classmethod
    def from_pretrained(cls, model_name_or_path: str = PICKSCORE_MODEL, processor_name_or_path: str | None = None,
                        **kwargs) -> "StepAwarePreferenceModel":
        """Start from a CLIP checkpoint (PickScore by default, as the paper does). ``kwargs`` go to ``__init__``."""
        from transformers import AutoProcessor, CLIPModel

        try:
            clip = CLIPModel.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as error:  # no such dir / hub id, offline, not a CLIP checkpoint, ...
            raise ValueError(f"cannot load a CLIPModel from {model_name_or_path!r}: {error}") from error
        if processor_name_or_path is None and model_name_or_path == PICKSCORE_MODEL:
            processor_name_or_path = PICKSCORE_PROCESSOR
        source = processor_name_or_path or model_name_or_path
        try:
            processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            hint = f" (for PickScore pass processor_name_or_path={PICKSCORE_PROCESSOR!r})" \
                if processor_name_or_path is None else ""
            raise ValueError(f"cannot load a CLIP processor from {source!r}{hint}: {error}") from error
        return cls(clip, processor, **kwargs)

    # ---------------------------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------------------------

    def check_timesteps(self, timesteps, batch: int) -> Tensor:
        """``timesteps`` (int, 0-d or ``(B,)``) as a long tensor of shape ``(B,)``; integers in ``[0, T)``."""
        device = self.clip.logit_scale.device
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},) to match the images, "
                             f"got shape {tuple(t.shape)}")
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("timesteps must be integers (diffusers training timesteps)")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
        if batch and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), "
                             f"got min {t.min().item()} max {t.max().item()}")
        return t.long()

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        tokenizer = self.processor.tokenizer
        max_length = min(tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        device = self.clip.logit_scale.device
        return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` (a VAE decode, or a dataset's ``pixel_values``), any size -> CLIP ``pixel_values``."""
        image_processor = self.processor.image_processor
        return clip_pixel_values(images, image_processor.size, image_processor.crop_size,
                                 image_processor.image_mean, image_processor.image_std)

    # ---------------------------------------------------------------------------------------------------------
    # Embeddings and scores
    # ---------------------------------------------------------------------------------------------------------

    def image_embeds(self, pixel_values: Tensor, timesteps=None) -> Tensor:
        """Unit-norm image embeddings ``(B, D)``; ``timesteps`` is required when time-conditioned."""
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3 \
                or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (B, 3, {self.image_size}, {self.image_size}), got "
                             f"{shape}; turn [-1, 1] images of any size into CLIP inputs with .preprocess()")
        if self.time_conditioned:
            if timesteps is None:
                raise ValueError("timesteps is required: this SPM is time-conditioned (time_conditioned=True)")
            t = self.check_timesteps(timesteps, pixel_values.shape[0])
            self._state.values = self.time_modulation(t, pixel_values.dtype)
        elif timesteps is not None:
            self.check_timesteps(timesteps, pixel_values.shape[0])  # still reject nonsense
        try:
            # vision_model + visual_projection: the same in transformers 4.x and 5.x (get_image_features is not)
            pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        finally:
            self._state.values = None  # a later direct call must not reuse this batch's t
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def forward(self, pixel_values: Tensor, timesteps=None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Scores ``(B,)``: ``exp(logit_scale) * cos(text, image)``. One prompt (batch 1) is shared by all images."""
        if input_ids is None:
            raise ValueError("input_ids is required (or call .score(..., prompts=[...]))")
        image = self.image_embeds(pixel_values, timesteps)
        text = self.text_embeds(input_ids, attention_mask)
        if text.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"got {text.shape[0]} prompts for {image.shape[0]} images: "
                             "pass one prompt per image, or a single prompt for all")
        return self.clip.logit_scale.exp() * (image * text).sum(-1)

    def score(self, pixel_values: Tensor, timesteps=None, *, prompts: list[str] | None = None,
              input_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """PickScore logits ``(B,)`` of CLIP-ready ``pixel_values`` for ``prompts`` (or pre-tokenised ids)."""
        if (prompts is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompts or input_ids")
        if prompts is not None:
            tokens = self.tokenize(prompts)
            input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        return self(pixel_values, timesteps, input_ids, attention_mask)

    def score_images(self, images: Tensor, timesteps=None, *, prompts: list[str]) -> Tensor:
        """:meth:`score` of images in ``[-1, 1]`` at any size (e.g. ``decode_latents(vae, predicted_x0(...))``)."""
        return self.score(self.preprocess(images), timesteps, prompts=prompts)

    # ---------------------------------------------------------------------------------------------------------
    # Saving
    # ---------------------------------------------------------------------------------------------------------

    def save_pretrained(self, directory) -> str:
        """``CLIPModel`` + processor via ``save_pretrained``, the adaLN weights as safetensors, a JSON config."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        config = {"time_conditioned": self.time_conditioned, "num_train_timesteps": self.num_train_timesteps,
                  "frequency_dim": self.frequency_dim, "format_version": 1}
        (directory / SPM_CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
        if self.time_conditioned:
            weights = {k: v.detach().contiguous().cpu() for k, v in self.time_modulation.state_dict().items()}
            save_file(weights, str(directory / TIME_WEIGHTS_NAME))
        return str(directory)


def load_spm(directory, device=None, dtype: torch.dtype | None = None) -> StepAwarePreferenceModel:
    """Load what :meth:`StepAwarePreferenceModel.save_pretrained` wrote (a directory from ``train_spm``)."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, CLIPModel

    directory = Path(directory)
    config_path = directory / SPM_CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {SPM_CONFIG_NAME}: not an SPM directory (for a plain CLIP/PickScore "
                         "checkpoint use StepAwarePreferenceModel.from_pretrained)")
    config = json.loads(config_path.read_text())
    spm = StepAwarePreferenceModel(CLIPModel.from_pretrained(directory), AutoProcessor.from_pretrained(directory),
                                   time_conditioned=config["time_conditioned"],
                                   num_train_timesteps=config["num_train_timesteps"],
                                   frequency_dim=config["frequency_dim"])
    if spm.time_conditioned:
        spm.time_modulation.load_state_dict(load_file(str(directory / TIME_WEIGHTS_NAME)), strict=True)
    return spm.to(device=device, dtype=dtype).eval()

