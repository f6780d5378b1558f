"""SPO on the toy: a step-aware preference model and online pairs of single denoising steps.

Paper 003, "Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference
Optimization" (Liang et al. 2024), Sec. 4, and the authors' code (RockeyCoss/SPO):

1. **Step-aware preference model (SPM), Sec. 4.2.** A scorer ``s(x0_hat, t)`` of the model's *predicted* clean
   sample at step ``t``. It is trained like the authors' SPM: a (desirable, undesirable) pair gets the same ``t``
   and the same noise, the frozen pretrained model denoises both to ``x0_hat``, and a Bradley-Terry loss
   ``softplus(-(s_w - s_l))`` teaches the scorer to rank them. At large ``t`` the two ``x0_hat`` barely differ, so
   the scorer learns to be unsure there: that is what "step-aware" buys. The ``oracle`` option replaces it by
   the exact answer, the log-density ratio of the *noised* desirable and undesirable marginals at the candidate's
   step (toy/data.py), i.e. the Bayes-optimal step-aware preference.
2. **Online pairs, Sec. 4.1 and 4.3.** From ``x_T ~ N(0, I)``, follow a 20-step stochastic DDIM chain (eta = 1)
   with the current policy. At each step with ``t < 750``, draw ``k`` candidates ``x_{t-1}`` from the *shared*
   ``x_t``, score each candidate's ``x0_hat`` (the policy's prediction at the candidate's step, as the authors'
   pipeline does), take best and worst as the pair if ``softmax([s_best, s_worst])`` differs by more than the
   threshold, and continue the chain from a *random* candidate.
3. **Loss, Sec. 4.4.** ``minipref.spo_loss`` on ``log pi(x_{t-1} | x_t)`` of winner and loser under the policy
   (with gradient) and the reference (no gradient): the step's Gaussian from ``toy.sampling.ddim_step_gaussian``
   (diffusers' DDIM update, eta = 1), scored with ``minipref.gaussian_step_log_prob``. One rollout of ``batch``
   chains gives one gradient step on all its pairs.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

import minipref
from minipref import LossOutput, gaussian_step_log_prob, get_objective

from .data import PreferenceData, log_density_ratio
from .model import TimestepEmbedding, draw_t_and_noise
from .optim import Adam
from .sampling import ddim_step_gaussian, previous_timestep, step_alphas_per_row

from .context import FineTuneContext


class StepAwarePreferenceModel(nn.Module):
    """``s(x0_hat, t)``: a scalar preference score ``(B,)`` for predicted clean points ``(B, 2)`` at steps ``(B,)``."""

    def __init__(self, hidden: int = 64, time_dim: int = 16):
        super().__init__()
        self.time_embedding = TimestepEmbedding(time_dim)
        self.net = nn.Sequential(
            nn.Linear(2 + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x0_hat: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x0_hat, self.time_embedding(t)], dim=1)).squeeze(1)  # (B, 1) -> (B,)


def predict_x0(eps: Tensor, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` per row; ``alpha_bar`` is ``(B,)``."""
    alpha_bar = alpha_bar.reshape(-1, 1)  # (B,) -> (B, 1)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def train_preference_model(
    reference: nn.Module, scheduler, data: PreferenceData, generator: torch.Generator,
    steps: int = 400, batch: int = 256, lr: float = 3e-3,
) -> tuple[StepAwarePreferenceModel, list[float]]:
    """Fit the SPM on noised training pairs denoised by the frozen reference; returns (model, loss history)."""
    spm = StepAwarePreferenceModel()
    optimizer = Adam(spm.parameters(), lr)  # a constant learning rate
    losses = []
    for _ in range(steps):
        x_w = data.batch(batch, generator, desirable=True)
        x_l = data.batch(batch, generator, desirable=False)
        t, noise = draw_t_and_noise(batch, generator)
        t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])  # the same t and noise for both (paper 003 Sec. 4.2)
        with torch.no_grad():
            x_t = scheduler.add_noise(torch.cat([x_w, x_l]), noise2, t2)
            x0_hat = predict_x0(reference(x_t, t2), x_t, scheduler.alphas_cumprod[t2])
        score_w, score_l = spm(x0_hat, t2).chunk(2)
        loss = F.softplus(-(score_w - score_l)).mean()  # Bradley-Terry, as PickScore / the SPM are trained
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return spm.requires_grad_(False).eval(), losses


def score_candidates(ctx: FineTuneContext, x_prev: Tensor, t_prev: int) -> tuple[Tensor, Tensor | None]:
    """Preference scores ``(n,)`` of candidates ``x_{t-1}`` ``(n, 2)`` at step ``t_prev`` (-1 = clean), and the
    policy's noise prediction ``(n, 2)`` for them at ``t_prev`` that the scores were made from (None if none was)."""
    n = len(x_prev)
    if ctx.spec.options["oracle"]:
        alpha_bar = torch.ones(n) if t_prev < 0 else ctx.scheduler.alphas_cumprod[t_prev].expand(n)
        return log_density_ratio(x_prev, alpha_bar), None
    if t_prev < 0:  # a clean sample is its own prediction
        return ctx.state["spm"](x_prev, torch.zeros(n, dtype=torch.long)), None
    t_score = torch.full((n,), t_prev)
    eps = ctx.policy(x_prev, t_score)
    return ctx.state["spm"](predict_x0(eps, x_prev, ctx.scheduler.alphas_cumprod[t_score]), t_score), eps


@torch.no_grad()
def rollout(ctx: FineTuneContext) -> dict[str, Tensor]:
    """One batch of SPO chains; returns the kept pairs: ``x_t`` ``(P, 2)``, ``t`` ``(P,)``, ``x_w``, ``x_l`` ``(P, 2)``.

    Rows come grouped by timestep, in chain order.
    """
    opts, ddim, g = ctx.spec.options, ctx.ddim, ctx.generator
    b, k = ctx.spec.batch, opts["candidates"]
    x = torch.randn(b, 2, generator=g)
    columns = torch.arange(b)
    known = (None, None)  # (t, the policy's eps for x at t) when scoring already computed it
    steps = []  # per pair-making step: x_t, t, best and worst candidate, whether the pair is kept
    for t in ddim.timesteps.tolist():
        eps = known[1] if known[0] == t else ctx.policy(x, torch.full((b,), t))
        mean, std = ddim_step_gaussian(ddim, eps, t, x)  # (b, 2), float
        if t >= opts["t_max"]:  # early, very noisy steps: plain sampling, no pairs (paper 003 Sec. 4.3)
            x = mean + std * torch.randn(b, 2, generator=g)
            continue
        candidates = mean + std * torch.randn(k, b, 2, generator=g)  # k draws from the shared x_t: (k, b, 2)
        t_prev = previous_timestep(ddim, t)
        scores, candidate_eps = score_candidates(ctx, candidates.reshape(k * b, 2), t_prev)
        (best_score, best), (worst_score, worst) = scores.reshape(k, b).max(0), scores.reshape(k, b).min(0)  # (b,)
        pair_probs = torch.softmax(torch.stack([best_score, worst_score]), dim=0)  # (2, b)
        keep = (pair_probs[0] - pair_probs[1]) > opts["threshold"]  # the authors' compare function
        steps.append((x, torch.full((b,), t), candidates[best, columns], candidates[worst, columns], keep))
        chosen = torch.randint(k, (b,), generator=g)
        x = candidates[chosen, columns]  # continue from a random candidate (Sec. 4.3)
        if candidate_eps is not None:  # the next step needs the policy's eps for x at t_prev: scoring computed it
            known = (t_prev, candidate_eps.reshape(k, b, 2)[chosen, columns])  # (rows of a forward are independent)
    x_t, t, x_w, x_l, keep = (torch.cat(column) for column in zip(*steps))
    return {"x_t": x_t[keep], "t": t[keep], "x_w": x_w[keep], "x_l": x_l[keep]}


def step_log_probs(ctx: FineTuneContext, model: nn.Module, pairs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``log pi(x_w | x_t)`` and ``log pi(x_l | x_t)`` ``(P,)`` under ``model``: one forward and one step Gaussian for
    all pairs (winner and loser share it: same ``x_t``), each row with the alphas of its own timestep."""
    eps = model(pairs["x_t"], pairs["t"])
    abar_t, abar_prev = step_alphas_per_row(ctx.ddim, pairs["t"])
    mean, std = minipref.ddim_step_gaussian(eps, pairs["x_t"], abar_t, abar_prev, eta=1.0)  # (P, 2), (P, 1)
    return gaussian_step_log_prob(pairs["x_w"], mean, std), gaussian_step_log_prob(pairs["x_l"], mean, std)


def spo_step(ctx: FineTuneContext, step: int) -> LossOutput:
    """One SPO update: a rollout, then ``spo_loss`` on its kept pairs (a zero loss if none was kept)."""
    if "spm" not in ctx.state and not ctx.spec.options["oracle"]:
        ctx.state["spm"], ctx.state["spm_losses"] = train_preference_model(
            ctx.reference, ctx.scheduler, ctx.data, ctx.generator
        )
    pairs = rollout(ctx)
    if len(pairs["t"]) == 0:
        zero = sum(p.sum() for p in ctx.policy.parameters()) * 0.0
        return LossOutput(zero, {"loss": float("nan"), "pairs": 0.0})
    logp_w, logp_l = step_log_probs(ctx, ctx.policy, pairs)
    with torch.no_grad():
        ref_logp_w, ref_logp_l = step_log_probs(ctx, ctx.reference, pairs)
    out = get_objective("spo").fn(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=ctx.spec.beta)
    out.metrics["pairs"] = float(len(pairs["t"]))
    return out
