"""How the toy judges a model: where its samples land, and whether its implicit reward ranks fresh pairs.

Sample metrics (3500 samples per method, paper 001 Sec. 7):

* ``desirable_frac`` / ``undesirable_frac``: the fraction of samples within Mahalanobis distance 2 of the
  desirable / undesirable mean (a disc of radius 0.2). The two discs overlap (the means are 0.2 apart), so a sample
  between them counts for both. Exact samples from the desirable Gaussian score ``1 - exp(-2) = 0.865`` and
  0.396 (in the undesirable disc too); exact pretraining samples 0.267 and 0.180.
* ``energy_distance`` to the desirable Gaussian: ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Szekely & Rizzo), with
  ``Y`` a fixed fresh desirable sample of the same size; 0 iff the distributions match, and it sees the spread as
  well as the mean. Unbiased (U-statistic) within-sample terms, so two desirable samples score ~0.
* ``mean``: the sample mean ``[x, y]``.

Pairwise implicit accuracy (docs/conventions.md §5): for each of ``N`` fresh (desirable ``x_w``, undesirable ``x_l``)
pairs we draw ``K`` (timestep, noise) couples, *shared by winner and loser*, and average the reward margin

    m = mean_k [ r_k(x_w) - r_k(x_l) ],     r_k(x) = -(1/2) (err_model(x; t_k, eps_k) - err_ref(x; t_k, eps_k))

with the pretrained model as the reference for every method (SPIN included). Averaging over ``k`` estimates the
difference of the two models' (uniformly weighted) denoising losses: the diffusion analogue of a log-likelihood
ratio (ELBO), so its sign is a classifier of the pair. The accuracy is ``mean(m > 0) + 0.5 mean(m == 0)``. The sign
does not depend on beta, so beta is 1 here. A single draw (K = 1, what the training curves show) is much noisier:
``pairwise_implicit_acc_per_draw`` reports its mean over the ``K`` draws. No classifier can beat the Bayes
ceiling ``Phi(sqrt 2) = 0.921`` on fresh pairs (toy/data.py): above it (plus sampling noise) means a bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minipref import implicit_reward, pairwise_accuracy  # ties count half (docs/conventions.md §5)

from .data import DESIRABLE, UNDESIRABLE, bayes_ceilings
from .model import NUM_TRAIN_TIMESTEPS, denoising_error

REGION_RADIUS = 2.0  # Mahalanobis radius of the desirable / undesirable regions


def energy_distance(x: Tensor, y: Tensor, within_y: float | None = None) -> float:
    """Energy distance between samples ``x`` ``(n, 2)`` and ``y`` ``(m, 2)``, in float64.

    ``within_y`` (``mean_within(y)``) may be passed when ``y`` is a fixed reference compared many times.
    """
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"energy distance needs at least 2 points per sample, got {len(x)} and {len(y)}")
    within_y = mean_within(y) if within_y is None else within_y
    # 2 E|X - Y| - E|X - X'| - E|Y - Y'|
    return 2 * distance_sum(x, y) / (len(x) * len(y)) - mean_within(x) - within_y


def mean_within(x: Tensor) -> float:
    """``E|X - X'|`` over distinct pairs (the zero diagonal excluded: the unbiased U-statistic)."""
    n = len(x)
    return distance_sum(x, x) / (n * (n - 1))


def distance_sum(x: Tensor, y: Tensor, rows: int = 256) -> float:
    """``sum_ij |x_i - y_j|`` over every row of ``x`` ``(n, 2)`` and ``y`` ``(m, 2)``, in float64.

    ``rows`` rows of the distance matrix at a time: all 3500 x 3500 doubles are 98 MB, which torch writes and reads
    back four times (product, clamp, square root, sum), while 256 rows (7 MB) stay in cache: ~3x faster. The
    distances are the same bits as one ``cdist``; their sum is rounded in another order (a 1e-16 relative change).
    """
    x, y = x.double(), y.double()
    return sum(torch.cdist(x[i:i + rows], y).sum().item() for i in range(0, len(x), rows))


def sample_metrics(samples: Tensor, desirable_reference: Tensor, reference_within: float | None = None) -> dict:
    """The sample-side numbers of ``metrics.json`` for one method.

    A diverged model can produce non-finite samples: they count as outside both regions, ``nonfinite_frac``
    reports them, and the distance, mean and std use the finite ones (all NaN if fewer than two are finite).
    """
    finite = torch.isfinite(samples).all(dim=1)
    kept = samples[finite]
    enough = len(kept) >= 2
    nan2 = [float("nan")] * 2
    return {
        "desirable_frac": (DESIRABLE.mahalanobis(samples) <= REGION_RADIUS).float().mean().item(),
        "undesirable_frac": (UNDESIRABLE.mahalanobis(samples) <= REGION_RADIUS).float().mean().item(),
        "energy_distance": energy_distance(kept, desirable_reference, reference_within) if enough else float("nan"),
        "mean": kept.mean(0).tolist() if enough else nan2,
        "std": kept.std(0).tolist() if enough else nan2,
        "nonfinite_frac": 1.0 - finite.float().mean().item(),
    }


@dataclass
class HeldOutPairs:
    """``N`` fresh pairs with ``K`` shared (t, noise) draws each, flattened to ``N * K`` rows.

    Attributes: ``x_w``, ``x_l`` ``(N*K, 2)`` (each pair repeated K times), ``t`` ``(N*K,)``, ``noise`` ``(N*K, 2)``,
    and the reference errors ``ref_err_w``, ``ref_err_l`` ``(N*K,)``, computed once for all methods.
    """

    n_pairs: int
    draws: int
    x_w: Tensor
    x_l: Tensor
    t: Tensor
    noise: Tensor
    ref_err_w: Tensor
    ref_err_l: Tensor

    @classmethod
    @torch.no_grad()
    def draw(cls, reference: nn.Module, scheduler, n_pairs: int, draws: int, generator: torch.Generator):
        x_w = DESIRABLE.sample(n_pairs, generator).repeat_interleave(draws, dim=0)  # (N, 2) -> (N*K, 2)
        x_l = UNDESIRABLE.sample(n_pairs, generator).repeat_interleave(draws, dim=0)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n_pairs * draws,), generator=generator)
        noise = torch.randn(n_pairs * draws, 2, generator=generator)
        ref_err_w, ref_err_l = _pair_errors(reference, scheduler, x_w, x_l, t, noise)
        return cls(n_pairs, draws, x_w, x_l, t, noise, ref_err_w, ref_err_l)


@torch.no_grad()
def _pair_errors(model, scheduler, x_w, x_l, t, noise, cond=None, pairs_per_forward: int = 4096) -> tuple[Tensor, Tensor]:
    """Errors of winners and losers ``(N,)`` each, in forwards over concatenated parts (shared t and noise).

    Why parts: the held-out set is 64000 pairs, and the MLP's activations for all 128000 rows (32 MB per layer) do
    not fit in cache; ~8000 rows at a time (2 MB) run ~2x faster. A row's output is the same bits whatever else is
    in its batch as long as the batch has 16 rows or more (smaller ones take another matmul kernel; tested), so the
    parts are near-equal in size rather than ``pairs_per_forward`` and a small remainder.
    """
    parts = -(-len(x_w) // pairs_per_forward)  # ceil: every part has more than pairs_per_forward / 2 pairs
    errors = []
    for part in torch.arange(len(x_w)).tensor_split(parts):
        both_cond = None if cond is None else torch.cat([cond[part], cond[part]])
        err, _ = denoising_error(model, scheduler, torch.cat([x_w[part], x_l[part]]), torch.cat([t[part], t[part]]),
                                 torch.cat([noise[part], noise[part]]), both_cond)
        errors.append(err.chunk(2))  # (winners, losers) of this part
    err_w, err_l = zip(*errors)
    return torch.cat(err_w), torch.cat(err_l)


@torch.no_grad()
def implicit_accuracy(model: nn.Module, scheduler, pairs: HeldOutPairs, cond: Tensor | None = None) -> dict:
    """``pairwise_implicit_acc`` (K-averaged margin) and ``pairwise_implicit_acc_per_draw`` on held-out pairs.

    ``cond`` ``(1, 2)`` or None is the condition the model is evaluated (and sampled) with: "good" for CSFT.
    """
    if cond is not None:
        cond = cond.expand(len(pairs.t), -1)
    err_w, err_l = _pair_errors(model, scheduler, pairs.x_w, pairs.x_l, pairs.t, pairs.noise, cond)
    margin = implicit_reward(err_w, pairs.ref_err_w, 1.0) - implicit_reward(err_l, pairs.ref_err_l, 1.0)
    margin = margin.reshape(pairs.n_pairs, pairs.draws)  # (N*K,) -> (N, K): one row per pair
    per_draw = sum(pairwise_accuracy(margin[:, k]) for k in range(pairs.draws)) / pairs.draws
    return {"pairwise_implicit_acc": pairwise_accuracy(margin.mean(1)), "pairwise_implicit_acc_per_draw": per_draw}


def ceiling_margin(n_pairs: int) -> float:
    """Three binomial standard errors above the pairwise Bayes ceiling: what a correct estimate may reach."""
    pairwise = bayes_ceilings()[1]
    return pairwise + 3 * (pairwise * (1 - pairwise) / n_pairs) ** 0.5
