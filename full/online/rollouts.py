"""SPO's collect phase: one chain per prompt, `k` candidates per step from the shared `x_t`, the step-aware preference
model picks the best and the worst, a uniformly random candidate continues (paper 003 Sec. 4.3, Table 9); MSPO rolls
each candidate further before scoring it (Sec. 4.5). The kept `(x_t, x_{t-1})` tuples are what SPO trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from full.models import pipeline as models
from full.online.preference import best_worst_pair, decode_latents, predicted_x0, preference_gap
from full.online.sampler import Guidance, guided_prediction, step_gaussian
from full.online.spm import StepAwarePreferenceModel



@dataclass
class StepPairs:
    """Kept training tuples. Index 0 of dim 1 is the winner's side, 1 the loser's."""

    x_t: Tensor  # (N, 2, C, h, w): the state each step starts from (the same for a one-step SPO pair)
    x_prev: Tensor  # (N, 2, C, h, w): the sampled x_{t-1}
    timesteps: Tensor  # (N,) long
    hidden: Tensor  # (N, L, D): the prompt
    pooled: Tensor | None  # (N, P), SDXL

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    @classmethod
    def empty(cls, latent_shape, guide: "Guidance", device) -> "StepPairs":
        latents = torch.empty((0, 2, *latent_shape), device=device)
        pooled = None if guide.uncond.pooled is None else guide.uncond.pooled[:0]
        return cls(latents, latents, torch.empty(0, dtype=torch.long, device=device), guide.uncond.hidden[:0], pooled)

    def select(self, index: Tensor) -> "StepPairs":
        return StepPairs(self.x_t[index], self.x_prev[index], self.timesteps[index], self.hidden[index],
                         None if self.pooled is None else self.pooled[index])


@dataclass
class Branch:
    """What happened at one branching step (diagnostics and tests): all (B,) except `scores` (k, B)."""

    timestep: int
    score_timestep: int
    scores: Tensor
    best: Tensor
    worst: Tensor
    keep: Tensor
    gap: Tensor
    chosen: Tensor  # the candidate the chain continued from


@dataclass
class SpoSettings:
    num_candidates: int
    threshold: float
    max_timestep: int = 750
    num_inner_steps: int = 0
    eta: float = 1.0
    spm_dtype: torch.dtype = torch.float32


def _pick(x: Tensor, k: int, index: Tensor) -> Tensor:
    """Candidate-major `(k*B, ...)` -> `(B, ...)`: for each prompt b, candidate `index[b]`."""
    per_candidate = x.view(k, -1, *x.shape[1:])  # (k, B, ...)
    return per_candidate[index, torch.arange(per_candidate.shape[1], device=x.device)]


@torch.no_grad()
def collect_step_pairs(unet, scheduler, vae, spm: StepAwarePreferenceModel, prompts: list[str],
                       cond: models.PromptEmbeds, guide: Guidance, settings: SpoSettings, latent_shape,
                       generator: torch.Generator) -> tuple[StepPairs, list[Branch]]:
    """Run one chain per prompt through the DDIM schedule and return the kept step pairs (and every branch)."""
    device, k, b = cond.hidden.device, settings.num_candidates, len(prompts)
    timesteps = [int(t) for t in scheduler.timesteps]

    def predict(x, t, copies):  # the guided UNet output for `copies` candidate sets of the B prompts
        pooled = None if cond.pooled is None else cond.pooled.repeat(copies, 1)
        embeds = models.PromptEmbeds(cond.hidden.repeat(copies, 1, 1), pooled)
        return guided_prediction(unet, x, torch.full((x.shape[0],), t, device=device), embeds, guide)

    def gaussian(out, x, t):
        return step_gaussian(scheduler, out, x, torch.full((x.shape[0],), t, device=device), settings.eta)

    def sample(mean, std):
        return mean + std * torch.randn(mean.shape, generator=generator, device=device)

    x = torch.randn((b, *latent_shape), generator=generator, device=device) * scheduler.init_noise_sigma
    out, i, kept, branches = None, 0, [], []
    while i < len(timesteps):
        t = timesteps[i]
        out = predict(x, t, 1) if out is None else out
        mean, std = gaussian(out, x, t)
        if t >= settings.max_timestep or float(std.max()) == 0:  # plain sampling: too noisy, or deterministic
            x, out, i = sample(mean, std), None, i + 1
            continue
        # k candidates x_{t-1} from the shared x_t, candidate-major (k*B, C, h, w)
        segment = [(t, x.repeat(k, 1, 1, 1), sample(mean.repeat(k, 1, 1, 1), std.repeat(k, 1, 1, 1)))]
        candidates, i = segment[0][2], i + 1
        for _ in range(settings.num_inner_steps):  # MSPO: roll every candidate chain further
            if i == len(timesteps):
                break
            inner_mean, inner_std = gaussian(predict(candidates, timesteps[i], k), candidates, timesteps[i])
            following = sample(inner_mean, inner_std)
            if float(inner_std.max()) > 0:  # a deterministic step has no log-probability to train on
                segment.append((timesteps[i], candidates, following))
            candidates, i = following, i + 1
        # each candidate's own x0: the next step's guided output at t_prev (reused below), or itself after the last
        if i < len(timesteps):
            out_next = predict(candidates, timesteps[i], k)
            x0, score_t = predicted_x0(candidates, out_next, timesteps[i], scheduler), timesteps[i]
        else:
            out_next, x0, score_t = None, candidates, 0
        images = decode_latents(vae, x0)  # (k*B, 3, H, W)
        scores = spm.score_images(images.to(settings.spm_dtype), score_t, prompts=list(prompts) * k)
        scores = scores.float().view(k, b)  # (k, B)
        best, worst, keep = best_worst_pair(scores, settings.threshold)

        def sides(z):  # (k*B, ...) -> (kept, 2, ...): winner's then loser's candidate of each kept prompt
            return torch.stack([_pick(z, k, best), _pick(z, k, worst)], dim=1)[keep]

        for step_t, starts, ends in segment:
            kept.append((sides(starts), sides(ends), torch.full((int(keep.sum()),), step_t, device=device),
                         keep.nonzero().flatten()))
        chosen = torch.randint(k, (b,), generator=generator, device=device)  # Sec. 4.3: a random candidate continues
        x = _pick(candidates, k, chosen)
        out = None if out_next is None else _pick(out_next, k, chosen)
        columns = torch.arange(b, device=device)
        gap = preference_gap(scores[best, columns], scores[worst, columns])  # (B,)
        branches.append(Branch(t, score_t, *(v.cpu() for v in (scores, best, worst, keep, gap, chosen))))
    if not kept:
        return StepPairs.empty(latent_shape, guide, device), branches
    x_t, x_prev, steps, prompt_index = (torch.cat(parts) for parts in zip(*kept))
    pooled = None if cond.pooled is None else cond.pooled[prompt_index]
    return StepPairs(x_t.float(), x_prev.float(), steps, cond.hidden[prompt_index], pooled), branches



def share_pairs(accelerator, pairs: StepPairs, generator: torch.Generator) -> StepPairs:
    """Pool every process's tuples, shuffle them with one permutation, give each process an equal share (as the
    authors' code does): the processes then run the same number of optimizer steps."""
    if accelerator.num_processes > 1:
        counts = accelerator.gather(torch.tensor([len(pairs)], device=accelerator.device)).tolist()
        width = max(counts)

        def pool(x: Tensor) -> Tensor:
            padded = accelerator.gather(accelerator.pad_across_processes(x.contiguous(), dim=0))  # (P * width, ...)
            return torch.cat([padded[p * width:p * width + n] for p, n in enumerate(counts)])

        pairs = StepPairs(pool(pairs.x_t), pool(pairs.x_prev), pool(pairs.timesteps), pool(pairs.hidden),
                          None if pairs.pooled is None else pool(pairs.pooled))
    share = len(pairs) // accelerator.num_processes
    order = torch.randperm(len(pairs), generator=generator)[accelerator.process_index * share:][:share]
    return pairs.select(order.to(pairs.timesteps.device))



def collect_stats(accelerator, branches: list[Branch], tuples: int) -> dict[str, float]:
    """Kept fraction, preference gaps and scores of one collect phase, over all processes. A branch point is one
    prompt at one branching step; `tuples` counts training tuples (a kept MSPO pair gives one per rolled step)."""
    if branches:
        gaps = torch.cat([br.gap for br in branches])
        scores = torch.cat([br.scores.flatten() for br in branches])
        kept_gap = torch.cat([br.gap[br.keep] for br in branches])
        local = [len(gaps), len(kept_gap), tuples, gaps.mean().item(),
                 kept_gap.mean().item() if len(kept_gap) else float("nan"), scores.mean().item(),
                 scores.std().item() if len(scores) > 1 else 0.0]
    else:
        local = [0, 0, 0] + [float("nan")] * 4
    values = accelerator.gather(torch.tensor([local], dtype=torch.float64, device=accelerator.device))  # (P, 7)
    totals, means = values[:, :3].sum(0), values[:, 3:].nanmean(0)
    return {"branch_points": totals[0].item(), "kept_pairs": totals[1].item(), "tuples": totals[2].item(),
            "kept_fraction": (totals[1] / totals[0]).item() if totals[0] > 0 else 0.0,
            "mean_gap": means[0].item(), "mean_kept_gap": means[1].item(), "score_mean": means[2].item(),
            "score_std": means[3].item()}

