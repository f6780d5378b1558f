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
# # Lesson 2: Diffusion-DPO
#
# **Assumes** lesson 1 and, from [00_prerequisites.md](00_prerequisites.md), section 1 (Bradley-Terry), section 3
# (DPO for language models) and section 5 (Adam and the scale of a loss).
#
# Lesson 1 showed that $r(x) = -\frac{\beta}{2}(\mathrm{err}_\theta(x) - \mathrm{err}_{\mathrm{ref}}(x))$ is (up
# to the constant $\beta$) the policy's log-probability ratio against the reference. Diffusion-DPO (Wallace et al.,
# *Diffusion Model Alignment Using Direct Preference Optimization*, arXiv:2311.12908) plugs it into the
# Bradley-Terry likelihood of a human preference $x_w \succ x_l$:
#
# $$m = r(x_w) - r(x_l), \qquad \mathcal L_{\mathrm{DPO}} = \mathrm{mean}\big(-\log\sigma(m)\big) = \mathrm{mean}\big(\mathrm{softplus}(-m)\big).$$
#
# This lesson trains it on the 2D toy of Diffusion-KTO (Li et al., *Aligning Diffusion Models by Optimizing Human
# Utility*, arXiv:2404.04465, Sec. 7: desirable winners from $\mathcal N((0.3, 0.8), 0.01 I)$, undesirable losers
# from $\mathcal N((0.3, 0.6), 0.01 I)$), and looks at the three things every DPO user asks about: what the loss
# is at the start, what its gradient does there, and why a loss that sits near 0.693 is not a dead run. The loss is
# `minipref.dpo_loss`, the function the full-scale trainer calls (`python -m full.train`; its `compute_loss`).

# %%
import copy
import math

import lesson
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import minipref
from toy.data import PreferenceData
from toy.evaluate import HeldOutPairs, implicit_accuracy
from toy.model import denoising_error, draw_t_and_noise
from toy.run import generator_for
from toy.train import MAX_GRAD_NORM, cosine_schedule

QUICK = lesson.QUICK
STEPS = 150 if QUICK else 600  # the toy's DPO runs 600 steps (toy/methods.py), --quick a quarter of them
BATCH = 256

reference, scheduler, _ = lesson.pretrained_toy()
data = PreferenceData.draw(2000, generator_for(0, "preference data"))  # the same training set `python -m toy` uses
heldout = HeldOutPairs.draw(reference, scheduler, 256, 8, torch.Generator().manual_seed(3))  # fresh pairs, 8 (t, eps) each

# %% [markdown]
# ## One batch of pairs
#
# A winner and its loser get the **same** `t` and the **same** noise `eps`, and go through the network in one
# forward over the concatenated `2B` batch (every reference implementation does this; docs/conventions.md §3, "Shared
# noise and timestep"). The
# reference runs under `torch.no_grad()`. At the start the policy *is* the reference, so every margin is exactly
# 0: the loss is `log 2 = 0.6931` and the implicit accuracy (ties count half) is 0.5.

# %%
def pair_errors(policy, x_w, x_l, generator):
    """Policy errors (with grad) and reference errors (no grad) of B pairs sharing t and eps: four (B,) tensors."""
    t, noise = draw_t_and_noise(len(x_w), generator)
    x0, t2, noise2 = torch.cat([x_w, x_l]), torch.cat([t, t]), torch.cat([noise, noise])  # (2B, 2), (2B,), (2B, 2)
    err, _ = denoising_error(policy, scheduler, x0, t2, noise2)
    with torch.no_grad():
        ref_err, _ = denoising_error(reference, scheduler, x0, t2, noise2)
    return (*err.chunk(2), *ref_err.chunk(2))


generator = torch.Generator().manual_seed(0)
policy = copy.deepcopy(reference).requires_grad_(True)
x_w, x_l = data.batch(BATCH, generator, desirable=True), data.batch(BATCH, generator, desirable=False)
err_w, err_l, ref_err_w, ref_err_l = pair_errors(policy, x_w, x_l, generator)
out = minipref.dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=500.0)
print({k: round(v, 4) for k, v in out.metrics.items()})
lesson.check("at theta = ref: loss = log 2, implicit_acc = 0.5, margin = 0",
             math.isclose(out.loss.item(), math.log(2), rel_tol=1e-7) and out.metrics["implicit_acc"] == 0.5 and out.metrics["margin"] == 0.0,
             f"loss {out.loss.item():.6f}, log 2 = {math.log(2):.6f}")

# %% [markdown]
# ## The gradient at the start: a quarter-beta SFT step on the winner minus one on the loser
#
# $\frac{d}{dm}\mathrm{softplus}(-m) = -\sigma(-m) = -\frac12$ at $m = 0$, and $\frac{\partial m}{\partial
# \mathrm{err}_w} = -\frac{\beta}{2}$, so at $\theta = \mathrm{ref}$
#
# $$\nabla \mathcal L_{\mathrm{DPO}} = \frac{\beta}{4}\big(\nabla\, \mathrm{mean}(\mathrm{err}_w) - \nabla\, \mathrm{mean}(\mathrm{err}_l)\big).$$
#
# DPO starts out as supervised learning on the winners and *un*-learning on the losers, scaled by $\beta/4$
# (docs/conventions.md I1, the DPO-at-the-reference identity). In
# float64 on the toy network:

# %%
policy64, reference64 = copy.deepcopy(reference).double().requires_grad_(True), copy.deepcopy(reference).double()
t, noise = draw_t_and_noise(BATCH, generator)
x0 = torch.cat([x_w, x_l]).double()
x_t = scheduler.add_noise(x0, torch.cat([noise, noise]).double(), torch.cat([t, t]))
err = minipref.per_sample_mse(policy64(x_t, torch.cat([t, t])), torch.cat([noise, noise]).double())
with torch.no_grad():
    ref_err = minipref.per_sample_mse(reference64(x_t, torch.cat([t, t])), torch.cat([noise, noise]).double())
params = [p for name, p in policy64.named_parameters() if not name.startswith("condition")]  # (CSFT's input, unused)
beta = 500.0
grad_dpo = torch.autograd.grad(minipref.dpo_loss(*err.chunk(2), *ref_err.chunk(2), beta=beta).loss, params, retain_graph=True)
grad_w = torch.autograd.grad(err.chunk(2)[0].mean(), params, retain_graph=True)
grad_l = torch.autograd.grad(err.chunk(2)[1].mean(), params)
predicted = [beta / 4 * (gw - gl) for gw, gl in zip(grad_w, grad_l)]
gap = max((a - b).abs().max().item() for a, b in zip(grad_dpo, predicted))
scale = max(a.abs().max().item() for a in grad_dpo)
lesson.check("grad L_DPO == (beta/4)(grad err_w - grad err_l) at init", gap <= 1e-10 * scale,
             f"largest gap {gap:.1e} against gradient entries up to {scale:.2f}")

# %% [markdown]
# ## Training, and what the curves do
#
# The loop below is the whole of DPO fine-tuning (`toy/methods.py`'s `paired_step` and `python -m full.train` do
# this): Adam, a cosine learning-rate schedule, gradient norm clipped at 1.0 as the Diffusion-DPO scripts do. We log
# the per-batch loss, implicit accuracy and mean margin, and every few steps the **held-out** accuracy on fresh
# pairs (8 shared `(t, eps)` draws each, so one pair's margin is a less noisy estimate; its ceiling is the Bayes
# accuracy 0.921 of these Gaussians, toy/data.py).
#
# Four runs, each showing one regime:
#
# | run | regime |
# |---|---|
# | beta 500, lr 1e-3 | the toy's default |
# | beta 500, lr 1e-7 | tiny steps, as in a real SD run: the loss barely leaves 0.693 |
# | beta 5000, lr 1e-4 | 10x beta, lr / 10: the same curves as the default; the lr / 10 keeps it 10x closer to the reference |
# | beta 5000, lr 1e-3 | 10x beta at the default lr: steps too big, the batch loss jumps *above* 0.693 |

# %%
from toy.data import bayes_ceilings  # noqa: E402

BAYES_PAIRWISE = bayes_ceilings()[1]
lesson.check_close("the pairwise Bayes ceiling of the two Gaussians", BAYES_PAIRWISE, 0.921, abs_tol=5e-4)


def train_dpo(beta: float, lr: float, steps: int = STEPS, seed: int = 0, data=data, heldout=heldout) -> dict:
    """Fine-tune a copy of the reference with DPO on ``data``; log the batch metrics and the held-out accuracy."""
    generator = torch.Generator().manual_seed(seed)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    schedule = cosine_schedule(optimizer, steps, warmup=max(1, steps // 20))
    log = {"loss": [], "implicit_acc": [], "margin": [], "heldout_step": [], "heldout_acc": []}
    for step in range(steps + 1):
        if step % max(1, steps // 15) == 0 or step == steps:
            log["heldout_step"].append(step)
            log["heldout_acc"].append(implicit_accuracy(policy, scheduler, heldout)["pairwise_implicit_acc"])
        if step == steps:
            break
        x_w, x_l = data.batch(BATCH, generator, desirable=True), data.batch(BATCH, generator, desirable=False)
        out = minipref.dpo_loss(*pair_errors(policy, x_w, x_l, generator), beta=beta)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        for key in ("loss", "implicit_acc", "margin"):
            log[key].append(out.metrics[key])
    distance = sum((p - q).pow(2).sum() for p, q in zip(policy.parameters(), reference.parameters())).sqrt().item()
    log["distance_from_reference"] = distance
    log["policy"] = policy
    log["beta"] = beta
    return log


DEFAULT, TINY, SAME_CURVE, TOO_BIG = ("beta 500, lr 1e-3 (toy default)", "beta 500, lr 1e-7 (tiny steps)",
                                      "beta 5000, lr 1e-4", "beta 5000, lr 1e-3 (steps too big)")
RUNS = {DEFAULT: (500.0, 1e-3), TINY: (500.0, 1e-7), SAME_CURVE: (5000.0, 1e-4), TOO_BIG: (5000.0, 1e-3)}
logs = {name: train_dpo(*setting) for name, setting in RUNS.items()}
for name, log in logs.items():
    print(f"{name:36} final loss {np.mean(log['loss'][-10:]):.3f}, per-batch acc {np.mean(log['implicit_acc'][-10:]):.3f}, "
          f"held-out acc {log['heldout_acc'][-1]:.3f}, margin {np.mean(log['margin'][-10:]):.3f}, "
          f"|theta - ref| {log['distance_from_reference']:.4f}")


def smooth(values, window=max(1, STEPS // 30)):
    values = np.asarray(values, dtype=float)
    return np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values


fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
for name, log in logs.items():
    axes[0].plot(smooth(log["loss"]), label=name)
    axes[1].plot(smooth(log["implicit_acc"]), label=name)
    axes[2].plot(log["heldout_step"], log["heldout_acc"], marker=".", label=name)
    axes[3].plot(smooth(log["margin"]), label=name)
axes[0].axhline(math.log(2), color="0.5", ls=":", lw=1)
axes[0].set_title("DPO loss (dotted: log 2)")
axes[1].set_title("per-batch implicit accuracy")
axes[2].axhline(BAYES_PAIRWISE, color="0.5", ls=":", lw=1)
axes[2].set_title("held-out implicit accuracy (dotted: Bayes 0.921)")
axes[3].set_yscale("symlog", linthresh=0.01)
axes[3].set_title("mean margin r_w - r_l")
for ax in axes:
    ax.set_xlabel("step")
axes[0].legend(fontsize=7)
lesson.save_figure(fig, "02_dpo_curves")

for name, log in logs.items():
    lesson.check_range(f"{name}: held-out accuracy ends near the Bayes ceiling, not above it", log["heldout_acc"][-1],
                       0.88, BAYES_PAIRWISE + 0.04)

# %% [markdown]
# ## Why a flat loss near 0.693 is normal
#
# Near $m = 0$, $\mathrm{softplus}(-m) = \log 2 - \frac{m}{2} + \frac{m^2}{8} - \dots$ (the series converges for
# $|m| < \pi$), so the batch loss is about
#
# $$\mathcal L \approx \log 2 - \frac{\mathrm{mean}(m)}{2} + \frac{\mathrm{mean}(m^2)}{8}.$$
#
# The first-order term is **signed**: margins of the right sign lower the loss, and flipping every sign raises it
# by exactly $\mathrm{mean}(m)$ (because $\mathrm{softplus}(-m) - \mathrm{softplus}(m) = -m$; docs/conventions.md,
# I2, the DPO swap identity). But it is a mean
# of *margins*, so it is as small as they are: with tiny margins the loss stays near $\log 2$ however many signs are
# right. Below, one batch at the end of the lr 1e-7 run: accuracy 0.90, loss 0.670; the same batch with every
# sign flipped: accuracy 0.10, loss 0.720 (quick mode; the full run's longer training gives 0.635 and 0.775). The implicit accuracy counts only signs, so it can be at its ceiling while the loss has barely moved. With
# tiny steps (lr 1e-7 above; in a real SD run the learning rate is small, $\beta\,\Delta\mathrm{err}$ is small and
# labels are noisy) the signs are right almost at once while the margins stay tiny: the loss stays above 0.6 for
# the whole run while the held-out accuracy sits at the ceiling from the first evaluation on. Read `implicit_acc`
# and `margin` (`python -m full.train` logs both to TensorBoard as `train/implicit_acc`, `train/margin`), not the
# loss, in the first thousands of steps.
#
# In that regime the Taylor value is the loss to three decimals; at the end of the default run the margins are
# several units wide and the expansion is off by far more.

# %%
tiny = logs[TINY]
tiny_loss = smooth(tiny["loss"], 5)
lesson.check_range("lr 1e-7: the smoothed loss stays above 0.6 for the whole run", float(tiny_loss.min()), 0.6, math.log(2) + 1e-3)
lesson.check_range("... while the held-out accuracy is at the ceiling from the first evaluation",
                   tiny["heldout_acc"][1], 0.88, BAYES_PAIRWISE + 0.04, f"at step {tiny['heldout_step'][1]}")


def batch_margins(policy, beta: float, seed: int = 11) -> torch.Tensor:
    """The margins m = r_w - r_l of one fresh training batch, without gradients."""
    g = torch.Generator().manual_seed(seed)
    x_w, x_l = data.batch(BATCH, g, desirable=True), data.batch(BATCH, g, desirable=False)
    with torch.no_grad():
        e = pair_errors(policy, x_w, x_l, g)
    return minipref.implicit_reward(e[0], e[2], beta) - minipref.implicit_reward(e[1], e[3], beta)


def taylor_vs_exact(m: torch.Tensor) -> tuple[float, float]:
    """(exact mean softplus(-m), its second-order Taylor value)."""
    return F.softplus(-m).mean().item(), math.log(2) - m.mean().item() / 2 + (m**2).mean().item() / 8


taylor = {}
for name in (TINY, DEFAULT):
    m = batch_margins(logs[name]["policy"], logs[name]["beta"])
    exact, approx = taylor_vs_exact(m)
    taylor[name] = {"exact": exact, "taylor": approx, "mean_abs_margin": m.abs().mean().item()}
    print(f"one batch, end of {name}: loss {exact:.4f}, Taylor {approx:.4f}, mean |margin| {m.abs().mean():.3f}, "
          f"accuracy {minipref.pairwise_accuracy(m):.3f}")
m_tiny = batch_margins(logs[TINY]["policy"], logs[TINY]["beta"]).double()  # float64: the identity is exact
sign_flip_gap = (F.softplus(m_tiny).mean() - F.softplus(-m_tiny).mean()).item()  # loss(-m) - loss(m)
lesson.check_close("the loss sees the signs: flipping every margin raises it by exactly mean(m)", sign_flip_gap,
                   m_tiny.mean().item(), rel_tol=1e-9, abs_tol=1e-12)
flipped_losses = (F.softplus(-m_tiny).mean().item(), F.softplus(m_tiny).mean().item())
lesson.check_range("... but at tiny steps both the batch and its sign-flipped copy stay within 0.1 of log 2",
                   max(abs(v - math.log(2)) for v in flipped_losses), high=0.1,
                   detail=f"loss {flipped_losses[0]:.3f} at accuracy {minipref.pairwise_accuracy(m_tiny):.3f}, "
                   f"{flipped_losses[1]:.3f} at {minipref.pairwise_accuracy(-m_tiny):.3f}")
lesson.check_close("tiny steps: the Taylor value is the exact loss to three decimals",
                   taylor[TINY]["taylor"], taylor[TINY]["exact"], abs_tol=1e-3)
lesson.check_range("default run: the expansion is off by more than 0.05 (margins of several units)",
                   abs(taylor[DEFAULT]["taylor"] - taylor[DEFAULT]["exact"]), 0.05)

# %% [markdown]
# ## Why held-out accuracy is at the ceiling from the first steps (on this toy)
#
# The preference in this toy is **linear in y**: the log-density ratio of the desirable to the undesirable
# Gaussian is `rho(x) = 20 y - 14` (equal covariances, means differing in `y` only; docs/toy.md). The Bayes-optimal
# way to rank a pair is therefore just `y_w > y_l`, which is right for 92.1% of fresh pairs (the ceiling) and wrong
# for the 7.9% where the undesirable point happens to lie higher. The first DPO step is `(beta/4)` times "lower the
# error on the winners (y ~ 0.8), raise it on the losers (y ~ 0.6)": any smooth reward that grows with `y` ranks
# pairs exactly like the Bayes rule, whatever its size. So the *sign* of the margin is right after the first few
# steps of any run, and accuracy cannot tell a run that has barely started from one that has converged.
# On the held-out pairs, the tiny-step policy's margins agree in sign with `y_w - y_l` almost everywhere:

# %%
with torch.no_grad():
    err_w, err_l = (minipref.per_sample_mse(tiny["policy"](scheduler.add_noise(x, heldout.noise, heldout.t), heldout.t),
                                            heldout.noise) for x in (heldout.x_w, heldout.x_l))
    held_margin = (minipref.implicit_reward(err_w, heldout.ref_err_w, 1.0)
                   - minipref.implicit_reward(err_l, heldout.ref_err_l, 1.0)).reshape(heldout.n_pairs, heldout.draws).mean(1)
y_gap = (heldout.x_w[:, 1] - heldout.x_l[:, 1]).reshape(heldout.n_pairs, heldout.draws)[:, 0]
agreement = ((held_margin > 0) == (y_gap > 0)).float().mean().item()
lesson.check_close("the fraction of fresh pairs the Bayes rule y_w > y_l gets right is the ceiling",
                   (y_gap > 0).float().mean().item(), BAYES_PAIRWISE, abs_tol=0.04, detail=f"{heldout.n_pairs} pairs")
lesson.check_range("lr 1e-7 policy: sign(margin) == sign(y_w - y_l) on the held-out pairs", agreement, 0.95)

# %% [markdown]
# ## A batch loss *above* 0.693 while the accuracy is at the ceiling
#
# The flip side: because 7.9% of random (desirable, undesirable) pairs have the loser higher up, no model can get
# every pair's sign right, and a wrong pair costs `softplus(-m) ~ |m|` once its margin is large. Scale all margins
# by `k`: the accuracy does not move, the loss on the wrong pairs grows linearly with `k`, and past some `k` the
# batch loss is above 0.693 at an accuracy of about 0.9. The run with beta 5000 at lr 1e-3 (ten times the default
# `beta * lr`) gets there by itself: its steps overshoot, and in more than one batch in twenty (most of them, in
# fact: the printout counts them) the loss is above `log 2` while the implicit accuracy is above 0.8. A loss above 0.693 is not "worse than chance": it
# says the margins are too big for the pairs that are wrong, i.e. `beta * lr` is too large.

# %%
p_wrong = 1 - BAYES_PAIRWISE
batch_wrong = (data.batch(4096, torch.Generator().manual_seed(12), desirable=False)[:, 1]
               > data.batch(4096, torch.Generator().manual_seed(13), desirable=True)[:, 1]).float().mean().item()
lesson.check_close("random training pairs with the loser higher up", batch_wrong, p_wrong, abs_tol=0.015)

m = batch_margins(logs[DEFAULT]["policy"], 500.0)
scaled = {k: (F.softplus(-k * m).mean().item(), minipref.pairwise_accuracy(k * m)) for k in (1, 3, 10)}
print("margins of the default run x k: " + ", ".join(f"k = {k}: loss {l:.3f}, accuracy {a:.3f}" for k, (l, a) in scaled.items()))
lesson.check("scaling the margins leaves the accuracy unchanged", len({a for _, a in scaled.values()}) == 1)
lesson.check_range("... which is about 0.9 on this batch", scaled[1][1], 0.85, BAYES_PAIRWISE + 0.04)
lesson.check_range("... and k = 10 puts the loss above log 2", scaled[10][0], math.log(2))

too_big = logs[TOO_BIG]
above = [(s, l, a) for s, (l, a) in enumerate(zip(too_big["loss"], too_big["implicit_acc"])) if l > math.log(2) and a > 0.8]
print(f"{TOO_BIG}: {len(above)} of {STEPS} batches have loss > log 2 and implicit_acc > 0.8; the first: "
      + ", ".join(f"step {s} loss {l:.2f} acc {a:.2f}" for s, l, a in above[:4]))
lesson.check_range(f"{TOO_BIG}: batches with loss > log 2 and accuracy > 0.8", len(above), STEPS // 20,
                   detail=f"largest batch loss {max(too_big['loss']):.2f}")

# %% [markdown]
# ## $\beta$ and the learning rate (with Adam)
#
# Adam's update does not depend on the gradient's scale (prerequisites, section 5): each **parameter** moves by at
# most about the learning rate per step, whatever $\beta$ is. The errors move with the parameters, and the margin
# $\beta\,\Delta\mathrm{err}$ grows like $\beta \times \mathrm{lr}$. So beta 5000 at lr 1e-4 and beta 500 at lr 1e-3
# trace nearly the **same** loss and accuracy curves (figure above), and the first run moves the network about ten
# times less, because its learning rate is ten times smaller. A loss curve alone cannot tell $\beta$ from the
# learning rate.
#
# Does a larger $\beta$ by itself keep the network closer to the reference? Compare the two runs at the same lr
# 1e-3 (beta 500 and beta 5000): ten times the $\beta$ moves the network only 2.4 times less in quick mode, 3.6
# times in the full run (the printout has the numbers), not ten. Under Adam, $\beta$ is a weak leash; the learning rate and the number of steps set
# the distance. Compare runs at a fixed learning rate when you tune $\beta$.

# %%
a, b, c = logs[DEFAULT], logs[SAME_CURVE], logs[TOO_BIG]
curve_gap = np.mean(np.abs(smooth(a["loss"]) - smooth(b["loss"])))
distance_ratio = a["distance_from_reference"] / b["distance_from_reference"]
fixed_lr_ratio = a["distance_from_reference"] / c["distance_from_reference"]
print(f"|theta - ref|: beta 500 lr 1e-3 {a['distance_from_reference']:.3f}, beta 5000 lr 1e-4 "
      f"{b['distance_from_reference']:.3f} ({distance_ratio:.1f}x less), beta 5000 lr 1e-3 "
      f"{c['distance_from_reference']:.3f} ({fixed_lr_ratio:.1f}x less)")
lesson.check_range("beta x10 with lr / 10: nearly the same loss curve (mean gap between the smoothed curves)", curve_gap, high=0.05)
lesson.check_range("... and the network moves about ten times less", distance_ratio, 5, 20,
                   "|theta - ref| at beta 500, lr 1e-3 / at beta 5000, lr 1e-4")
lesson.check_range("at a fixed lr 1e-3, beta x10 moves the network less, but by far less than ten times (1 to 5)",
                   fixed_lr_ratio, 1.0, 5.0, "|theta - ref| at beta 500 / at beta 5000")

# %% [markdown]
# ## Other losses on the same margin: `loss_type`
#
# `dpo_loss(..., loss_type=...)` offers the LLM-DPO variants (as TRL does) on the same margin `m = r_w - r_l` and
# its unscaled log-ratio `h = m / beta`: `"sigmoid"` (DPO), `"hinge"` (SLiC, `relu(1 - m)`), `"ipo"`
# (`(h - 1/(2 beta))^2`), `"cdpo"` and `"robust"` (label smoothing `e`). They agree with the diffusers DPO script
# (`examples/research_projects/diffusion_dpo`), whose `logits = ref_diff - model_diff` and `beta_dpo = beta / 2`:
# its hinge `relu(1 - beta_dpo * logits)` is ours exactly, and its IPO `(logits - 1/(2 beta))^2` is 4x ours
# (same minimiser, `h = logits / 2`) once its `args.beta` is read as `beta_dpo`. (As we read the script, that
# branch refers to an `args.beta` its parser does not define; that is a remark about a file outside this repository,
# not something this lesson runs.) The three equalities, in float64:

# %%
gen = torch.Generator().manual_seed(5)
errs = [0.1 + 0.01 * torch.rand(64, generator=gen, dtype=torch.float64) for _ in range(4)]  # err_w, err_l, ref_w, ref_l
beta = 5000.0
beta_dpo = beta / 2  # the diffusers script's convention
logits = (errs[2] - errs[3]) - (errs[0] - errs[1])  # ref_diff - model_diff
losses = {kind: minipref.dpo_loss(*errs, beta=beta, loss_type=kind,
                                  label_smoothing=0.1 if kind in ("cdpo", "robust") else 0.0).loss.item()
          for kind in ("sigmoid", "hinge", "ipo", "cdpo", "robust")}
print({k: round(v, 5) for k, v in losses.items()})
diffusers_sigmoid = -F.logsigmoid(beta_dpo * logits).mean().item()
diffusers_hinge = torch.relu(1 - beta_dpo * logits).mean().item()
diffusers_ipo_fixed = ((logits - 1 / (2 * beta_dpo)) ** 2).mean().item()
lesson.check("sigmoid == diffusers' -logsigmoid(beta_dpo * logits)", math.isclose(losses["sigmoid"], diffusers_sigmoid, rel_tol=1e-12))
lesson.check("hinge == diffusers' relu(1 - beta_dpo * logits)", math.isclose(losses["hinge"], diffusers_hinge, rel_tol=1e-12))
lesson.check("ipo == diffusers' ipo (with beta_dpo) / 4", math.isclose(losses["ipo"], diffusers_ipo_fixed / 4, rel_tol=1e-12),
             f"{losses['ipo']:.3e} vs {diffusers_ipo_fixed / 4:.3e}")

# %% [markdown]
# ## Takeaways
#
# * At the start DPO's loss is exactly `log 2` and its gradient is a `beta/4`-scaled SFT step on the winners minus
#   one on the losers.
# * The loss is a mean over the margins: signed, but only as large as they are; the accuracy counts only their
#   signs. A loss near 0.693 with a rising accuracy is a healthy start; a loss above 0.693 at high accuracy means margins too big for the pairs no model
#   can get right (`beta * lr` too large), not a model worse than chance.
# * On this toy the preference is linear in `y`, so the ranking (and the accuracy) is learned in a few steps; the
#   rest of training only scales it up. Lesson 3 shows where that sends the samples (up, out of the desirable
#   region, as Diffusion-KTO's Sec. 7 reports).
# * With Adam, $\beta$ and the learning rate trade off in the curves but not in the distance from the reference:
#   the learning rate sets how far the network moves; ten times the $\beta$ at a fixed learning rate moves it only
#   2.4 to 3.6 times less on this toy.
#
# ## Exercises
#
# 1. Change `beta` to 50 in the default run and predict the final margin and loss before running it. (Hint: which
#    margins minimise the loss on these Gaussians? Prerequisites, section 1.)
# 2. Find the smallest `k` for which the scaled margins of the default run give a loss above `log 2`, and explain it
#    with the 7.9% of pairs no model can get right.
# 3. Replace the undesirable Gaussian by `N((0.5, 0.8), 0.01 I)` (same height as the desirable one, shifted in `x`)
#    and predict what the held-out accuracy does in the first steps. Is the preference still linear in $y$? (The
#    test pairs must come from the new Gaussian too.)
#
# Next: Diffusion-KTO, which needs no pairs.

# %%
lesson.save_results("02_dpo", {
    "quick": QUICK, "steps": STEPS,
    "runs": {name: {"final_loss": float(np.mean(log["loss"][-10:])), "final_heldout_acc": log["heldout_acc"][-1],
                    "heldout_acc": log["heldout_acc"], "min_smoothed_loss": float(smooth(log["loss"], 5).min()),
                    "distance_from_reference": log["distance_from_reference"]} for name, log in logs.items()},
    "taylor": taylor, "sign_agreement_with_y": agreement, "scaled_margins": scaled, "too_big_batches_above_log2": len(above),
    "beta_lr_curve_gap": float(curve_gap), "beta_lr_distance_ratio": distance_ratio, "gradient_identity_gap": gap,
    "fixed_lr_distance_ratio": fixed_lr_ratio, "sign_flip_gap": sign_flip_gap,
})

# %% [markdown]
# ## Solutions
#
# Run with `python tutorials/02_dpo.py --solutions` (or set `lesson.SOLUTIONS = True` in a notebook); each solution
# checks its prediction.
#
# **1.** The DPO loss is the Bradley-Terry likelihood, and the pairs here *are* Bradley-Terry with the reward
# $\rho = 20y - 14$ (prerequisites, section 1). The loss is smallest when each pair's margin equals
# $\rho(x_w) - \rho(x_l)$, whose mean over pairs is $20 \times (0.8 - 0.6) = 4$, whatever $\beta$ is: $\beta$ only
# sets how much the denoising errors, hence the network, must change to produce that margin. So the final margin
# is about the same as at beta 500 (about 4), not ten times smaller, the loss about the same too, and the network
# moves *further* than at beta 500 to get there. (The lowest possible loss, with exact margins, is
# $\mathbb E[\mathrm{softplus}(-Z)] = 0.19$ for $Z \sim \mathcal N(4, 8)$; a batch's margins come from one
# $(t, \epsilon)$ draw per pair and are noisier, so the runs end above it.)
#
# **2.** Scaling the margins by $k$ leaves the right pairs' losses $\mathrm{softplus}(-k m) \to 0$ and makes each
# wrong pair cost about $k |m|$: the loss is about $\frac{1}{B}\sum_{\text{wrong}} k |m_i|$ for large $k$. It
# crosses $\log 2$ at the $k$ where the wrong pairs' summed $k|m|$ reaches $B \log 2$, so the smaller the fraction
# of wrong pairs, the larger that $k$. In the batch below 8-10% of the margins are negative (the 7.9% of pairs whose
# loser lies higher, plus the noise of one $(t, \epsilon)$ draw per pair); the loss crosses $\log 2$ between $k = 3$
# and $k = 10$ (at about 7 in quick mode, 6 in the full run), and there the wrong pairs carry most of it.
#
# **3.** The log-density ratio of $\mathcal N((0.3, 0.8), 0.01 I)$ over $\mathcal N((0.5, 0.8), 0.01 I)$ is
# $\rho = ((x - 0.5)^2 - (x - 0.3)^2)/0.02 = 8 - 20x$: still linear, now in $x$ ("further left is better") and
# independent of $y$. The means are again 2 standard deviations apart, so the Bayes ceiling is the same 0.921, and
# for the same reason as before the held-out accuracy is near it after the first few steps.

# %%
def solution_1() -> dict:
    small, default = train_dpo(50.0, 1e-3), logs[DEFAULT]
    margins = {"50": float(np.mean(small["margin"][-10:])), "500": float(np.mean(default["margin"][-10:]))}
    losses = {"50": float(np.mean(small["loss"][-10:])), "500": float(np.mean(default["loss"][-10:]))}
    distances = {"50": small["distance_from_reference"], "500": default["distance_from_reference"]}
    print(f"1. final margin: beta 50 {margins['50']:.2f}, beta 500 {margins['500']:.2f}; loss {losses['50']:.3f} vs "
          f"{losses['500']:.3f}; |theta - ref| {distances['50']:.3f} vs {distances['500']:.3f}")
    for beta_name, margin in margins.items():
        lesson.check_close(f"1. beta {beta_name}: the final margin is near the mean Bradley-Terry margin 20 x 0.2 = 4",
                           margin, 4.0, rel_tol=0.2)
    lesson.check_close("1. ... and the final losses agree", losses["50"], losses["500"], abs_tol=0.03)
    lesson.check_range("1. to get there the network moves further at beta 50 than at beta 500",
                       distances["50"] / distances["500"], 1.0)
    return {"margins": margins, "losses": losses, "distances": distances}


def solution_2() -> dict:
    m = batch_margins(logs[DEFAULT]["policy"], 500.0)
    ks = np.linspace(1, 40, 3901)
    losses = np.array([F.softplus(-k * m).mean().item() for k in ks])
    k_star = float(ks[np.argmax(losses > math.log(2))])
    wrong = m < 0
    share = (F.softplus(-k_star * m)[wrong].sum() / F.softplus(-k_star * m).sum()).item()
    print(f"2. the loss first exceeds log 2 at k = {k_star:.2f}; {wrong.float().mean():.3f} of the pairs are wrong "
          f"and carry {share:.2f} of the loss there")
    lesson.check("2. the crossing k lies between 3 and 10 (k = 3 is below log 2, k = 10 above: the lesson)",
                 3 < k_star <= 10, f"k = {k_star:.2f}")
    lesson.check_range("2. at the crossing the wrong pairs carry most of the loss", share, 0.5)
    return {"k_star": k_star, "wrong_share_of_loss": share}


def solution_3() -> dict:
    from toy.data import DESIRABLE, Gaussian2D
    from toy.model import denoising_error as errors_of

    shifted = Gaussian2D("undesirable, shifted in x", (0.5, 0.8), 0.01)
    g = torch.Generator().manual_seed(40)
    new_data = PreferenceData(DESIRABLE.sample(2000, g), shifted.sample(2000, g))
    n, k = 256, 8  # fresh test pairs from the new Gaussians, 8 shared (t, eps) draws each, as HeldOutPairs draws them
    x_w, x_l = DESIRABLE.sample(n, g).repeat_interleave(k, 0), shifted.sample(n, g).repeat_interleave(k, 0)
    t, noise = torch.randint(0, 1000, (n * k,), generator=g), torch.randn(n * k, 2, generator=g)
    with torch.no_grad():
        ref_w, ref_l = errors_of(reference, scheduler, x_w, t, noise)[0], errors_of(reference, scheduler, x_l, t, noise)[0]
    new_heldout = HeldOutPairs(n, k, x_w, x_l, t, noise, ref_w, ref_l)
    rho_gap = ((DESIRABLE.log_prob(x_w) - shifted.log_prob(x_w)) - (8 - 20 * x_w[:, 0])).abs().max().item()
    run = train_dpo(500.0, 1e-3, data=new_data, heldout=new_heldout)
    print(f"3. rho = 8 - 20 x to {rho_gap:.1e}; held-out accuracy at steps {run['heldout_step'][:4]}: "
          + ", ".join(f"{a:.3f}" for a in run["heldout_acc"][:4]))
    lesson.check_range("3. the new log-density ratio is 8 - 20 x (linear in x, free of y)", rho_gap, high=1e-4)
    lesson.check_range("3. the held-out accuracy is near the same Bayes ceiling 0.921 at the first evaluation after step 0",
                       run["heldout_acc"][1], 0.85, BAYES_PAIRWISE + 0.04, f"step {run['heldout_step'][1]}")
    return {"heldout_acc": run["heldout_acc"], "heldout_step": run["heldout_step"]}


lesson.run_solutions("02_dpo", solution_1, solution_2, solution_3)
