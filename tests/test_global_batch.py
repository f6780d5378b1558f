"""full/run/global_batch.py on 2 real processes (gloo, CPU): the global mean and the gathered contrast batch give
the objective and the gradient of one process holding the whole batch. No models: a few seconds."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import minipref
from full.run.global_batch import GlobalBatch


class _GlooAccelerator:
    """The two members of `accelerate.Accelerator` that GlobalBatch uses, over a plain gloo process group."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world

    def gather(self, x):
        parts = [torch.empty_like(x) for _ in range(self.num_processes)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)


def _rows(theta: torch.Tensor, start: int, stop: int):
    """Per-row errors that depend on the parameters theta (2,): row k has its own coefficients."""
    k = torch.arange(start, stop, dtype=torch.float64)
    err_w = 0.5 + 0.01 * torch.sin(k) * theta[0] + 0.02 * k * theta[1]
    err_l = 0.6 + 0.03 * torch.cos(k) * theta[0] - 0.01 * theta[1]
    ref_w, ref_l = 0.5 + 0.001 * k, 0.6 - 0.002 * k
    emb_w = torch.stack([torch.cos(k), torch.sin(k), k / 10], 1)
    emb_l = torch.stack([torch.sin(2 * k), torch.cos(k), -k / 10], 1)
    return err_w, err_l, ref_w, ref_l, emb_w, emb_l


def _worker(rank: int, world: int, port: int, sizes: list[int], queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    batch = GlobalBatch(_GlooAccelerator(rank, world))
    start = sum(sizes[:rank])
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    parts = batch.gather_with_local_grad(*_rows(theta, start, start + sizes[rank]))
    loss = minipref.contrast_loss(*parts, beta=50.0, tau=0.5).loss * world  # as full/trainers/offline.py
    (grad,) = torch.autograd.grad(loss, theta)
    dist.all_reduce(grad)  # DDP averages the processes' gradients
    local = minipref.contrast_loss(*_rows(theta, start, start + sizes[rank]), beta=50.0, tau=0.5).loss
    (local_grad,) = torch.autograd.grad(local, theta)  # the per-process contrast, for comparison
    dist.all_reduce(local_grad)
    reward = torch.arange(start, start + sizes[rank], dtype=torch.float64) - 1.0  # local means differ in sign
    queue.put((rank, loss.item() / world, (grad / world).tolist(), batch.global_mean(reward).item(),
               (local_grad / world).tolist()))
    dist.destroy_process_group()


def test_two_processes_give_the_global_contrast_gradient_and_kto_reference_point():
    sizes = [3, 2]  # unequal: a batch that lost an undecodable item still lines up
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(2, port, sizes, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))

    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    whole = minipref.contrast_loss(*_rows(theta, 0, sum(sizes)), beta=50.0, tau=0.5).loss
    (expected,) = torch.autograd.grad(whole, theta)
    for _, loss, grad, mean, _ in results:
        assert loss == pytest.approx(whole.item(), rel=1e-12)
        assert grad == pytest.approx(expected.tolist(), rel=1e-10)
        assert mean == pytest.approx(1.0)  # mean(-1, 0, 1, 2, 3): process 0 alone would say 0, process 1 2.5
    # the per-process contrast is another objective: its averaged gradient is not the global one
    assert results[0][4] != pytest.approx(expected.tolist(), rel=1e-3)
