"""Adam with a warmup-then-cosine learning rate, and gradient-norm clipping, in plain torch: the toy's optimiser.

Why not ``torch.optim.Adam`` and ``nn.utils.clip_grad_norm_``? The numbers are the same (``tests/test_toy.py``
checks these against ``torch.optim.Adam(foreach=True)`` with ``LambdaLR`` and ``clip_grad_norm_`` over many steps
with ``torch.equal``), but every ``torch.optim`` optimiser imports ``torch._dynamo`` on first use (~3 s of CPU, a
seventh of a ``--quick`` run), and both pass each step through layers of compiler guards and device grouping that
cost more than the arithmetic for a 10k-parameter MLP.

Adam (Kingma & Ba 2015) keeps, per parameter, running averages of the gradient and of its square:

    m_t = beta1 m_{t-1} + (1 - beta1) g_t            v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    theta_t = theta_{t-1} - lr_t * (m_t / (1 - beta1^t)) / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

The operations below are torch's multi-tensor ("foreach") Adam's, in its order, so the bits are torch's too.
A parameter without a gradient at a step (the condition layer of an unconditional method) is skipped, and its
step count ``t`` starts at its first gradient, as in torch.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor at ``step``: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def clip_grad_norm(params: list[Tensor], max_norm: float) -> None:
    """Scale the gradients of ``params`` so that their joint L2 norm is at most ``max_norm`` (as the Diffusion-DPO /
    KTO scripts do with ``clip_grad_norm_``; the same operations, so the same bits)."""
    grads = [p.grad for p in params if p.grad is not None]
    # ||g|| = || (||g_1||, ..., ||g_n||) ||: the norm of the per-tensor norms
    total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    # g <- g * min(1, max_norm / (||g|| + 1e-6))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))


class Adam:
    """``Adam(params, lr, steps, warmup)``: call ``zero_grad()``, backward, ``step()``; the learning rate at update
    ``i`` (from 0) is ``lr * warmup_cosine(i, steps, warmup)`` (``warmup=None``: a constant ``lr``)."""

    def __init__(self, params: Iterable[Tensor], lr: float, steps: int = 1, warmup: int | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.base_lr, self.steps, self.warmup = lr, steps, warmup
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.updates = 0  # step() calls so far: the schedule's position
        self.state: dict[Tensor, dict] = {}  # per parameter: its own t, m and v

    @property
    def lr(self) -> float:
        if self.warmup is None:
            return self.base_lr
        return self.base_lr * warmup_cosine(self.updates, self.steps, self.warmup)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        for p in params:
            if p not in self.state:
                self.state[p] = {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)}
            self.state[p]["t"] += 1
        states = [self.state[p] for p in params]
        grads, m, v = [p.grad for p in params], [s["m"] for s in states], [s["v"] for s in states]
        lr, beta1, beta2 = self.lr, self.beta1, self.beta2
        # m_t = beta1 m_{t-1} + (1 - beta1) g_t, as a lerp from m towards g
        torch._foreach_lerp_(m, grads, 1 - beta1)
        # v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        # step size -lr / (1 - beta1^t) and the denominator sqrt(v_t) / sqrt(1 - beta2^t) + eps
        step_size = [(lr / (1 - beta1 ** s["t"])) * -1 for s in states]
        denominator = torch._foreach_sqrt(v)
        torch._foreach_div_(denominator, [(1 - beta2 ** s["t"]) ** 0.5 for s in states])
        torch._foreach_add_(denominator, self.eps)
        # theta_t = theta_{t-1} + step_size * m_t / denominator
        torch._foreach_addcdiv_(params, m, denominator, step_size)
        self.updates += 1
