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
# # Lesson 5: Diff-contrast and DSPO, two other uses of the same pairs
#
# **Assumes** lesson 2 (Diffusion-DPO on the toy) and, from [00_prerequisites.md](00_prerequisites.md), section 3
# (DPO for language models).
#
# Both objectives train on the same (winner, loser) pairs as Diffusion-DPO and change what is done with them:
#
# * **Diff-contrast** (*Diffusion Preference Alignment via Relative Text-Image Contrast*, Eq. (9);
#   `minipref.contrast_loss`) compares each winner with *every* loser in the batch, weighted by how similar the two
#   (image, prompt) pairs are. Its weighting comes from Relative Preference Optimization for language models (Yin
#   et al., arXiv:2402.10958).
# * **DSPO** (Zhu, Xiao and Honavar, *DSPO: Direct Score Preference Optimization for Diffusion Model Alignment*,
#   Eq. (13); `minipref.dspo_loss`) keeps the pretraining objective (score matching on the winner) and adds the
#   preference as a correction to its target.

# %%
import copy
import shutil

import lesson
import matplotlib.pyplot as plt
import numpy as np
import torch

import minipref
from toy.data import PreferenceData
from toy.model import draw_t_and_noise
from toy.run import RunConfig, generator_for, run

QUICK = lesson.QUICK
reference, scheduler, _ = lesson.pretrained_toy()
data = PreferenceData.draw(2000, generator_for(0, "preference data"))
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## Diff-contrast: every winner against every loser, weighted
#
# With embeddings $f(y, x)$ of each (image, prompt) (CLIP at full scale: `ClipPairEncoder` in `full/`):
#
# $$\tilde W_{ij} = \exp\Big(-\frac{1 - \cos(f^w_i, f^l_j)}{\tau}\Big), \qquad W_{ij} = \frac{\tilde W_{ij}}{\sum_k \tilde W_{ik}}
# \text{ (detached)}, \qquad \mathcal L = \mathrm{mean}_i \sum_j W_{ij}\, \mathrm{softplus}\big(-(r^w_i - r^l_j)\big).$$
#
# Below, 12 pairs from 3 prompts: the embedding is a prompt part (shared by the 4 pairs of a prompt) and an image
# part (a loser looks like its winner, plus noise). Small $\tau$ keeps each winner with its own loser (DPO); larger
# $\tau$ spreads the weight over the losers of the same prompt, then over everything.

# %%
g = torch.Generator().manual_seed(3)
prompts = torch.randn(3, 8, generator=g).repeat_interleave(4, dim=0)  # (12, 8): pairs 0-3 share prompt 0, ...
images_w = torch.randn(12, 8, generator=g)
images_l = images_w + 0.5 * torch.randn(12, 8, generator=g)  # the loser of a pair resembles its winner
emb_w, emb_l = torch.cat([prompts, images_w], 1), torch.cat([prompts, images_l], 1)  # (12, 16)
TAUS = (0.01, 0.1, 0.5, 5.0)
weights = {tau: minipref.contrast_weights(emb_w, emb_l, tau=tau) for tau in TAUS}

fig, axes = plt.subplots(1, len(TAUS), figsize=(3.4 * len(TAUS), 3.3))
for ax, tau in zip(axes, TAUS):
    image = ax.imshow(weights[tau].numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"tau = {tau}: diag {weights[tau].diagonal().mean():.2f}", fontsize=10)
    ax.set_xlabel("loser j")
axes[0].set_ylabel("winner i")
fig.colorbar(image, ax=axes, shrink=0.8)
fig.suptitle("Diff-contrast weights W (rows sum to 1); pairs 0-3, 4-7, 8-11 share a prompt", fontsize=10)
lesson.save_figure(fig, "05_contrast_weights")

same_prompt = {}
for tau in TAUS:
    w = weights[tau]
    same_prompt[tau] = sum(w[i, 4 * (i // 4): 4 * (i // 4) + 4].sum() for i in range(12)).item() / 12
    print(f"tau {tau:>5}: mean weight on own loser {w.diagonal().mean():.3f}, on the same prompt's losers {same_prompt[tau]:.3f}")
lesson.check("tau 0.1: the weight leaves the own loser but stays within the prompt",
             weights[0.1].diagonal().mean() < 0.95 and same_prompt[0.1] > 0.95,
             f"own {weights[0.1].diagonal().mean():.3f}, same prompt {same_prompt[0.1]:.3f}")
lesson.check_range("tau 5: it spreads over all prompts (same-prompt weight near the uniform 4/12)", same_prompt[5.0], high=0.5)
lesson.check("rows sum to 1 for every tau", all(torch.allclose(w.sum(1), torch.ones(12)) for w in weights.values()))
lesson.check("tau -> 0: W -> I (each winner keeps its own, most similar, loser)", weights[0.01].diagonal().min() > 0.99)
uniform = minipref.contrast_weights(emb_w, emb_l, tau=1e4)
lesson.check("tau -> inf: W -> uniform", torch.allclose(uniform, torch.full((12, 12), 1 / 12), atol=1e-3))

errs = [0.1 + 0.01 * torch.rand(12, generator=g, dtype=torch.float64) for _ in range(4)]  # err_w, err_l, ref_w, ref_l
eye = torch.eye(12, dtype=torch.float64)
outside = minipref.contrast_loss(*errs, None, None, beta=5000.0, weights=eye).loss.item()
inside = minipref.contrast_loss(*errs, None, None, beta=5000.0, weights=eye, weights_inside=True).loss.item()
dpo = minipref.dpo_loss(*errs, beta=5000.0).loss.item()
lesson.check("W = I, weights outside the log-sigmoid (Eq. (9); docs/conventions.md I7, the Diff-contrast identity) == DPO", abs(outside - dpo) < 1e-12, f"{outside:.6f}")
lesson.check("W = I, weights inside (the LLM-RPO form) != DPO: off-diagonal terms add softplus(0) = log 2",
             abs(inside - dpo) > 0.1, f"{inside:.6f} vs DPO {dpo:.6f}")

# %% [markdown]
# ## DSPO: the preference as a correction to score matching
#
# DSPO (Eq. (13)) regresses the model onto the preference-tilted score, for the *winner* of each pair:
#
# $$\mathcal L_{\mathrm{DSPO}} = \Big\lVert (\epsilon_\theta - \epsilon) - \beta\gamma\,\big(1 - \sigma(r_w - r_l)\big)\,(\epsilon_\theta - \epsilon_{\mathrm{ref}}) \Big\rVert^2 .$$
#
# The first term is plain SFT. The gate $1 - \sigma(m)$ is exactly the weight DPO puts on a pair's gradient
# ($\frac{d}{dm}\mathrm{softplus}(-m) = -(1 - \sigma(m))$), so the correction switches off as the pair becomes well
# separated. Two consequences (docs/conventions.md I8, the DSPO identity), checked in float64 on the toy network:
#
# * $\beta = 0$ is SFT on the winners (value and gradient);
# * at $\theta = \mathrm{ref}$ the correction vanishes and $\sigma(0) = 1/2$, so the gradient is
#   $(1 - \beta\gamma/2)$ times SFT's. With the paper's SD1.5 values in our convention ($\beta = 0.001$,
#   $\gamma = 1$) that is 0.9995: DSPO starts as SFT. With $\gamma = 1$ at the toy's $\beta = 500$ it would be
#   $-249$: *anti*-SFT, which is why the toy uses $\gamma = 1/(2\beta)$ (the paper's Theorem 1), a factor of 3/4.

# %%
policy64, reference64 = copy.deepcopy(reference).double().requires_grad_(True), copy.deepcopy(reference).double()
params = [p for name, p in policy64.named_parameters() if not name.startswith("condition")]  # (CSFT's input, unused)
x_w, x_l = data.batch(128, generator, desirable=True).double(), data.batch(128, generator, desirable=False).double()
t, noise = draw_t_and_noise(128, generator)
noise = noise.double()


def dspo_inputs():
    x_t = scheduler.add_noise(torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([t, t]))
    pred = policy64(x_t, torch.cat([t, t]))
    with torch.no_grad():
        ref_pred = reference64(x_t, torch.cat([t, t]))
    err_l = minipref.per_sample_mse(pred.chunk(2)[1], noise)
    ref_err_l = minipref.per_sample_mse(ref_pred.chunk(2)[1], noise)
    return pred.chunk(2)[0], ref_pred.chunk(2)[0], noise, err_l, ref_err_l


def grads(loss):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


inputs = dspo_inputs()
sft = minipref.sft_loss(minipref.per_sample_mse(inputs[0], inputs[2])).loss
grad_sft = grads(sft)
dspo0 = minipref.dspo_loss(*dspo_inputs(), beta=0.0).loss
lesson.check("DSPO with beta = 0 == SFT on the winners (value and gradient)",
             abs(dspo0.item() - sft.item()) < 1e-14 and torch.allclose(grads(dspo0), grad_sft, rtol=0, atol=1e-12))
factors = {}
for beta, gamma in ((500.0, 1 / 1000), (0.001, 1.0), (500.0, 1.0)):
    grad_dspo = grads(minipref.dspo_loss(*dspo_inputs(), beta=beta, gamma=gamma).loss)
    factor = (grad_dspo @ grad_sft / (grad_sft @ grad_sft)).item()  # projection; the check below asks for equality
    factors[f"beta={beta:g}, gamma={gamma:g}"] = factor
    lesson.check(f"at theta = ref, beta {beta:g}, gamma {gamma:g}: grad DSPO = (1 - beta*gamma/2) grad SFT",
                 torch.allclose(grad_dspo, (1 - beta * gamma / 2) * grad_sft, rtol=1e-9, atol=1e-12),
                 f"factor {factor:.6f}, predicted {1 - beta * gamma / 2:.6f}")

# DPO's per-pair gradient weight is the same gate: d L_DPO / d err_w_i = (beta / 2B) (1 - sigmoid(m_i)).
e = [(0.1 + 0.01 * torch.rand(16, generator=g, dtype=torch.float64)).requires_grad_(i == 0) for i in range(4)]
out = minipref.dpo_loss(*e, beta=500.0)
margin = minipref.implicit_reward(e[0], e[2], 500.0) - minipref.implicit_reward(e[1], e[3], 500.0)
(d_err_w,) = torch.autograd.grad(out.loss, e[0])
lesson.check("DPO's gradient on a winner is (beta/2B)(1 - sigmoid(margin)): DSPO's gate",
             torch.allclose(d_err_w, 500.0 / (2 * 16) * (1 - torch.sigmoid(margin.detach())), rtol=1e-12))

# %% [markdown]
# **Where DSPO's loss is minimised: an extrapolation away from the reference.** Write
# $g = \beta\gamma\,(1 - \sigma(r_w - r_l))$ for the gate. The loss is the squared length of
# $R = (\epsilon_\theta - \epsilon) - g\,(\epsilon_\theta - \epsilon_{\mathrm{ref}})$, so its smallest possible value
# is 0, reached where $R = 0$:
#
# $$\epsilon_\theta^* = \epsilon + \frac{g}{1 - g}\,(\epsilon - \epsilon_{\mathrm{ref}})$$
#
# (with $g$ evaluated at that point; the gate's own gradient does not move the minimum, because $R = 0$ there). The
# target is not the true noise $\epsilon$ (SFT's target) but a point *beyond* it, on the far side from what the
# reference predicts: DSPO pushes the model past the data, away from the pretrained model, by $g/(1 - g)$ of the
# distance between them (at most 1, with $\beta\gamma = 1/2$; 0 for a pair already separated, where the gate has
# closed and the target is $\epsilon$ itself). Below: minimise `minipref.dspo_loss` over a free prediction for 64
# winners and compare with the formula. On the toy this shows as an overshoot: DSPO's samples end beyond the
# desirable mean in $x$, further from the pretrained 0.5 than SFT's (the table below).

# %%
eps_w = torch.randn(64, 2, generator=g, dtype=torch.float64)
ref_pred = eps_w + 0.3 * torch.randn(64, 2, generator=g, dtype=torch.float64)  # the reference's prediction
err_l_fixed, ref_err_l_fixed = (0.1 + 0.01 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(2))
free = ref_pred.clone().requires_grad_(True)  # start at the reference
optimizer = torch.optim.LBFGS([free], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")
BETA_DSPO, GAMMA_DSPO = 500.0, 1 / 1000  # the toy's: beta * gamma = 1/2


def dspo_objective():
    optimizer.zero_grad()
    loss = minipref.dspo_loss(free, ref_pred, eps_w, err_l_fixed, ref_err_l_fixed, beta=BETA_DSPO, gamma=GAMMA_DSPO).loss
    loss.backward()
    return loss


optimizer.step(dspo_objective)
with torch.no_grad():
    final = minipref.dspo_loss(free, ref_pred, eps_w, err_l_fixed, ref_err_l_fixed, beta=BETA_DSPO, gamma=GAMMA_DSPO)
    margin_star = (minipref.implicit_reward(minipref.per_sample_mse(free, eps_w), minipref.per_sample_mse(ref_pred, eps_w), BETA_DSPO)
                   - minipref.implicit_reward(err_l_fixed, ref_err_l_fixed, BETA_DSPO))
    gate_star = (BETA_DSPO * GAMMA_DSPO * (1 - torch.sigmoid(margin_star)))[:, None]  # (64, 1)
    predicted_star = eps_w + gate_star / (1 - gate_star) * (eps_w - ref_pred)
    along = (((free - eps_w) * (eps_w - ref_pred)).sum(1) / ((eps_w - ref_pred) ** 2).sum(1))  # step beyond eps, in units of |eps - eps_ref|
print(f"DSPO loss at the minimiser {final.loss.item():.2e}; extrapolation factor g/(1-g) from {along.min():.3f} to {along.max():.3f}")
lesson.check_range("minimising dspo_loss over the prediction reaches (nearly) zero", final.loss.item(), high=1e-12)
lesson.check_close("... at eps + g/(1-g)(eps - eps_ref), the formula", (free - predicted_star).abs().max().item(), 0.0, abs_tol=1e-6)
lesson.check("... which lies beyond eps, away from the reference, or at eps where the gate has closed (0 <= g/(1-g) <= 1)",
             bool((along > -1e-6).all() and (along <= 1 + 1e-9).all()), f"{along.min():.3f} to {along.max():.3f}")

# %% [markdown]
# ## Both on the toy
#
# The toy comparison (`python -m toy --methods sft,dpo,contrast,dspo`; quick mode in CI, docs/toy.md discusses the
# full run). Diff-contrast uses the same pairs as DPO and, at $\tau = 0.5$, averages each winner against many
# losers: expect DPO's upward drift, weaker. DSPO is SFT plus the extrapolation above: expect SFT's move to $x = 0.3$
# and a little beyond.

# %%
toy_out = lesson.OUT / "05_toy_run"
toy_metrics = run(RunConfig(out=toy_out, quick=QUICK, methods=["sft", "dpo", "contrast", "dspo"], progress=False))
print((toy_out / "metrics.md").read_text())
shutil.copyfile(toy_out / "samples.png", lesson.OUT / "05_toy_samples.png")
print(f"figure: {lesson.OUT / '05_toy_samples.png'}")
if lesson.IN_NOTEBOOK:
    from IPython.display import Image, display

    display(Image(filename=str(lesson.OUT / "05_toy_samples.png")))
tm = toy_metrics["methods"]
lesson.check("every method trains to finite samples", all(np.isfinite(v["energy_distance"]) for v in tm.values()))
lesson.check("contrast drifts up, less than DPO", tm["reference"]["mean"][1] + 0.03 < tm["contrast"]["mean"][1] < tm["dpo"]["mean"][1],
             f"mean y: reference {tm['reference']['mean'][1]:.3f}, contrast {tm['contrast']['mean'][1]:.3f}, DPO {tm['dpo']['mean'][1]:.3f}")
for name in ("sft", "dspo"):
    lesson.check(f"{name}: mean near the desirable (0.3, 0.8)", abs(tm[name]["mean"][0] - 0.3) < 0.06
                 and abs(tm[name]["mean"][1] - 0.8) < 0.05, f"({tm[name]['mean'][0]:.3f}, {tm[name]['mean'][1]:.3f})")
lesson.check("DSPO overshoots: its mean x lies beyond SFT's, further from the pretrained 0.5",
             tm["dspo"]["mean"][0] < tm["sft"]["mean"][0] - 0.02,
             f"DSPO {tm['dspo']['mean'][0]:.3f}, SFT {tm['sft']['mean'][0]:.3f}, desirable 0.300, pretrained {tm['reference']['mean'][0]:.3f}")

# %% [markdown]
# ## Takeaways
#
# * Diff-contrast's $\tau$ slides from DPO (each winner with its own loser) to an all-pairs average; with its
#   weights outside the log-sigmoid and $W = I$ it *is* DPO.
# * DSPO is SFT plus a gated correction; its minimiser extrapolates beyond the data, away from the reference, and
#   $\beta\gamma$ sets how far (and at $\beta\gamma > 2$ the first step is anti-SFT).
#
# ## Exercises
#
# 1. Set DSPO's $\gamma$ so that $\beta\gamma = 1.5$ and predict the extrapolation factor $g/(1 - g)$ at
#    $\theta = \mathrm{ref}$ (gate 1/2). What happens to the minimiser when $g$ reaches 1?
# 2. For the 12 pairs above, predict whether the weight each winner puts on its own prompt's losers rises or falls
#    between $\tau = 0.5$ and $\tau = 1$, and find the $\tau$ at which it drops below one half.
#
# Next: lesson 6, SPO: preferences between single denoising steps, made online.

# %%
lesson.save_results("05_contrast_dspo", {
    "quick": QUICK, "contrast_diag": {str(t): weights[t].diagonal().mean().item() for t in TAUS},
    "contrast_same_prompt": {str(t): v for t, v in same_prompt.items()},
    "dspo_factors": factors, "dspo_minimiser_gap": (free - predicted_star).abs().max().item(),
    "toy": {name: {k: v[k] for k in ("desirable_frac", "undesirable_frac", "energy_distance", "mean")} for name, v in tm.items()},
})

# %% [markdown]
# ## Solutions
#
# Run with `python tutorials/05_contrast_dspo.py --solutions` (or set `lesson.SOLUTIONS = True` in a notebook); each
# solution checks its prediction.
#
# **1.** At $\theta = \mathrm{ref}$ the gate is $g = \beta\gamma/2 = 0.75$, so the target lies $g/(1 - g) = 3$ times
# the reference's error *beyond* $\epsilon$: three times further out than SFT's target is from the reference, on
# the far side. As $g \to 1$ the factor $g/(1 - g)$ grows without bound, and at $g = 1$ the residual
# $(1 - g)(\epsilon_\theta - \epsilon) - g(\epsilon - \epsilon_{\mathrm{ref}})$ no longer contains $\epsilon_\theta$
# in its first term: the pull towards the data is gone. At $\theta = \mathrm{ref}$ that happens at
# $\beta\gamma = 2$, where the first gradient is $(1 - \beta\gamma/2) = 0$ times SFT's: DSPO does not move at all.
# (Past it, $g > 1$ flips the sign: anti-SFT, as at the toy's $\beta$ with the paper's $\gamma = 1$.)
#
# **2.** A larger $\tau$ flattens the weights, so the same-prompt weight can only fall as $\tau$ grows, from
# nearly 1 towards the uniform $4/12$; the run below finds where it crosses one half.

# %%
def solution_1() -> dict:
    gate = 1.5 / 2
    lesson.check_close("1. beta gamma = 1.5: at theta = ref the gate is 0.75 and g / (1 - g) = 3", gate / (1 - gate), 3.0,
                       rel_tol=1e-12)
    factors_ = {g_: g_ / (1 - g_) for g_ in (0.9, 0.99, 0.999)}
    print("1. g / (1 - g) as g -> 1: " + ", ".join(f"g {g_}: {f:.0f}" for g_, f in factors_.items()))
    grad_at_two = grads(minipref.dspo_loss(*dspo_inputs(), beta=500.0, gamma=2.0 / 500.0).loss)
    ratio = (grad_at_two.norm() / grad_sft.norm()).item()
    lesson.check_range("1. beta gamma = 2 (g = 1 at theta = ref): the first gradient vanishes (norm below 1e-12 x SFT's)",
                       ratio, high=1e-12)
    return {"factor_at_ref": gate / (1 - gate), "gradient_ratio_at_g_1": ratio}


def solution_2() -> dict:
    taus = np.geomspace(0.01, 10, 301)
    shares = []
    for tau in taus:
        w = minipref.contrast_weights(emb_w, emb_l, tau=float(tau))
        shares.append(sum(w[i, 4 * (i // 4): 4 * (i // 4) + 4].sum() for i in range(12)).item() / 12)
    shares = np.array(shares)
    crossing = float(taus[np.argmax(shares < 0.5)])
    print(f"2. same-prompt weight at tau 0.5: {np.interp(0.5, taus, shares):.3f}, at tau 1: {np.interp(1.0, taus, shares):.3f}; "
          f"below 1/2 from tau = {crossing:.2f}")
    lesson.check("2. the same-prompt weight falls as tau grows", bool((np.diff(shares) <= 1e-9).all()))
    lesson.check_range("2. it crosses one half between tau 0.5 and tau 5 (the figure's last two panels)", crossing, 0.5, 5.0)
    return {"crossing_tau": crossing}


lesson.run_solutions("05_contrast_dspo", solution_1, solution_2)
