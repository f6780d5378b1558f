"""The orders in which a trainer visits its examples: the same on every process and after a resume."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation per epoch from (seed, epoch): identical on every process and after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class DesirableRatioSampler(torch.utils.data.Sampler[int]):
    """Draw a desirable example with probability ``gamma``, else an undesirable one, uniformly
    within the class and with replacement (Diffusion-KTO, paper 001 Sec. 5.1 / App. C:
    gamma = 0.8, because Pick-a-Pic has more undesirable than desirable images under its policy).

    Every process of a DDP job builds the same sequence from ``seed`` and the epoch, which is
    what accelerate's batch sharding expects.
    """

    def __init__(self, labels: Sequence[bool], gamma: float, num_samples: int, seed: int = 0):
        if not 0.0 <= gamma <= 1.0 or math.isnan(gamma):
            raise ValueError(f"gamma (the desirable ratio) must be in [0, 1], got {gamma}")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        labels = [bool(label) for label in labels]
        self.desirable = torch.tensor([i for i, y in enumerate(labels) if y], dtype=torch.long)
        self.undesirable = torch.tensor([i for i, y in enumerate(labels) if not y], dtype=torch.long)
        if gamma > 0 and len(self.desirable) == 0:
            raise ValueError(f"gamma={gamma} asks for desirable examples but there are none "
                             f"(0 of {len(labels)} labels are desirable)")
        if gamma < 1 and len(self.undesirable) == 0:
            raise ValueError(f"gamma={gamma} asks for undesirable examples but there are none "
                             f"(all {len(labels)} labels are desirable)")
        self.gamma, self.num_samples, self.seed, self.epoch = gamma, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # a plain second pass draws anew; set_epoch overrides it
        pick_desirable = torch.rand(self.num_samples, generator=generator) < self.gamma
        n_desirable = int(pick_desirable.sum())
        indices = torch.empty(self.num_samples, dtype=torch.long)
        if n_desirable:
            draw = torch.randint(len(self.desirable), (n_desirable,), generator=generator)
            indices[pick_desirable] = self.desirable[draw]
        if n_desirable < self.num_samples:
            draw = torch.randint(len(self.undesirable), (self.num_samples - n_desirable,), generator=generator)
            indices[~pick_desirable] = self.undesirable[draw]
        return iter(indices.tolist())

