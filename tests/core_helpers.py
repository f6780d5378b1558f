"""Shared pieces for the core (minipref/) tests: hypothesis settings, random tensors, a tiny eps-model.

Everything here is written from docs/conventions.md alone, never from the implementation, so the tests check the code
rather than restate it. Nothing is shared between tests (no module state), so `pytest -n 2` is safe.

The tiny model is an MLP epsilon-predictor on random (x0, eps, t) with a frozen copy as the reference, the
same wiring the trainers use: winner and loser share `t` and `eps` and go through one forward over the
concatenated `2B` batch (docs/conventions.md §3). Per-sample errors are computed *longhand* here
(`mean over non-batch dims of (pred - target)^2`), so a bug in `minipref.per_sample_mse` cannot hide
inside an identity test; `per_sample_mse` has its own golden test.
"""

from __future__ import annotations

import copy
import math

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

F64 = torch.float64

# Every property test uses one of these: float64, no deadline (the first call pays torch's warm-up).
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(min_value=0, max_value=2**31 - 1)
batch_sizes = st.integers(min_value=1, max_value=6)
# beta spans five decades, log-uniform: 0.01 .. 1e4 (SD1.5 DPO uses 5000 in our convention).
betas = st.floats(min_value=-2.0, max_value=4.0).map(lambda e: 10.0**e)
small_betas = st.floats(min_value=-2.0, max_value=1.0).map(lambda e: 10.0**e)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_errors(gen: torch.Generator, batch: int, scale: float = 2.0) -> torch.Tensor:
    """Positive per-sample errors, shape (B,), float64, like an MSE of a half-trained eps-model."""
    return torch.rand(batch, generator=gen, dtype=F64) * scale + 1e-3


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh differentiable leaf with the same values."""
    return t.detach().clone().requires_grad_(True)


def longhand_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """docs/conventions.md §1: mean over all non-batch dims of (pred - target)^2 -> (B,)."""
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)


def assert_close(actual, expected, *, rtol: float = 1e-9, atol: float = 1e-12, msg: str = "") -> None:
    actual = torch.as_tensor(actual, dtype=F64)
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


# ----------------------------------------------------------------------------------------------------------
# A tiny epsilon-model on "images" of shape (2, 3) and its frozen reference copy.
# ----------------------------------------------------------------------------------------------------------
SAMPLE_SHAPE = (2, 3)
NUM_TRAIN_TIMESTEPS = 1000


class TinyEps(nn.Module):
    """eps_theta(x_t, t): flatten (B, 2, 3) -> 6, append t / T, MLP, back to (B, 2, 3)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        dim = math.prod(SAMPLE_SHAPE)
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([x_t.reshape(x_t.shape[0], -1), (t.to(x_t.dtype) / NUM_TRAIN_TIMESTEPS)[:, None]], dim=1)
        return self.net(flat).reshape(x_t.shape)  # (B, 2, 3)


def make_models(seed: int, perturb: float = 0.0) -> tuple[TinyEps, TinyEps]:
    """(model, reference). The reference is frozen; the model is its copy, optionally nudged by `perturb`."""
    torch.manual_seed(seed)  # nn.Linear init draws from the global generator
    reference = TinyEps().to(F64)
    model = copy.deepcopy(reference)
    reference.requires_grad_(False)
    if perturb:
        gen = generator(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=F64))
    return model, reference


def _alphas_cumprod() -> torch.Tensor:
    betas_ = torch.linspace(1e-4, 0.02, NUM_TRAIN_TIMESTEPS, dtype=F64)  # DDPM linear schedule
    return torch.cumprod(1.0 - betas_, dim=0)


def noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    abar = _alphas_cumprod()[t].reshape(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def pair_forward(model: nn.Module, reference: nn.Module, seed: int, batch: int):
    """One forward over the concatenated 2B batch; winner and loser share t and eps (docs/conventions.md §3).

    Returns (pred, ref_pred, target), each of shape (2B, 2, 3): rows [:B] are winners, [B:] losers.
    """
    gen = generator(seed + 2)
    x0 = torch.randn(2 * batch, *SAMPLE_SHAPE, generator=gen, dtype=F64)
    eps = torch.randn(batch, *SAMPLE_SHAPE, generator=gen, dtype=F64).repeat(2, 1, 1)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen).repeat(2)
    x_t = noisy(x0, eps, t)
    pred = model(x_t, t)
    with torch.no_grad():
        ref_pred = reference(x_t, t)
    return pred, ref_pred, eps


def pair_errors(model: nn.Module, reference: nn.Module, seed: int, batch: int):
    """(err_w, err_l, ref_err_w, ref_err_l), each (B,); the model errors carry autograd."""
    pred, ref_pred, target = pair_forward(model, reference, seed, batch)
    err, ref_err = longhand_mse(pred, target), longhand_mse(ref_pred, target)
    return err[:batch], err[batch:], ref_err[:batch], ref_err[batch:]


def binary_errors(model: nn.Module, reference: nn.Module, seed: int, batch: int):
    """(err_model, err_ref), each (B,), for per-sample (binary-feedback) objectives."""
    gen = generator(seed + 3)
    x0 = torch.randn(batch, *SAMPLE_SHAPE, generator=gen, dtype=F64)
    eps = torch.randn(batch, *SAMPLE_SHAPE, generator=gen, dtype=F64)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
    x_t = noisy(x0, eps, t)
    pred = model(x_t, t)
    with torch.no_grad():
        ref_pred = reference(x_t, t)
    return longhand_mse(pred, eps), longhand_mse(ref_pred, eps)


def param_grads(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """d loss / d parameters (zeros where a parameter is unused); keeps the graph for a second loss."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def input_grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_grads_close(actual, expected, *, scale: float = 1.0, rtol: float = 1e-8, msg: str = "") -> None:
    """Compare two gradient lists parameter by parameter.

    A parameter's gradient is a sum over samples of terms of either sign, so a small entry can be the difference of
    large ones; its rounding error scales with the tensor's largest entry, not with itself. The absolute floor is
    therefore rtol * max|expected| of that tensor (plus 1e-12 * scale, e.g. beta, for all-zero gradients). A wrong
    formula is off by O(1) of the gradient; float64 rounding and torch's softplus threshold (exact to ~2e-9) are not.
    """
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        floor = rtol * float(e.detach().abs().max()) if e.numel() else 0.0
        assert_close(a, e, rtol=rtol, atol=max(floor, 1e-12 * max(1.0, scale)), msg=f"{msg} (tensor {i})")


def grad_norm(grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


# Plain-Python scalar helpers for the golden tests (no torch, no minipref).
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def logsigmoid(x: float) -> float:
    return -softplus(-x)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)
