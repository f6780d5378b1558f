# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (minipref)
#     language: python
#     name: minipref
# ---

# %% [markdown]
# # Lesson 6: SPO, preferences between single denoising steps
#
# **Assumes** lesson 1 (the reverse step as a Gaussian policy), lesson 2 (Diffusion-DPO) and, from
# [00_prerequisites.md](00_prerequisites.md), section 3 (DPO for language models).
#
# Step-by-step Preference Optimization (Liang et al., *Aesthetic Post-Training Diffusion Models from Generic
# Preferences with Step-by-step Preference Optimization*, arXiv:2406.04314, Sec. 4; `minipref.spo_loss`) makes its
# pairs online, one denoising step at a time: from one shared $x_t$ it draws a few candidate next steps, a
# step-aware preference model picks the best and the worst, and the policy is trained with DPO on the two steps'
# log-probability ratios. This lesson checks the stochastic DDIM step those log-probabilities come from, predicts
# where (at which $t$) the toy's online pairs are kept, and shows what SPO's clipped ratio does to the gradient.

# %%
import copy
import math
import shutil

import lesson
import matplotlib.pyplot as plt
import numpy as np
import torch

import minipref
from toy.data import PreferenceData
from toy.run import RunConfig, generator_for, run
from toy.sampling import make_ddim, make_sampler, step_alphas

QUICK = lesson.QUICK
reference, scheduler, _ = lesson.pretrained_toy()
data = PreferenceData.draw(2000, generator_for(0, "preference data"))
sampler = make_sampler(scheduler)  # DPM-Solver++, 25 steps (toy/sampling.py)
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## The stochastic DDIM step
#
# SPO samples with a **stochastic DDIM step** ($\eta = 1$): from $x_t$ the next point is Gaussian,
# $x_{t-1} \sim \mathcal N(\mu(\epsilon_\theta, x_t), s_t^2 I)$ (`minipref.ddim_step_gaussian`), so the policy has a
# log-probability for every step (`minipref.gaussian_step_log_prob`, a mean over elements). At a step with
# $t < 750$ it draws $k$ candidates from one shared $x_t$, scores each with a step-aware preference model, and the
# best and worst form a pair, kept only if $\mathrm{softmax}([s_{\mathrm{best}}, s_{\mathrm{worst}}])$ differs by
# more than a threshold. The loss is DPO on the steps' log-ratios, clipped like PPO:
#
# $$\log\rho = \mathrm{clamp}\Big(\log\pi_\theta(x_{t-1} \mid x_t) - \log\pi_{\mathrm{ref}}(x_{t-1} \mid x_t),\;
# \log(1 - c),\; \log(1 + c)\Big), \qquad \mathcal L_{\mathrm{SPO}} = \mathrm{mean}\,\mathrm{softplus}\big(-\beta(\log\rho_w - \log\rho_l)\big)$$
#
# with $\beta = 10$ and $c = 0.1$ (the SPO authors' configuration). First, the Gaussian is what diffusers'
# `DDIMScheduler.step(..., eta=1)` samples:

# %%
ddim = make_ddim(scheduler)  # 20 trailing steps, set_alpha_to_one=False (toy/sampling.py)
timestep = int(ddim.timesteps[10])
x_t = torch.randn(64, 2, generator=generator)
with torch.no_grad():
    eps_ref = reference(x_t, torch.full((64,), timestep))
abar_t, abar_prev = step_alphas(ddim, timestep)
mean, std = minipref.ddim_step_gaussian(eps_ref, x_t, abar_t, abar_prev, eta=1.0)
diffusers_step = ddim.step(eps_ref, timestep, x_t, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
ours = mean + std * torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
lesson.check(f"DDIMScheduler.step(eta=1) at t = {timestep} samples N(mean, std^2) of minipref.ddim_step_gaussian",
             torch.allclose(diffusers_step, ours, atol=1e-5), f"largest gap {(diffusers_step - ours).abs().max():.1e}, std {std[0].item():.4f}")

# %% [markdown]
# ## The online pairs
#
# The toy's SPO machinery (`toy/spo.py`): a 20-step chain, 4 candidates per step from a shared $x_t$, steps with
# $t < 750$, threshold 0.3, the chain continues from a random candidate. We score with the toy's exact step-aware
# preference (the log-density ratio of the noised desirable and undesirable Gaussians, `--spo_oracle`). At
# $\theta = \mathrm{ref}$ every log-ratio is 0 and the loss is $\log 2$.

# %%
from toy.methods import METHODS  # noqa: E402
from toy.spo import rollout, step_log_probs  # noqa: E402
from toy.train import FineTuneContext  # noqa: E402

spec = METHODS["spo"].with_overrides(oracle=True)
ctx = FineTuneContext(spec, copy.deepcopy(reference), reference, scheduler, sampler, ddim, data, generator)
pairs = rollout(ctx)
counts = {int(t): int(n) for t, n in zip(*torch.unique_consecutive(pairs["t"], return_counts=True))}
print(f"{len(pairs['t'])} pairs kept from {spec.batch} chains; per timestep: {counts}")
logp_w, logp_l = step_log_probs(ctx, ctx.policy, pairs)
ref_logp_w, ref_logp_l = step_log_probs(ctx, reference, pairs)
spo_at_init = minipref.spo_loss(logp_w, ref_logp_w, logp_l, ref_logp_l, beta=10.0, clip=0.1)
lesson.check("every kept pair is a step with t < 750", all(t < 750 for t in counts))
lesson.check("SPO at theta = ref: loss = log 2", abs(spo_at_init.loss.item() - math.log(2)) < 1e-6,
             f"{spo_at_init.loss.item():.6f}")

# %% [markdown]
# **Why the toy's kept pairs sit at small $t$ (nearly all at $t \le 249$) although the window is $t < 750$.** This
# is a property of the toy,
# not of SPO: the SPO paper (Sec. 5.4, its ablation of timestep ranges on SD-1.5) finds $[250, 500]$ the most useful
# range, with enough variance in the candidates there to make pairs. On the toy the oracle scores a candidate with
# the log-density ratio of the noised Gaussians at the candidate's step, which is linear in $y$ with slope
# $\sqrt{\bar\alpha}\cdot 0.2 / (0.01\,\bar\alpha + 1 - \bar\alpha)$. Four candidates drawn from one $x_t$ differ
# only by the step's noise, $s_t z$, so the best-worst score gap is slope $\times\, s_t \times$ (range of 4 standard
# normals in $y$). A pair is kept when $\mathrm{softmax}([s_{\mathrm{best}}, s_{\mathrm{worst}}])$ differs by more
# than 0.3, i.e. when the gap exceeds $2\,\mathrm{atanh}(0.3) = 0.62$. At large $t$ the noised Gaussians overlap
# ($\bar\alpha$ small, the slope about $0.2\sqrt{\bar\alpha}$): no gap is big enough. At the last step the DDIM
# noise $s_t$ is small: the candidates are close, and far fewer pairs are kept than one step earlier. In between
# most chains yield a pair. This predicts the kept
# fraction at every step exactly (the score is linear, so where $x_t$ is does not matter). An SD model's
# step-aware preference model sees image detail that survives far more noise than the toy's two Gaussians do.

# %%
from toy.sampling import previous_timestep  # noqa: E402

ranges = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
ranges = ranges.max(1).values - ranges.min(1).values  # the spread of 4 candidates' noise in y, in units of std_t
needed_gap = 2 * math.atanh(0.3)
lesson.check_close("softmax([a, b]) differs by more than 0.3 iff |a - b| > 2 atanh(0.3) = 0.62", needed_gap, 0.62, abs_tol=0.005)
predicted_keep, observed_keep = {}, {}
for step_t in [int(v) for v in ddim.timesteps if v < 750]:
    t_prev = previous_timestep(ddim, step_t)
    abar_score = 1.0 if t_prev < 0 else float(scheduler.alphas_cumprod[t_prev])
    slope = math.sqrt(abar_score) * 0.2 / (abar_score * 0.01 + 1 - abar_score)
    _, step_std = minipref.ddim_step_gaussian(torch.zeros(1, 2), torch.zeros(1, 2), *step_alphas(ddim, step_t), eta=1.0)
    predicted_keep[step_t] = (slope * step_std.item() * ranges > needed_gap).double().mean().item()
    observed_keep[step_t] = counts.get(step_t, 0) / spec.batch
print("t:         " + " ".join(f"{t:>6}" for t in predicted_keep))
print("predicted: " + " ".join(f"{v:>6.3f}" for v in predicted_keep.values()))
print("observed:  " + " ".join(f"{v:>6.3f}" for v in observed_keep.values()))
worst_z = max(abs(observed_keep[t] - p) / math.sqrt(max(p * (1 - p), 1e-4) / spec.batch) for t, p in predicted_keep.items())
lesson.check_range("observed kept fraction == predicted at every step (largest gap in binomial SEs)", worst_z, high=4.0)
lesson.check("the prediction keeps (almost) nothing at t >= 299: expected pairs per rollout < 1 at every such step",
             all(p * spec.batch < 1 for t, p in predicted_keep.items() if t >= 299),
             ", ".join(f"t {t}: {p * spec.batch:.2f}" for t, p in predicted_keep.items() if t >= 299))
lesson.check("and the rollout kept no pair at t >= 349 (at t = 299 it may keep a few: under one expected)",
             all(t <= 299 for t in counts), str(counts))
last, before_last = sorted(predicted_keep)[:2]  # the last DDIM step (t = 49 -> x_0) and the one before it
lesson.check("at the last step, whose DDIM noise is small, the prediction keeps far fewer pairs than one step earlier (< 1/4)",
             predicted_keep[last] < 0.25 * predicted_keep[before_last],
             f"t {last}: {predicted_keep[last]:.3f}, t {before_last}: {predicted_keep[before_last]:.3f}")

# %% [markdown]
# ## The clip is a trust region
#
# Once a step's log-ratio leaves $[\log 0.9, \log 1.1]$, that side of the pair gives **exactly zero** gradient.
# Sweeping the winner's log-ratio with the loser's fixed at 0:

# %%
log_ratio = torch.linspace(-0.3, 0.3, 601, dtype=torch.float64, requires_grad=True)
zeros = torch.zeros_like(log_ratio)
per_pair = [minipref.spo_loss(log_ratio[i:i + 1], zeros[i:i + 1], zeros[i:i + 1], zeros[i:i + 1]).loss
            for i in range(len(log_ratio))]
loss_curve = torch.stack(per_pair)
(grad_curve,) = torch.autograd.grad(loss_curve.sum(), log_ratio)
low, high = math.log(0.9), math.log(1.1)
inside = (log_ratio > low) & (log_ratio < high)
lesson.check("zero gradient outside the clip range, nonzero inside",
             bool((grad_curve[~inside] == 0).all()) and bool((grad_curve[inside] != 0).all()),
             f"clip range [{low:.4f}, {high:.4f}]")

fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.plot(log_ratio.detach(), loss_curve.detach(), label="L_SPO")
ax.plot(log_ratio.detach(), grad_curve, label="d L / d log-ratio_w")
for x in (low, high):
    ax.axvline(x, color="0.6", ls=":", lw=1)
ax.axhline(math.log(2), color="0.8", lw=0.8)
ax.set_xlabel("log pi_theta(x_w | x_t) - log pi_ref(x_w | x_t)   (loser's fixed at 0)")
ax.set_title("SPO: the clipped ratio stops pushing outside [log 0.9, log 1.1]", fontsize=10)
ax.legend(fontsize=8)
lesson.save_figure(fig, "06_spo_clip")

# %% [markdown]
# Note the left side: a winner the policy has made *less* likely than the reference by more than 10% is not pulled
# back either. The clamp cuts the gradient in both directions; PPO's $\min(\text{unclipped}, \text{clipped})$ would
# keep it on that side (exercise 2). minipref follows the SPO authors' code (a clamp); the metric `clip_frac`
# reports how many pairs are outside, and a clip fraction near 1 means the run has stopped learning (docs/toy.md
# shows it at too high a learning rate).
#
# ## SPO on the toy
#
# `python -m toy --methods spo` (quick mode in CI; docs/toy.md has the full run). SPO follows its preference model,
# and on the toy that model (learned, or the exact oracle) ranks by height, like the pairs of lesson 2 do: expect
# the samples to move up, not towards the desirable Gaussian.

# %%
toy_out = lesson.OUT / "06_toy_run"
toy_metrics = run(RunConfig(out=toy_out, quick=QUICK, methods=["spo"], progress=False))
print((toy_out / "metrics.md").read_text())
shutil.copyfile(toy_out / "samples.png", lesson.OUT / "06_toy_samples.png")
print(f"figure: {lesson.OUT / '06_toy_samples.png'}")
if lesson.IN_NOTEBOOK:
    from IPython.display import Image, display

    display(Image(filename=str(lesson.OUT / "06_toy_samples.png")))
tm = toy_metrics["methods"]
lesson.check("SPO trains to finite samples", bool(np.isfinite(tm["spo"]["energy_distance"])))
lesson.check_range("SPO's samples move up", tm["spo"]["mean"][1] - tm["reference"]["mean"][1], 0.03)

# %% [markdown]
# ## Takeaways
#
# * SPO's policy is the stochastic DDIM step, a Gaussian with a log-probability; its pairs are two candidate steps
#   from one shared $x_t$, ranked by a step-aware preference model, and its loss is DPO on clipped step log-ratios.
# * A pair exists only where the step-aware preference can tell candidates apart. On the toy that is nearly only
#   $t \le 249$:
#   not at large $t$ (the noised Gaussians overlap), and few at the last step (the candidates nearly coincide). The SPO paper
#   finds $[250, 500]$ the most useful range on SD-1.5: where pairs appear depends on the model and the preference.
# * The clamp is a trust region in both directions: outside $[\log 0.9, \log 1.1]$ a step gives no gradient.
#
# ## Exercises
#
# 1. Lower SPO's threshold from 0.3 to 0.1 and predict, with the formula above, at which timesteps pairs appear.
# 2. Replace the clamp by PPO's pessimistic form, $\min(h, \mathrm{clamp}(h))$ per side for the winner's log-ratio
#    $h$ (with the loser's fixed at 0), and predict on which side of the clip range the gradient comes back.
#
# Next: lesson 7 runs the same functions with the full-scale machinery, on a CPU image lab.

# %%
lesson.save_results("06_spo", {
    "quick": QUICK, "spo_pairs": len(pairs["t"]), "spo_loss_at_init": spo_at_init.loss.item(),
    "spo_keep": {"predicted": predicted_keep, "observed": observed_keep, "worst_z": worst_z}, "spo_kept_t": sorted(counts),
    "toy": {name: {k: v[k] for k in ("desirable_frac", "undesirable_frac", "energy_distance", "mean")} for name, v in tm.items()},
})

# %% [markdown]
# ## Solutions
#
# Run with `python tutorials/06_spo.py --solutions` (or set `lesson.SOLUTIONS = True` in a notebook); each solution
# checks its prediction.
#
# **1.** The threshold enters only through the gap needed, $2\,\mathrm{atanh}(0.1) = 0.20$ instead of 0.62: a third.
# Steps where slope $\times\, s_t \times$ range already came close to 0.62 now keep pairs, so the window widens to
# larger $t$ (and more pairs are kept at every step that had some). The prediction and a rollout with threshold 0.1
# below: pairs now appear up to $t \approx 450$-$500$, reaching into the range the SPO paper found most useful on
# SD-1.5.
#
# **2.** PPO's $\min$ takes the unclipped term when it is the *smaller* (pessimistic) one. For the winner the
# objective is to raise $h$; the clipped term is the smaller one above $\log 1.1$ (no more reward for pushing
# further), and the unclipped one below $\log 0.9$. So the gradient comes back on the *left* side: a winner made
# less likely than under the reference is pulled back, as PPO intends; the right side stays flat.

# %%
def solution_1() -> dict:
    needed = 2 * math.atanh(0.1)
    predicted_low = {}
    for step_t in [int(v) for v in ddim.timesteps if v < 750]:
        t_prev = previous_timestep(ddim, step_t)
        abar_score = 1.0 if t_prev < 0 else float(scheduler.alphas_cumprod[t_prev])
        slope = math.sqrt(abar_score) * 0.2 / (abar_score * 0.01 + 1 - abar_score)
        _, step_std = minipref.ddim_step_gaussian(torch.zeros(1, 2), torch.zeros(1, 2), *step_alphas(ddim, step_t), eta=1.0)
        predicted_low[step_t] = (slope * step_std.item() * ranges > needed).double().mean().item()
    low_spec = METHODS["spo"].with_overrides(oracle=True, threshold=0.1)
    low_ctx = FineTuneContext(low_spec, copy.deepcopy(reference), reference, scheduler, sampler, ddim, data,
                              torch.Generator().manual_seed(1))
    low_pairs = rollout(low_ctx)
    low_counts = {int(t): int(n) for t, n in zip(*torch.unique_consecutive(low_pairs["t"], return_counts=True))}
    print("1. threshold 0.1, predicted kept fraction: " + ", ".join(f"t {t}: {p:.3f}" for t, p in predicted_low.items()))
    print(f"1. rollout: {low_counts}")
    worst = max(abs(low_counts.get(t, 0) / low_spec.batch - p) / math.sqrt(max(p * (1 - p), 1e-4) / low_spec.batch)
                for t, p in predicted_low.items())
    lesson.check_range("1. the rollout's kept fraction matches the prediction at every step (in binomial SEs)", worst, high=4.0)
    widened = [t for t, p in predicted_low.items() if p * low_spec.batch >= 1 and predicted_keep[t] * spec.batch < 1]
    lesson.check("1. the window widens: some steps keep pairs at 0.1 that kept (almost) none at 0.3, all at larger t",
                 bool(widened) and min(widened) > max(t for t, p in predicted_keep.items() if p * spec.batch >= 1),
                 f"new steps {widened}")
    return {"predicted": predicted_low, "observed": low_counts, "new_steps": widened}


def solution_2() -> dict:
    h = torch.linspace(-0.3, 0.3, 601, dtype=torch.float64, requires_grad=True)
    clipped = h.clamp(math.log(0.9), math.log(1.1))
    pessimistic = torch.minimum(h, clipped)  # PPO: the smaller of the unclipped and the clipped term
    loss_ppo = torch.nn.functional.softplus(-10.0 * pessimistic)  # the loser's log-ratio fixed at 0, beta 10
    (grad_ppo,) = torch.autograd.grad(loss_ppo.sum(), h)
    left, right = h.detach() < math.log(0.9), h.detach() > math.log(1.1)
    lesson.check("2. PPO's min: the gradient comes back below log 0.9 (nonzero there)", bool((grad_ppo[left] != 0).all()))
    lesson.check("2. ... and stays zero above log 1.1", bool((grad_ppo[right] == 0).all()))
    return {"left_gradient_mean": grad_ppo[left].mean().item()}


lesson.run_solutions("06_spo", solution_1, solution_2)
