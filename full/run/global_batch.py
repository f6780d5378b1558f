"""Batch statistics over the *global* batch (all processes), so that P processes with micro-batch b optimise the
same objective as one process with batch P*b.

Two objectives look across the samples of a batch:

* Diffusion-KTO's ``"batch"`` reference point ``z_ref = clamp(mean_i r_i, 0)``, detached (paper 001 Eq. 14). The
  authors' code averages it over every process (``accelerator.reduce``); so does `global_mean`.
* Diff-contrast's in-batch weights ``W_ij`` compare every winner ``i`` with every loser ``j`` (paper 002 Eq. 9).
  We contrast over the global batch (`gather_with_local_grad`): see docs/methods.md for the choice and its reason.

Data parallelism averages the processes' gradients. For a loss over the gathered batch ``L = (1/M) sum_ij
W_ij f(r_w_i - r_l_j)`` process ``p`` computes ``L`` with its own rows live and the other processes' rows detached,
and back-propagates ``P * L``: term ``(i, j)`` then gets its ``r_w_i`` derivative from the owner of ``i`` and its
``r_l_j`` derivative from the owner of ``j``, and the average over processes is exactly ``grad L``.

With gradient accumulation the statistics cover one micro-batch of every process (the optimizer step's batch is
``accumulation x`` larger, but each forward only sees its own micro-batch): accumulation changes them, processes
do not.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GlobalBatch:
    """Reductions over the micro-batches of all processes at one step (identity maps on a single process)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.num_processes, self.rank = accelerator.num_processes, accelerator.process_index

    def _gather_padded(self, x: Tensor) -> tuple[Tensor, list[int]]:
        """All processes' ``x`` (rows may differ in number: a batch lost an undecodable item) and their sizes."""
        sizes = self.accelerator.gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = self.accelerator.gather(padded.contiguous()).reshape(len(sizes), max(sizes), *x.shape[1:])
        return torch.cat([gathered[p, :n] for p, n in enumerate(sizes)]), sizes

    def global_mean(self, x: Tensor) -> Tensor:
        """mean over the rows of every process, detached (the same number on every process)."""
        if self.num_processes == 1:
            return x.detach().mean()
        return self._gather_padded(x.detach())[0].mean()

    def gather_with_local_grad(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Each tensor over the global batch (process order), this process's rows live, the others detached."""
        if self.num_processes == 1:
            return tensors
        out = []
        for x in tensors:
            gathered, sizes = self._gather_padded(x.detach())
            start = sum(sizes[: self.rank])
            out.append(torch.cat([gathered[:start], x, gathered[start + x.shape[0]:]]))
        return tuple(out)
