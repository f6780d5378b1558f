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
# # Lesson 3: Diffusion-KTO, preferences without pairs
#
# **Assumes** lessons 1 and 2 and, from [00_prerequisites.md](00_prerequisites.md), section 2 (the KL-regularised
# objective and its closed-form optimum), section 4 (KTO and its reference point) and section 5 (Adam and the scale
# of a loss).
#
# Pairs are expensive; a thumbs-up or thumbs-down on single images is cheap. Diffusion-KTO (Li et al., *Aligning
# Diffusion Models by Optimizing Human Utility*, arXiv:2404.04465, Eq. (13)-(15)) maximises a *utility* of the
# implicit reward of each image relative to a reference point $z_{\mathrm{ref}}$:
#
# $$u = s\,\big(r(x) - z_{\mathrm{ref}}\big), \qquad s = +1 \text{ (desirable) or } -1 \text{ (undesirable)}, \qquad
# \mathcal L_{\mathrm{KTO}} = \mathrm{mean}\big(\lambda_y\,(1 - U(u))\big)$$
#
# with three utilities (Sec. 4.2): `kahneman_tversky` $U = \sigma$, `loss_averse` $U = \log\sigma$, `risk_seeking`
# $U(u) = -\log\sigma(-u)$. `minipref.kto_loss` implements all three; its default reference point is the authors'
# $z_{\mathrm{ref}} = \max(0, \text{mean of } r \text{ over the batch})$, detached (prerequisites, section 4: KTO's
# estimate of a KL divergence).
#
# This lesson plots the utilities and their gradients, proves numerically how KTO contains DPO, trains KTO on the
# toy, and reruns the paper's 2D comparison (Sec. 7, Fig. 7).

# %%
import math
import shutil

import lesson
import matplotlib.pyplot as plt
import torch

import minipref
from minipref.kto import UTILITIES

QUICK = lesson.QUICK

# %% [markdown]
# ## The three utilities and their gradients
#
# $U'(u)$ is how hard the loss pushes a sample whose (signed, relative) reward is $u$: $u > 0$ means the model
# already rates it on the right side of the reference point ("gain"), $u < 0$ the wrong side ("loss").
#
# * **loss-averse** ($\log\sigma$, concave): $U' = \sigma(-u)$ is ~1 for losses and fades for gains: it keeps
#   pushing every sample it still gets wrong, however hopeless. This is the DPO utility.
# * **risk-seeking** ($-\log\sigma(-u)$, convex): $U' = \sigma(u)$ fades for losses and grows for gains: it
#   ignores what it already gets badly wrong and keeps rewarding what it gets right. $U_{rs}(u) + U_{la}(u) = u$.
# * **Kahneman-Tversky** ($\sigma$): $U' = \sigma(u)\,\sigma(-u)$ peaks at $u = 0$ and fades on both sides: it
#   works on the samples near the reference point. The paper's appendix (App. C.4, the discussion of its Fig. 8)
#   argues that this makes it "more robust to noisy and sometimes contradictory preferences"; below we test that
#   with flipped labels.

# %%
u = torch.linspace(-8, 8, 401, dtype=torch.float64, requires_grad=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
values, grads = {}, {}
for name, utility in UTILITIES.items():
    value = utility(u)
    (grad,) = torch.autograd.grad(value.sum(), u)
    values[name], grads[name] = value.detach(), grad
    axes[0].plot(u.detach(), value.detach(), label=name)
    axes[1].plot(u.detach(), grad, label=name)
axes[0].set_ylim(-8, 8)
axes[0].set_title("utility U(u)")
axes[1].set_title("U'(u): how hard a sample is pushed")
for ax in axes:
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("u = s (r - z_ref)")
axes[0].legend(fontsize=8)
lesson.save_figure(fig, "03_utilities")

lesson.check("U_rs(u) + U_la(u) == u", torch.allclose(values["risk_seeking"] + values["loss_averse"], u.detach(), atol=1e-12))
lesson.check("KT gradient peaks at u = 0 with 1/4", abs(grads["kahneman_tversky"].max().item() - 0.25) < 1e-6
             and abs(u[grads["kahneman_tversky"].argmax()].item()) < 0.05)
lesson.check("loss-averse pushes losses (U'(-8) ~ 1), risk-seeking ignores them (U'(-8) ~ 0)",
             grads["loss_averse"][0] > 0.99 and grads["risk_seeking"][0] < 0.01,
             f"U_la'(-8) = {grads['loss_averse'][0]:.4f}, U_rs'(-8) = {grads['risk_seeking'][0]:.4f}")

# %% [markdown]
# ## KTO contains DPO
#
# Diffusion-KTO Sec. 4.2.1: take a pair, keep only the winner as a *desirable* sample, and use the **loser's
# reward** $r_l$ as its reference point (with its gradient, not detached). With the loss-averse utility
#
# $$\lambda_d\,\big(1 - \log\sigma(r_w - r_l)\big) = \lambda_d\,\big(1 + \mathrm{softplus}(-(r_w - r_l))\big), \qquad
# \text{i.e.}\quad \mathcal L_{\mathrm{KTO}} = \lambda_d\,(1 + \mathcal L_{\mathrm{DPO}}).$$
#
# For the default $\lambda_d = 1$ that is DPO plus the constant 1, with the same gradient; for any other
# $\lambda_d$ it is DPO scaled by $\lambda_d$ (plus $\lambda_d$), so the gradient is $\lambda_d$ times DPO's
# ("KTO minus $\lambda_d$ equals DPO" holds only at $\lambda_d = 1$; docs/conventions.md I3, the KTO-contains-DPO
# identity). With plain SGD a gradient $\lambda_d$ times
# larger is the same as DPO at $\lambda_d$ times the learning rate. With Adam, which the toy and the trainers use,
# it is not: Adam divides each gradient by its running scale (prerequisites, section 5), so a constant $\lambda_d$
# all but cancels; a section below measures it. In float64 on random errors, for $\lambda_d = 1$ and $2$:

# %%
g = torch.Generator().manual_seed(0)
err_w, err_l, ref_err_w, ref_err_l = (0.1 + 0.02 * torch.rand(32, generator=g, dtype=torch.float64) for _ in range(4))
err_w.requires_grad_(True)
err_l.requires_grad_(True)
beta = 5000.0
dpo = minipref.dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta).loss
grad_dpo = torch.autograd.grad(dpo, (err_w, err_l))
kto_minus_dpo = {}
for lambda_d in (1.0, 2.0):
    r_l = minipref.implicit_reward(err_l, ref_err_l, beta)  # not detached: z_ref carries the loser's gradient
    kto = minipref.kto_loss(err_w, ref_err_w, torch.ones(32, dtype=torch.bool), beta=beta, utility="loss_averse",
                            reference_point=r_l, lambda_d=lambda_d).loss
    grad_kto = torch.autograd.grad(kto, (err_w, err_l))
    kto_minus_dpo[lambda_d] = (kto - lambda_d * (1 + dpo)).item()
    lesson.check_close(f"lambda_d = {lambda_d:g}: KTO(loss_averse, desirable winners, z_ref = r_l) == lambda_d (1 + DPO)",
                       kto.item(), lambda_d * (1 + dpo.item()), abs_tol=1e-12)
    lesson.check(f"... and its gradient is lambda_d = {lambda_d:g} times DPO's",
                 all(torch.allclose(a, lambda_d * b, rtol=0, atol=1e-12) for a, b in zip(grad_kto, grad_dpo)))
lesson.check_range("with lambda_d = 2, 'KTO - lambda_d == DPO' is off by a whole DPO loss", abs(kto.item() - 2 - dpo.item()),
                   0.5 * dpo.item(), detail=f"KTO - 2 = {kto.item() - 2:.4f}, DPO = {dpo.item():.4f}")

# %% [markdown]
# ## Gradients at the start, and a sample labelled both ways
#
# At $\theta = \mathrm{ref}$ every $u$ is 0. Then $U_{la}'(0) = U_{rs}'(0) = 1/2$ and $U_{kt}'(0) = 1/4$:
# loss-averse and risk-seeking KTO start with the same gradient, Kahneman-Tversky with half of it.
#
# A sample labelled **both** desirable and undesirable (two annotators disagree) with the same reference point
# contributes $(1 - U(u)) + (1 - U(-u))$. For Kahneman-Tversky that is $2 - \sigma(u) - \sigma(-u) = 1$: a
# constant, zero gradient; the conflicting labels cancel. For the other two it is **not** constant: loss-averse
# gives $2 + \mathrm{softplus}(-u) + \mathrm{softplus}(u)$, risk-seeking $2 - \mathrm{softplus}(u) -
# \mathrm{softplus}(-u)$, so the pair
# still pulls the model (towards $u = 0$ for loss-averse, away from it for risk-seeking). The "labelled both ways
# contributes a constant" identity (docs/conventions.md I4, the KTO identities) holds for the Kahneman-Tversky utility
# only.

# %%
err = torch.full((2,), 0.1, dtype=torch.float64, requires_grad=True)
ref_err = torch.full((2,), 0.1, dtype=torch.float64)
at_init = {}
for name in UTILITIES:
    loss = minipref.kto_loss(err[:1], ref_err[:1], [True], beta=beta, utility=name, reference_point="zero").loss
    at_init[name] = torch.autograd.grad(loss, err)[0][0].item()
print("d loss / d err at init:", {k: round(v, 2) for k, v in at_init.items()})
lesson.check("at init: loss-averse and risk-seeking gradients equal, Kahneman-Tversky half",
             math.isclose(at_init["loss_averse"], at_init["risk_seeking"]) and
             math.isclose(at_init["kahneman_tversky"], at_init["loss_averse"] / 2))

both_ways = {}
for name in UTILITIES:
    row = []
    for shift in (-0.004, 0.0, 0.004):  # err_model - err_ref, so u = -(beta/2) * shift for the desirable copy
        e = (ref_err + shift).detach().requires_grad_(True)
        loss = minipref.kto_loss(e, ref_err, [True, False], beta=beta, utility=name, reference_point="zero").loss
        row.append((2 * loss.item(), torch.autograd.grad(loss, e)[0].sum().item()))  # x2: kto_loss is a batch mean
    both_ways[name] = row
    print(f"{name:17} contribution (u = 10, 0, -10): " + ", ".join(f"{v:.4f}" for v, _ in row)
          + "   d/d err: " + ", ".join(f"{d:+.1f}" for _, d in row))
kt = both_ways["kahneman_tversky"]
lesson.check("Kahneman-Tversky: labelled both ways is constant 1 with zero gradient",
             all(abs(v - 1) < 1e-12 and abs(d) < 1e-9 for v, d in kt))
lesson.check("loss-averse: labelled both ways is NOT constant",
             max(v for v, _ in both_ways["loss_averse"]) - min(v for v, _ in both_ways["loss_averse"]) > 1)
la, rsk = both_ways["loss_averse"], both_ways["risk_seeking"]
lesson.check("... it is lowest at u = 0 for loss-averse (pulls towards it) and highest there for risk-seeking (pushes away)",
             la[1][0] < min(la[0][0], la[2][0]) and rsk[1][0] > max(rsk[0][0], rsk[2][0]),
             f"loss-averse {la[0][0]:.2f} / {la[1][0]:.2f} / {la[2][0]:.2f}, risk-seeking {rsk[0][0]:.2f} / {rsk[1][0]:.2f} / {rsk[2][0]:.2f}")

# %% [markdown]
# ## The KTO training loop
#
# Here is the whole of Diffusion-KTO fine-tuning on the toy (`toy/methods.py`'s `binary_step` and
# `python -m full.train` do the same through minipref's method table, lesson 7). Each step draws 256 *unpaired* points, each desirable with probability $\gamma = 0.8$ (Diffusion-KTO
# Sec. 4.3), noises them with one $(t, \epsilon)$ each, runs the policy (with gradient) and the frozen reference
# (without), and calls `kto_loss` with the authors' reference point, $z_{\mathrm{ref}} = \max(0,
# \mathrm{mean}_{\text{batch}}\, r)$, detached. `flip` turns a fraction of the labels the other way (we use it
# below); SFT, for comparison, is the plain denoising loss on the samples *labelled* desirable.

# %%
import copy  # noqa: E402

import numpy as np  # noqa: E402

from toy.data import DESIRABLE, PreferenceData  # noqa: E402
from toy.evaluate import sample_metrics  # noqa: E402
from toy.model import denoising_error, draw_t_and_noise  # noqa: E402
from toy.run import generator_for  # noqa: E402
from toy.sampling import make_sampler, sample  # noqa: E402
from toy.train import MAX_GRAD_NORM, cosine_schedule  # noqa: E402

STEPS = 150 if QUICK else 600  # the toy's 600 steps; --quick a quarter
GAMMA = 0.8
N_SAMPLES = 2000  # samples per evaluation: the desirable fraction to about +-0.011 (one binomial standard error)
reference, scheduler, _ = lesson.pretrained_toy()
data = PreferenceData.draw(2000, generator_for(0, "preference data"))  # the training set `python -m toy` uses
sampler = make_sampler(scheduler)
desirable_reference = DESIRABLE.sample(N_SAMPLES, torch.Generator().manual_seed(99))  # for the energy distance


def where_samples_land(policy) -> dict:
    with torch.no_grad():
        return sample_metrics(sample(policy, sampler, N_SAMPLES, torch.Generator().manual_seed(5)), desirable_reference)


def train_binary(method: str, flip: float = 0.0, steps: int = STEPS, beta: float = 500.0, checkpoints: int = 0,
                 gamma: float = GAMMA, reference_point: str = "batch", lambda_d: float = 1.0, lr: float = 1e-3) -> dict:
    """Fine-tune a copy of the reference with KTO (``method`` = a utility) or ``"sft"`` on binary feedback."""
    g = torch.Generator().manual_seed(0)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    schedule = cosine_schedule(optimizer, steps, warmup=max(1, steps // 20))
    log = {"loss": [], "z_ref": [], "median_reward": [], "desirable_below_ref": [], "desirable_frac": [],
           "checkpoint_step": []}
    for step in range(steps + 1):
        if checkpoints and step % max(1, steps // checkpoints) == 0:
            log["checkpoint_step"].append(step)
            log["desirable_frac"].append(where_samples_land(policy)["desirable_frac"])
        if step == steps:
            break
        x0, desirable = data.binary_batch(256, g, gamma=gamma)  # (B, 2), (B,) bool
        flipped = torch.rand(256, generator=g) < flip  # drawn at flip 0 too: every run sees the same batches
        label = desirable ^ flipped  # what the annotator said
        t, noise = draw_t_and_noise(256, g)
        err, _ = denoising_error(policy, scheduler, x0, t, noise)
        if method == "sft":
            out = minipref.sft_loss(err, label)
        else:
            with torch.no_grad():
                ref_err, _ = denoising_error(reference, scheduler, x0, t, noise)
            out = minipref.kto_loss(err, ref_err, label, beta=beta, utility=method, reference_point=reference_point,
                                    lambda_d=lambda_d)
            z_ref = out.metrics["kl"]  # minipref reports the reference point as "kl" (prerequisites, section 4)
            reward = minipref.implicit_reward(err.detach(), ref_err, beta)
            log["z_ref"].append(z_ref)
            log["median_reward"].append(reward.median().item())
            log["desirable_below_ref"].append((reward[label] < z_ref).float().mean().item())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        log["loss"].append(out.loss.item())
        if step == 0:
            log["first_desirable_share"] = label.float().mean().item()
    log["policy"] = policy.requires_grad_(False).eval()
    log["samples"] = where_samples_land(policy)
    return log


kt = train_binary("kahneman_tversky", checkpoints=10)

# %% [markdown]
# ## $\lambda_d$ is not a learning rate under Adam
#
# The identity above says KTO's gradient is $\lambda_d$ times DPO's. Does training with $\lambda_d = 2$ then equal
# DPO at twice the learning rate? Twenty steps from the reference, the same batches, three ways: $\lambda_d = 1$,
# $\lambda_d = 2$, and $\lambda_d = 1$ at twice the learning rate. With plain SGD (no clipping) the second and third
# runs coincide. With Adam and gradient clipping at norm 1.0, as the toy and the trainers train, $\lambda_d = 2$
# lands next to $\lambda_d = 1$, and twice the learning rate somewhere else.

# %%
def dpo_as_kto(lambda_d: float, lr: float, adam: bool, steps: int = 20) -> torch.Tensor:
    """DPO written as loss-averse KTO (winners desirable, z_ref = the loser's reward); the final weights, flat."""
    g = torch.Generator().manual_seed(0)
    policy = copy.deepcopy(reference).requires_grad_(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr) if adam else torch.optim.SGD(policy.parameters(), lr=lr)
    for _ in range(steps):
        x_w, x_l = data.batch(256, g, desirable=True), data.batch(256, g, desirable=False)
        t, noise = draw_t_and_noise(256, g)
        x0, t2, noise2 = torch.cat([x_w, x_l]), torch.cat([t, t]), torch.cat([noise, noise])
        err_w, err_l = denoising_error(policy, scheduler, x0, t2, noise2)[0].chunk(2)
        with torch.no_grad():
            ref_w, ref_l = denoising_error(reference, scheduler, x0, t2, noise2)[0].chunk(2)
        loss = minipref.kto_loss(err_w, ref_w, torch.ones(256, dtype=torch.bool), beta=500.0, utility="loss_averse",
                                 reference_point=minipref.implicit_reward(err_l, ref_l, 500.0), lambda_d=lambda_d).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if adam:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in policy.parameters()])


scale_vs_lr = {}
for name, adam, lr in (("SGD, no clipping", False, 1e-5), ("Adam, clipped at 1.0", True, 1e-3)):
    base, scaled, faster = dpo_as_kto(1.0, lr, adam), dpo_as_kto(2.0, lr, adam), dpo_as_kto(1.0, 2 * lr, adam)
    scale_vs_lr[name] = {"lambda_2_vs_lr_x2": (scaled - faster).norm().item(), "lambda_2_vs_lambda_1": (scaled - base).norm().item(),
                         "lr_x2_vs_lambda_1": (faster - base).norm().item()}
    print(f"{name:22} |lambda_d 2 - lr x2| {scale_vs_lr[name]['lambda_2_vs_lr_x2']:.2e}, "
          f"|lambda_d 2 - lambda_d 1| {scale_vs_lr[name]['lambda_2_vs_lambda_1']:.2e}, "
          f"|lr x2 - lambda_d 1| {scale_vs_lr[name]['lr_x2_vs_lambda_1']:.2e}")
sgd, adam_run = scale_vs_lr["SGD, no clipping"], scale_vs_lr["Adam, clipped at 1.0"]
lesson.check_range("SGD: lambda_d = 2 is DPO at twice the lr (the runs agree to float32 round-off)",
                   sgd["lambda_2_vs_lr_x2"] / sgd["lr_x2_vs_lambda_1"], high=1e-3)
lesson.check_range("clipped Adam: lambda_d = 2 lands far closer to lambda_d = 1 than twice the lr does (less than 1/5 of the way)",
                   adam_run["lambda_2_vs_lambda_1"] / adam_run["lr_x2_vs_lambda_1"], high=0.2)

# %% [markdown]
# ## What the Kahneman-Tversky loss does during training
#
# At the start every $u$ is 0, so the KT loss is exactly $1 - \sigma(0) = 0.5$. Within a few steps it is at about
# 0.6, and around there it stays for the rest of the run, while the samples first move into the desirable disc and
# then partly back out (right panel). Its wiggles follow the reference point, not the samples (middle panel: where
# $z_{\mathrm{ref}}$ drops towards 0, the loss drops towards 0.5). Why 0.6 and not a coin flip's 0.5? The reference point. $z_{\mathrm{ref}}$ is the
# batch's *mean* reward, and the rewards are right-skewed: one random $(t, \epsilon)$ per sample, and a few samples
# (those at small $t$, where a change of the error is a large reward) get large rewards, which pull the mean up
# while the median stays near 0. So $z_{\mathrm{ref}}$ sits above most samples' rewards (from step 2 on it is
# typically 1 to 5, the batch's median reward about 0), and about three quarters of the *desirable* samples score
# below it: their $u = r - z_{\mathrm{ref}}$ is negative and their loss $1 - \sigma(u)$ is above 0.5. The printout
# gives the numbers. A KTO loss curve is not a progress bar: it is no lower when the samples are at their best
# than at the end, after they have regressed. Watch where the samples go (or a held-out accuracy).

# %%
def smooth(values, window=10):
    return np.convolve(np.asarray(values, dtype=float), np.ones(window) / window, mode="valid")


loss, z_ref, median = np.array(kt["loss"]), np.array(kt["z_ref"]), np.array(kt["median_reward"])
below = np.array(kt["desirable_below_ref"])
steps_seen, fractions = np.array(kt["checkpoint_step"]), np.array(kt["desirable_frac"])
peak = int(np.argmax(fractions))
window = STEPS // 10
early, plateau = loss[5:15], loss[15:]
at_peak, at_end = loss[steps_seen[peak]:steps_seen[peak] + window].mean(), loss[-window:].mean()
print(f"KT loss: step 0 {loss[0]:.3f}, steps 1-9 {np.round(loss[1:10], 2).tolist()}; mean of steps 5-14 "
      f"{early.mean():.3f}, after step 15 {plateau.mean():.3f}")
print(f"steps 2+: z_ref median {np.median(z_ref[2:]):.2f} (5-95%: {np.percentile(z_ref[2:], 5):.2f} to "
      f"{np.percentile(z_ref[2:], 95):.2f}); batch median reward {np.median(median[2:]):.2f}; desirable samples below "
      f"z_ref: {below[2:].mean():.2f} on average ({np.percentile(below[2:], 5):.2f} to {np.percentile(below[2:], 95):.2f})")
print("samples in the desirable disc at steps " + ", ".join(f"{s}: {f:.3f}" for s, f in zip(steps_seen, fractions)))
print(f"mean loss over the {window} steps after the best checkpoint (step {steps_seen[peak]}) {at_peak:.3f}, "
      f"over the last {window} steps {at_end:.3f}")
lesson.check_close("at the start the KT loss is 1 - sigmoid(0) = 0.5", loss[0], 0.5, abs_tol=1e-6)
lesson.check_close("after step 15 it sits near 0.6 (mean within 0.05)", plateau.mean(), 0.6, abs_tol=0.05)
lesson.check_close("... and it is there within a few steps: steps 5-14 already average within 0.05 of that",
                   early.mean(), plateau.mean(), abs_tol=0.05)
lesson.check_range("the reference point sits above the batch's median reward at more than 90% of the steps",
                   float((z_ref[2:] > median[2:]).mean()), 0.9,
                   detail=f"median z_ref {np.median(z_ref[2:]):.2f}, median batch median reward {np.median(median[2:]):.2f}")
lesson.check_range("... so most desirable samples score below it (u < 0, loss above 0.5): 60% to 90% on average",
                   below[2:].mean(), 0.6, 0.9)
follows_z_ref = float(np.corrcoef(loss[2:], z_ref[2:])[0, 1])
lesson.check_range("the loss follows the reference point: per-step correlation with z_ref above 0.5", follows_z_ref, 0.5)
lesson.check_range("the samples move into the desirable disc: the best checkpoint is more than 0.1 above the start",
                   fractions[peak] - fractions[0], 0.1, detail=f"at step {steps_seen[peak]}")
lesson.check_range("... and later partly back out: the end is more than 0.03 below the best", fractions[peak] - fractions[-1],
                   0.03)
lesson.check_range("the loss is no progress bar: it is not lower after the best checkpoint than at the end (within 0.02)",
                   at_peak - at_end, -0.02, detail=f"{at_peak:.3f} after step {steps_seen[peak]}, {at_end:.3f} at the end")

fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), layout="constrained")
axes[0].plot(loss, color="0.8", lw=0.8, label="per batch")
axes[0].plot(np.arange(9, len(loss)), smooth(loss), label="mean of 10 steps")
axes[0].axhline(0.5, color="0.5", ls=":", lw=1, label="0.5 (every u = 0)")
axes[0].set_title("Kahneman-Tversky loss: 0.5 at step 0, then around 0.6")
axes[1].plot(np.arange(9, len(z_ref)), smooth(z_ref), label="z_ref = max(0, batch mean reward)")
axes[1].plot(np.arange(9, len(median)), smooth(median), label="batch median reward")
axes[1].set_title("the reference point sits above most rewards")
axes[2].plot(steps_seen, fractions, marker="o")
axes[2].set_title("samples in the desirable disc: up, then partly down")
for ax in axes:
    ax.set_xlabel("step")
for ax in axes[:2]:
    ax.legend(fontsize=7)
fig.suptitle("The KT loss follows its reference point, not the samples: ~0.6 within a few steps while they improve and then regress",
             fontsize=10)
lesson.save_figure(fig, "03_kto_loss_vs_progress")

# %% [markdown]
# ## Flipped labels: Kahneman-Tversky against loss-averse KTO and SFT
#
# The appendix argument: a sample the model confidently puts on the *other* side of the reference point (large
# $|u|$, as a mislabelled sample soon is) gets a vanishing gradient $U'(u) = \sigma(u)\sigma(-u)$ under
# Kahneman-Tversky, while loss-averse KTO keeps pushing it with $U' \to 1$. So with noisy labels Kahneman-Tversky
# should lose less. We train KT, loss-averse KTO and SFT twice each, on the same batches: with clean labels and with
# 20% of the labels flipped at random, and compare how much each loses.
#
# SFT is a special case: it only trains on samples *labelled* desirable, and with $\gamma = 0.8$ a flipped label
# sends an undesirable sample there only $0.2 \cdot 0.2 / (0.8 \cdot 0.8 + 0.2 \cdot 0.2) = 5.9\%$ of the time.

# %%
METHODS = ("kahneman_tversky", "loss_averse", "sft")
robustness, gradient_share = {}, {}
for method in METHODS:
    for flip in (0.0, 0.2):
        run_ = kt if (method, flip) == ("kahneman_tversky", 0.0) else train_binary(method, flip)
        robustness[f"{method}, flip {flip}"] = {k: run_["samples"][k] for k in ("desirable_frac", "undesirable_frac",
                                                                                "energy_distance", "mean")}
        if method != "sft" and flip:  # how much of the final gradient the flipped samples get: U'(u) per sample
            g = torch.Generator().manual_seed(21)
            x0, desirable = data.binary_batch(4096, g, gamma=GAMMA)
            flipped = torch.rand(4096, generator=g) < flip
            t, noise = draw_t_and_noise(4096, g)
            with torch.no_grad():
                reward = minipref.implicit_reward(denoising_error(run_["policy"], scheduler, x0, t, noise)[0],
                                                  denoising_error(reference, scheduler, x0, t, noise)[0], 500.0)
            sign = ((desirable ^ flipped).double() * 2 - 1)
            u = (sign * (reward - reward.mean().clamp(min=0))).double().requires_grad_(True)
            (weight,) = torch.autograd.grad(UTILITIES[method](u).sum(), u)
            gradient_share[method] = (weight[flipped].sum() / weight.sum()).item()
print(f"{'':30} {'in desirable':>13} {'in undesirable':>15} {'energy dist.':>13} {'mean':>16}")
for name, r in robustness.items():
    print(f"{name:30} {r['desirable_frac']:>13.3f} {r['undesirable_frac']:>15.3f} {r['energy_distance']:>13.4f} "
          f"  ({r['mean'][0]:.3f}, {r['mean'][1]:.3f})")
change = {m: robustness[f"{m}, flip 0.2"]["desirable_frac"] - robustness[f"{m}, flip 0.0"]["desirable_frac"] for m in METHODS}
# The sampling noise of a change: two binomial fractions of N_SAMPLES each (the training noise comes on top).
change_se = {m: math.sqrt(sum(p * (1 - p) / N_SAMPLES for p in (robustness[f"{m}, flip {f}"]["desirable_frac"] for f in (0.0, 0.2))))
             for m in METHODS}
print("change of the desirable fraction with 20% flips: " + ", ".join(f"{m} {change[m]:+.3f} (+- {change_se[m]:.3f})" for m in METHODS))
print("share of the gradient weight U'(u) on the flipped samples (20% of the batch): "
      + ", ".join(f"{k} {v:.3f}" for k, v in gradient_share.items()))
lesson.check_range("the mechanism: the flipped samples get less than their 20% share of KT's gradient weight",
                   gradient_share["kahneman_tversky"], high=0.2)
lesson.check_range("... and less than loss-averse KTO gives them", gradient_share["loss_averse"] - gradient_share["kahneman_tversky"], 0.0)
lesson.check_range("the outcome: 20% flips move no method's desirable fraction by 0.05 or more",
                   max(abs(v) for v in change.values()), high=0.05)
# "More robust" means a smaller change in size. The toy's KTO runs are sensitive to the CPU's float kernels (on
# torch's portable kernels KT moved +0.037 and loss-averse -0.035 here: docs/testing.md), so the check is on what the
# claim says, the sizes, not on the signed gap.
for other in ("loss_averse", "sft"):
    smaller_by = abs(change[other]) - abs(change["kahneman_tversky"])
    lesson.check_range(f"... and KT's change is not smaller in size than {other}'s by 3 sampling standard errors "
                       "(KT is not shown more robust)",
                       smaller_by / math.hypot(change_se["kahneman_tversky"], change_se[other]), high=3.0,
                       detail=f"KT {change['kahneman_tversky']:+.3f}, {other} {change[other]:+.3f}")

# %% [markdown]
# **Reading it.** The mechanism is there, but small on this toy: the flipped samples get somewhat less than their
# 20% share of Kahneman-Tversky's gradient weight, and somewhat less than loss-averse KTO gives them (the printout).
# The outcome: with 20% of the labels flipped no method's desirable fraction moves by 0.05 or more. Where exactly
# each lands depends even on the CPU's float kernels. With torch's default kernels on the development machine
# (AVX-512), in this seed, Kahneman-Tversky's fraction does not drop (+0.016 in quick mode, +0.002 in the full run)
# while loss-averse KTO and SFT lose 0.02-0.03; with torch's portable kernels (`ATEN_CPU_CAPABILITY=default`, quick
# mode) KT moves by +0.037, loss-averse by -0.035 and SFT by -0.021, changes of about the same size. Each change
# carries a sampling standard error of about 0.016 (2000 samples); in quick mode, with either kind of kernel, the
# sizes of the changes differ by less than one of them (the signed changes, KT's up and the others' down, by up to
# 3.3), in one seed at one flip rate. That is consistent with the appendix's argument, not a demonstration of it: the
# checks above hold the text to "KT's change is not smaller in size than the others' by 3 standard errors", and
# would fail if the data ever showed KT more robust. SFT keeps the largest desirable fraction with or without
# flips. Exercise 2 changes one thing, balanced data ($\gamma = 0.5$), and the picture changes with it.

# %%
g = torch.Generator().manual_seed(22)
_, desirable = data.binary_batch(100_000, g, gamma=GAMMA)
label = desirable ^ (torch.rand(100_000, generator=g) < 0.2)
lesson.check_close("with gamma 0.8 and 20% flips, the share of truly undesirable samples among those labelled desirable",
                   (~desirable[label]).float().mean().item(), 0.2 * 0.2 / (0.8 * 0.8 + 0.2 * 0.2), abs_tol=0.005)
lesson.check("SFT with flipped labels still has the largest desirable fraction of the three",
             robustness["sft, flip 0.2"]["desirable_frac"] > max(robustness["kahneman_tversky, flip 0.2"]["desirable_frac"],
                                                                 robustness["loss_averse, flip 0.2"]["desirable_frac"]))

# %% [markdown]
# ## The 2D comparison (Diffusion-KTO Sec. 7)
#
# `toy.run.run` is what `python -m toy` runs: pretrain the toy model, fine-tune one copy per method with the
# unchanged minipref loss, sample, measure. We run DPO and the KTO utilities, including the authors' *bounded*
# risk-seeking form (`risk_seeking_bounded`: risk-seeking on desirable samples, loss-averse on undesirable ones),
# all at beta 500 with desirable samples drawn with probability 0.8 (Sec. 4.3). Quick mode is
# `python -m toy --quick` (a quarter of the steps, 1000 samples). SFT (fine-tuning on the desirable samples only)
# is the baseline.

# %%
from toy.run import RunConfig, run  # noqa: E402

TOY_METHODS = ["sft", "dpo", "kto_kahneman_tversky", "kto_loss_averse", "kto_risk_seeking", "kto_risk_seeking_bounded"]
toy_out = lesson.OUT / "03_toy_run"
metrics = run(RunConfig(out=toy_out, quick=QUICK, methods=TOY_METHODS, progress=False))
print((toy_out / "metrics.md").read_text())
shutil.copyfile(toy_out / "samples.png", lesson.OUT / "03_toy_samples.png")
print(f"figure: {lesson.OUT / '03_toy_samples.png'}")
if lesson.IN_NOTEBOOK:
    from IPython.display import Image, display

    display(Image(filename=str(lesson.OUT / "03_toy_samples.png")))

# %% [markdown]
# **Reading it** (the same findings as docs/toy.md, which runs the full version over 3 seeds):
#
# * **DPO drifts away from the desirable region** (the paper: "Diffusion-DPO has a strong tendency to avoid loss to
#   the point that it deviates from the distribution of desirable samples"). Its samples move *up*, above both
#   Gaussians, while their mean $x$ stays at the pretrained 0.5. The idealised objective explains the direction. A
#   desirable/undesirable pair prefers $x_w$ with probability $\sigma(\rho(x_w) - \rho(x_l))$, $\rho = \log p_D -
#   \log p_U$: a Bradley-Terry model with reward $\rho$ (prerequisites, section 1), and here $\rho(x) = ((y - 0.6)^2
#   - (y - 0.8)^2) / (2 \cdot 0.01) = 20y - 14$, **linear in $y$, independent of $x$**. The optimum of the
#   KL-regularised objective with that reward is $p_{\mathrm{ref}}(x)\, e^{\rho(x)/\beta'}$ for a KL weight
#   $\beta'$ (prerequisites, section 2), and tilting the pretraining Gaussian $\mathcal N((0.5, 0.8), 0.04 I)$ by
#   $e^{20y/\beta'}$ gives $\mathcal N((0.5, 0.8 + 0.8/\beta'), 0.04 I)$: the same Gaussian shifted up. No KL weight
#   moves that optimum to $x = 0.3$. This is the optimum of the *idealised* objective; Diffusion-DPO minimises a
#   bound on it with a uniform-$t$ denoising loss in place of the likelihood (lesson 1), so it need not reach that
#   Gaussian. The checks below verify the algebra of the tilt and that DPO's samples move the way it predicts (up,
#   with the pretrained mean $x$), not that DPO converges to it. Its implicit accuracy is near the Bayes ceiling
#   0.921 anyway: accuracy measures the ranking, not where the samples go.
# * **Kahneman-Tversky KTO** lands between SFT and DPO: more samples in the desirable disc than DPO or loss-averse
#   KTO, fewer than SFT, and fewer undesirable ones than SFT (which learns the desirable Gaussian, overlap with the
#   undesirable disc included).
# * **Risk-seeking, as the paper's Sec. 4.2.2 defines it, diverges**: an undesirable sample's loss
#   $1 + \log\sigma(-u)$ is unbounded below, so making undesirable samples ever less likely lowers the loss without
#   limit. The paper's description ("roughly the same as SFT") is not what this utility does. The authors' bounded
#   form puts the most samples in the desirable disc of the KTO utilities, the nearest to SFT's by that measure;
#   by the energy distance to the desirable Gaussian Kahneman-Tversky is nearer to SFT (the bounded form overshoots
#   in $x$).

# %%
m = metrics["methods"]
lesson.check("DPO's samples leave the desirable region upward",
             m["dpo"]["desirable_frac"] < m["kto_kahneman_tversky"]["desirable_frac"] and m["dpo"]["mean"][1] > 0.95,
             f"in desirable: DPO {m['dpo']['desirable_frac']:.3f} vs KT {m['kto_kahneman_tversky']['desirable_frac']:.3f}; "
             f"DPO mean y {m['dpo']['mean'][1]:.2f} (desirable mean 0.80)")
lesson.check("Kahneman-Tversky puts more samples in the desirable disc than the pretrained model and loss-averse KTO",
             m["kto_kahneman_tversky"]["desirable_frac"] > max(m["reference"]["desirable_frac"], m["kto_loss_averse"]["desirable_frac"]),
             f"{m['kto_kahneman_tversky']['desirable_frac']:.3f} vs reference {m['reference']['desirable_frac']:.3f}, "
             f"loss-averse {m['kto_loss_averse']['desirable_frac']:.3f}")
lesson.check("... and fewer than SFT, with fewer undesirable samples than SFT",
             m["kto_kahneman_tversky"]["desirable_frac"] < m["sft"]["desirable_frac"]
             and m["kto_kahneman_tversky"]["undesirable_frac"] < m["sft"]["undesirable_frac"],
             f"in desirable KT {m['kto_kahneman_tversky']['desirable_frac']:.3f} vs SFT {m['sft']['desirable_frac']:.3f}; "
             f"in undesirable KT {m['kto_kahneman_tversky']['undesirable_frac']:.3f} vs SFT {m['sft']['undesirable_frac']:.3f}")
from toy.data import PRETRAIN, log_density_ratio  # noqa: E402

points = torch.rand(1000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 0.5
rho_gap = (log_density_ratio(points) - (20 * points[:, 1] - 14)).abs().max().item()
lesson.check_range("rho(x) = log p_D - log p_U == 20 y - 14 at 1000 random points", rho_gap, high=1e-9)
# The algebra of the tilt, by importance weights on pretraining samples: for beta' = 2 the mean should be (0.5, 0.8 + 0.8 / 2).
pre = PRETRAIN.sample(400_000, torch.Generator().manual_seed(6)).double()
weights = torch.softmax(log_density_ratio(pre) / 2.0, 0)
tilted_mean = (weights[:, None] * pre).sum(0)
lesson.check_close("algebra: p_ref exp(rho / beta') with beta' = 2 has mean y 0.8 + 0.8 / 2 = 1.2", tilted_mean[1].item(), 1.2, abs_tol=0.01)
lesson.check_close("... and the same mean x as the pretrained model, 0.5", tilted_mean[0].item(), 0.5, abs_tol=0.01)
lesson.check_close("DPO's samples keep the pretrained mean x, as the tilt does", m["dpo"]["mean"][0], m["reference"]["mean"][0], abs_tol=0.05)
KTO_UTILITIES = ("risk_seeking_bounded", "kahneman_tversky", "loss_averse")
frac_gap = {u: abs(m[f"kto_{u}"]["desirable_frac"] - m["sft"]["desirable_frac"]) for u in KTO_UTILITIES}
energy = {u: m[f"kto_{u}"]["energy_distance"] for u in KTO_UTILITIES}
lesson.check("by desirable fraction, the authors' bounded risk-seeking form is the KTO utility closest to SFT",
             frac_gap["risk_seeking_bounded"] < min(frac_gap["kahneman_tversky"], frac_gap["loss_averse"]),
             ", ".join(f"{u} {v:.3f} from SFT" for u, v in frac_gap.items()))
lesson.check("... but by energy distance to the desirable Gaussian, Kahneman-Tversky is closer than the bounded form",
             energy["kahneman_tversky"] < energy["risk_seeking_bounded"],
             ", ".join(f"{u} {v:.4f}" for u, v in energy.items()) + f" (SFT {m['sft']['energy_distance']:.4f})")
rs = m["kto_risk_seeking"]
lesson.check("the paper's risk-seeking utility diverges", rs["energy_distance"] > 10 or rs["diverged_at_step"] is not None
             or rs["nonfinite_frac"] > 0, f"energy distance to desirable {rs['energy_distance']:.3g}, mean {rs['mean']}")
lesson.check("DPO's held-out implicit accuracy is near the Bayes ceiling 0.921",
             0.85 < m["dpo"]["pairwise_implicit_acc"] < 0.921 + 0.04, f"{m['dpo']['pairwise_implicit_acc']:.3f}")

# %% [markdown]
# ## Takeaways
#
# * KTO scores each sample's implicit reward against a reference point through a utility; with the loser's reward
#   as the reference point and the loss-averse utility it is $\lambda_d (1 + \mathrm{DPO})$. Under Adam a constant
#   $\lambda_d$ is not a learning rate: it nearly cancels.
# * The Kahneman-Tversky utility's gradient fades on both sides of the reference point and conflicting labels
#   cancel exactly; but on this toy 20% flipped labels barely move any of KT, loss-averse KTO and SFT at the paper's
#   $\gamma = 0.8$, KT is not measurably more robust than the other two, and with balanced data it is the one whose
#   result moves the most (exercise 2).
# * The KT loss is measured against the batch's mean reward, which sits above most samples: it goes from 0.5 to
#   about 0.6 in a few steps, then follows the reference point and says nothing about where the samples go.
# * DPO on this toy learns $\rho = 20y - 14$ and moves up as the idealised optimum predicts; KTO (KT) stops between
#   SFT and DPO; the paper's risk-seeking utility diverges.
#
# ## Exercises
#
# 1. Set $\lambda_d = 2$ in the KTO training loop (`kto_loss(..., lambda_d=2.0)`) and predict how the loss curve and
#    the samples change, and how that compares with doubling the learning rate.
# 2. Rerun the flipped-label comparison with balanced data, `GAMMA = 0.5`. Before running, predict how SFT's
#    exposure to flipped labels changes from 5.9%, and which of the three methods' results the flips move most.
# 3. Train KT with `reference_point="zero"` and predict where its loss sits. Does the model end in the same place?
#
# Next: lesson 4, self-play (SPIN): preference learning without any loser images.

# %%
lesson.save_results("03_kto", {
    "quick": QUICK, "kt_loss": {"start": float(loss[0]), "early_mean": float(early.mean()), "plateau_mean": float(plateau.mean()),
                                "after_best_checkpoint": float(at_peak), "at_end": float(at_end),
                                "correlation_with_z_ref": follows_z_ref},
    "kt_reference_point": {"z_ref_median": float(np.median(z_ref[2:])), "batch_median_reward": float(np.median(median[2:])),
                           "desirable_below_ref": float(below[2:].mean()),
                           "z_ref_above_median": float((z_ref[2:] > median[2:]).mean())},
    "kt_desirable_frac": kt["desirable_frac"], "kt_checkpoint_step": kt["checkpoint_step"],
    "lambda_d_vs_lr": scale_vs_lr, "robustness": robustness, "flip_change": change, "flip_change_se": change_se,
    "gradient_share_flipped": gradient_share,
    "rho_gap": rho_gap, "gradients_at_init": at_init, "kto_minus_lambda_d_times_one_plus_dpo": kto_minus_dpo,
    "toy": {name: {k: m[name][k] for k in ("desirable_frac", "undesirable_frac", "energy_distance", "mean",
                                           "pairwise_implicit_acc")} for name in m},
})

# %% [markdown]
# ## Solutions
#
# Run with `python tutorials/03_kto.py --solutions` (or set `lesson.SOLUTIONS = True` in a notebook); each solution
# checks its prediction.
#
# **1.** $\lambda_d$ multiplies the desirable samples' terms, so the loss *values* change: the first loss is
# $0.5\,(2 n_d + n_u)/B$, about 0.9 at 80% desirable samples, instead of 0.5. In the section above every sample
# was desirable, so $\lambda_d$ scaled the whole gradient and Adam cancelled it. Here the batch mixes the two
# classes, and $\lambda_d = 2$ doubles the desirable samples' share of the gradient against the undesirable ones':
# a change of *direction*, which Adam does not undo, not of size. So the run is not the $\lambda_d = 1$ run, and not
# the run at twice the learning rate either (that one keeps the direction and takes bigger steps). Measured: it
# lands between the two, nearer $\lambda_d = 1$ than twice the learning rate does, and where the samples end
# changes little (desirable fraction within 0.06 of $\lambda_d = 1$'s; +0.05 in quick mode, +0.01 in the full run,
# one seed).
#
# **2.** With $\gamma = 0.5$ a flipped label sends an undesirable sample into SFT's training set
# $0.5 \cdot 0.2 / (0.5 \cdot 0.8 + 0.5 \cdot 0.2) = 20\%$ of the time instead of 5.9%: SFT now learns a mixture
# with a fifth of undesirable points and loses more to the flips than at $\gamma = 0.8$. The natural guess, that SFT
# is then hurt the most, is wrong: Kahneman-Tversky's outcome moves the most (by 0.08 to 0.17 with the CPU's
# kernels), and not even in a fixed direction (down by 0.17 in quick mode, up by 0.14 in the full run). With
# balanced batches it already drifts upward like DPO on clean labels (docs/toy.md's claims map finds the same at $\gamma = 0.5$); the flips change
# where that drift ends, and which way is a matter of the run. Loss-averse KTO moves the least. So on this toy the
# utility whose gradient fades for confidently mislabelled samples gives the *least* predictable result under
# flipped labels once the data are balanced.
#
# **3.** With $z_{\mathrm{ref}} = 0$ a sample's $u$ is its own reward. The batch's median reward is about 0 (the
# lesson), so the loss starts at 0.5 and, as the desirable samples' rewards rise above 0, falls *below* 0.5,
# instead of sitting at 0.6. Where the model ends is a separate question: the reference point decides which samples
# count as gains, so it changes the gradient too, not only the loss's level. Measured: the samples end close to
# where the batch reference point sends them (desirable fraction within 0.05), while the loss sits 0.2 lower: the
# reference point moves the loss curve far more than the samples.

# %%
def solution_1() -> dict:
    doubled, faster = train_binary("kahneman_tversky", lambda_d=2.0), train_binary("kahneman_tversky", lr=2e-3)
    flat = lambda run_: torch.cat([p.flatten() for p in run_["policy"].parameters()])  # noqa: E731
    to_doubled, to_faster = (flat(doubled) - flat(kt)).norm().item(), (flat(faster) - flat(kt)).norm().item()
    fractions_ = {name: r["samples"]["desirable_frac"] for name, r in (("1", kt), ("lambda_d 2", doubled), ("lr x2", faster))}
    print(f"1. first loss {doubled['loss'][0]:.3f} (desirable share {doubled['first_desirable_share']:.3f}); "
          f"|theta - theta(lambda_d 1)|: lambda_d 2 {to_doubled:.4f}, lr x2 {to_faster:.4f}; desirable fraction {fractions_}")
    lesson.check_close("1. lambda_d = 2: the first loss is 0.5 (2 n_d + n_u) / B", doubled["loss"][0],
                       0.5 * (1 + doubled["first_desirable_share"]), rel_tol=1e-6)
    lesson.check_range("1. ... the run ends closer to lambda_d = 1 than twice the lr does, but not next to it (0.1 to 1)",
                       to_doubled / to_faster, 0.1, 1.0)
    lesson.check_close("1. ... and its desirable fraction is within 0.06 of lambda_d = 1's", fractions_["lambda_d 2"],
                       fractions_["1"], abs_tol=0.06)
    return {"first_loss": doubled["loss"][0], "distance_lambda_d_2": to_doubled, "distance_lr_x2": to_faster,
            "desirable_frac": fractions_}


def solution_2() -> dict:
    g = torch.Generator().manual_seed(23)
    _, desirable_ = data.binary_batch(100_000, g, gamma=0.5)
    label_ = desirable_ ^ (torch.rand(100_000, generator=g) < 0.2)
    exposure = (~desirable_[label_]).float().mean().item()
    lesson.check_close("2. gamma 0.5: SFT's exposure to undesirable samples is 20%", exposure, 0.2, abs_tol=0.005)
    balanced = {m: {f: train_binary(m, f, gamma=0.5)["samples"]["desirable_frac"] for f in (0.0, 0.2)} for m in METHODS}
    change_ = {m: v[0.2] - v[0.0] for m, v in balanced.items()}
    print("2. gamma 0.5, change of the desirable fraction with 20% flips: "
          + ", ".join(f"{m} {v:+.3f}" for m, v in change_.items())
          + f"; SFT at gamma 0.8 {change['sft']:+.3f}")
    lesson.check_range("2. SFT loses more to the flips at gamma 0.5 than at gamma 0.8", change["sft"] - change_["sft"], 0.0)
    size = {m: abs(v) for m, v in change_.items()}
    # by more than 0.05: -0.17 on AVX-512, -0.08 on torch's portable kernels (the toy's KTO is kernel-sensitive)
    lesson.check("2. Kahneman-Tversky's desirable fraction moves the most (by more than 0.05), loss-averse KTO's the least",
                 size["kahneman_tversky"] > max(0.05, size["sft"]) and size["loss_averse"] < min(size["sft"], size["kahneman_tversky"]),
                 ", ".join(f"{m} {v:+.3f}" for m, v in change_.items()))
    return {"exposure": exposure, "desirable_frac": balanced, "change": change_}


def solution_3() -> dict:
    zero = train_binary("kahneman_tversky", reference_point="zero")
    late = np.mean(zero["loss"][15:])
    frac_zero, frac_batch = zero["samples"]["desirable_frac"], kt["samples"]["desirable_frac"]
    print(f"3. z_ref = 0: loss from step 15 on {late:.3f} (batch z_ref: {plateau.mean():.3f}); desirable fraction "
          f"{frac_zero:.3f} (batch z_ref: {frac_batch:.3f}), mean {np.round(zero['samples']['mean'], 3).tolist()}")
    lesson.check_close("3. z_ref = 0: the loss starts at 0.5", zero["loss"][0], 0.5, abs_tol=1e-6)
    lesson.check_range("3. ... and sits below 0.5 from step 15 on, not at 0.6", late, high=0.5)
    lesson.check_close("3. the samples end near the batch-z_ref run's: desirable fraction within 0.05", frac_zero, frac_batch,
                       abs_tol=0.05)
    return {"late_loss": float(late), "desirable_frac": frac_zero, "batch_desirable_frac": frac_batch,
            "mean": zero["samples"]["mean"]}


lesson.run_solutions("03_kto", solution_1, solution_2, solution_3)
