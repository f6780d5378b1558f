"""The toy's diffusion model: a small MLP epsilon-predictor and the diffusers noise schedule it is trained with.

Diffusion-KTO (paper 001) Sec. 7 only says "a small diffusion model using a MLP". Ours, in the spirit of
tiny-diffusion: a sinusoidal timestep embedding (diffusers' ``Timesteps``, toy/schedule.py) concatenated to the 2D point, an input
layer, a few residual SiLU blocks, a linear read-out of the predicted noise.

Conditioning (for CSFT, paper 001 Sec. 5.1.2, where prompts get a "good image" / "bad image" prefix): the toy has
no prompt, so the condition is a one-hot vector over {good, bad} and the *null* condition is all zeros. It enters
through a bias-free linear layer initialised to zero. Pretraining only ever sees the null condition, so that
layer gets no gradient and stays zero: every fine-tuned copy, CSFT included, starts *exactly* at the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import silu  # a function, not an nn.SiLU module: a module call costs ~5 us, this MLP is tiny

from minipref import per_sample_mse

from .schedule import NUM_TRAIN_TIMESTEPS, NoiseSchedule, embedding_frequencies, sinusoidal_embedding

CONDITIONS = ("good", "bad")  # one-hot positions; the null (unconditional) input is all zeros


def make_noise_scheduler():
    """diffusers ``DDPMScheduler``, T = 1000, default linear betas 1e-4..0.02, so ``abar_T ~ 4e-5`` (~pure noise).

    ``clip_sample=False``: the default clips predicted ``x0`` to [-1, 1], but pretraining data reaches ``y ~ 1.4``.
    ``python -m toy`` uses ``toy.schedule.NoiseSchedule``, the same numbers without importing diffusers; this one is
    for code that wants the scheduler's other methods (its ``step``).
    """
    from diffusers import DDPMScheduler  # imported here: diffusers costs seconds at start-up (toy/schedule.py)

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, clip_sample=False)


class TimestepEmbedding(nn.Module):
    """``t`` ``(B,)`` -> ``[cos(t f), sin(t f)]`` ``(B, dim)``; no parameters (diffusers' ``Timesteps(dim, True, 0)``).

    The training timesteps are the integers ``0 .. T-1``, so their embeddings are computed once, as a ``(T, dim)``
    table, and a forward is a row lookup: the same bits (tested against diffusers), without a cos, a sin and a
    concatenation on every call of a model that is called ~10^5 times per run. Fractional ``t`` is computed.
    """

    def __init__(self, dim: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        super().__init__()
        self.register_buffer("frequencies", embedding_frequencies(dim), persistent=False)
        self.register_buffer("table", sinusoidal_embedding(torch.arange(num_timesteps), self.frequencies), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        if t.is_floating_point():
            return sinusoidal_embedding(t, self.frequencies)
        return self.table.index_select(0, t)  # unlike table[t], a negative or too large t is an error


def condition(name: str | None, n: int) -> Tensor | None:
    """The condition input for ``n`` samples: ``None`` (null) or a one-hot ``(n, 2)`` for ``"good"`` / ``"bad"``."""
    if name is None:
        return None
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; valid: None, {', '.join(map(repr, CONDITIONS))}")
    return nn.functional.one_hot(torch.full((n,), CONDITIONS.index(name)), len(CONDITIONS)).float()


class EpsMLP(nn.Module):
    """``eps_theta(x_t, t, c)``: predicts the noise in a 2D point ``x_t`` ``(B, 2)`` at timesteps ``t`` ``(B,)``."""

    def __init__(self, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        if hidden < 1 or depth < 0 or time_dim < 2 or time_dim % 2:
            raise ValueError(f"need hidden >= 1, depth >= 0, even time_dim >= 2; got {hidden}, {depth}, {time_dim}")
        self.time_embedding = TimestepEmbedding(time_dim)
        self.input = nn.Linear(2 + time_dim, hidden)
        self.condition = nn.Linear(len(CONDITIONS), hidden, bias=False)
        nn.init.zeros_(self.condition.weight)  # null condition == pretrained model, see the module docstring
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.output = nn.Linear(hidden, 2)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x_t.ndim != 2 or x_t.shape[1] != 2:
            raise ValueError(f"x_t must have shape (B, 2), got {tuple(x_t.shape)}")
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        h = self.input(torch.cat([x_t, self.time_embedding(t)], dim=1))  # (B, 2 + time_dim) -> (B, hidden)
        if cond is not None:
            h = h + self.condition(cond)
        for block in self.blocks:
            h = h + block(silu(h))  # residual: each block starts near the identity
        return self.output(silu(h))


def denoising_error(
    model: nn.Module, scheduler: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, cond: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Noise ``x0`` to step ``t`` with ``noise`` (``add_noise``, ours or diffusers') and return ``(err (B,), eps_pred (B, 2))``.

    ``err`` is minipref's ``per_sample_mse(eps_pred, noise)``: the quantity every objective is built from. A
    rectified-flow schedule (toy/flow.py, ``python -m toy --flow``) computes its own: the noise-equivalent velocity
    error.
    """
    if hasattr(scheduler, "denoising_error"):  # toy.flow.FlowSchedule
        return scheduler.denoising_error(model, x0, t, noise, cond)
    x_t = scheduler.add_noise(x0, noise, t)
    pred = model(x_t, t, cond)
    return per_sample_mse(pred, noise), pred


def draw_t_and_noise(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform training timesteps ``(n,)`` in ``[0, T)`` and standard normal noise ``(n, 2)``."""
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator)
    return t, torch.randn(n, 2, generator=generator)
