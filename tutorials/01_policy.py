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
# # Lesson 1: a diffusion model is a policy
#
# **Assumes** DDPM's forward process and denoising loss (Ho et al., *Denoising Diffusion Probabilistic Models*,
# arXiv:2006.11239) and, from [00_prerequisites.md](00_prerequisites.md), section 2 (the KL-regularised objective)
# and section 3 (DPO for language models).
#
# Every objective in minipref is built from one quantity, the **implicit reward**
#
# $$r(x) = -\frac{\beta}{2}\big(\mathrm{err}_\theta(x) - \mathrm{err}_{\mathrm{ref}}(x)\big), \qquad
# \mathrm{err} = \frac{1}{D}\sum_{d=1}^{D} (\epsilon_{\mathrm{pred}} - \epsilon)_d^2$$
#
# (`minipref.implicit_reward`; docs/conventions.md §2, "The implicit reward and the one beta"). This lesson derives it
# from the one thing a preference method needs, the log-probability ratio of an action under the fine-tuned policy
# and the reference, and **checks every step numerically** on the 2D toy: its diffusers `DDPMScheduler`
# (T = 1000), its pretrained epsilon-MLP as the reference, and a perturbed copy as the policy.
#
# **Notation.** Ho et al. call the noise schedule $\beta_t$; preference papers call the reward's KL weight
# $\beta$. Here $\beta$ is always the reward's (the `beta=` argument of every minipref loss) and the schedule is
# $b_t$:
#
# | symbol | meaning | in code |
# |---|---|---|
# | $T$ | number of diffusion steps (1000) | `scheduler.config.num_train_timesteps` |
# | $b_t$ | noise added at step $t$ (Ho et al.'s $\beta_t$) | `scheduler.betas`, here `betas` |
# | $\alpha_t = 1 - b_t$, $\bar\alpha_t = \prod_{s \le t} \alpha_s$ | signal kept in one step / up to step $t$ | `alphas`, `abar` (`scheduler.alphas_cumprod`) |
# | $\tilde b_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t} b_t$ | variance of the posterior $q(x_{t-1} \mid x_t, x_0)$ | `beta_tilde` |
# | $\sigma_t^2$ | variance of the model's reverse step ($= \tilde b_t$ in diffusers' `fixed_small`) | |
# | $\epsilon$, $\epsilon_\theta$, $\epsilon_{\mathrm{ref}}$ | true noise, policy's and reference's predictions | |
# | $\mathrm{err}$ | denoising error of one sample, a mean over its $D$ elements | `minipref.per_sample_mse` |
# | $D$ | elements of one sample (2 here, $4 \times 64 \times 64$ for SD1.5 latents) | `D` |
# | $k_t = b_t^2 / (\sigma_t^2 \alpha_t (1 - \bar\alpha_t))$ | the timestep weight derived below | `k` |
# | $\beta$ | the reward's scale (a KL weight times $T k_t D$, see below) | `beta=` |
# | $\beta_{KL}$ | the KL weight of the RLHF objective on whole chains | `BETA_KL` |
#
# **The policy.** Sampling is a chain of Gaussian actions. One reverse step of DDPM (Ho et al., Eq. (11)) is
#
# $$p_\theta(x_{t-1} \mid x_t) = \mathcal N\big(\mu_\theta(x_t), \sigma_t^2 I\big), \qquad
# \mu_\theta = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{b_t}{\sqrt{1 - \bar\alpha_t}}\,\epsilon_\theta(x_t)\Big)$$
#
# with a variance $\sigma_t^2$ that does *not* depend on the model (diffusers' default
# `variance_type="fixed_small"`: the posterior variance $\tilde b_t$ below).
#
# **The posterior.** Given the clean sample $x_0$ that produced $x_t = \sqrt{\bar\alpha_t}\, x_0 +
# \sqrt{1 - \bar\alpha_t}\, \epsilon$, the forward process can be run backwards exactly (Ho et al.,
# Eq. (6)-(7)):
#
# $$q(x_{t-1} \mid x_t, x_0) = \mathcal N(\tilde\mu, \tilde b_t I), \qquad
# \tilde\mu = \frac{\sqrt{\bar\alpha_{t-1}}\, b_t}{1 - \bar\alpha_t} x_0 + \frac{\sqrt{\alpha_t}(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t} x_t
# = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{b_t}{\sqrt{1 - \bar\alpha_t}}\,\epsilon\Big)$$
#
# (the second form substitutes $x_0$, and has the TRUE noise $\epsilon$). So the model's mean is the posterior mean
# with $\epsilon$ replaced by the prediction $\epsilon_\theta$:
#
# $$\tilde\mu - \mu_\theta = \frac{b_t}{\sqrt{\alpha_t}\sqrt{1 - \bar\alpha_t}}\,(\epsilon_\theta - \epsilon).$$
#
# **The log-ratio.** Draw the action from the posterior, $x_{t-1} = \tilde\mu + \sqrt{\tilde b_t}\, z$. Both
# models share $\sigma_t$, so their normalising constants cancel, and
#
# $$\log \frac{p_\theta(x_{t-1} \mid x_t)}{p_{\mathrm{ref}}(x_{t-1} \mid x_t)}
# = -\frac{\lVert \tilde\mu - \mu_\theta\rVert^2 - \lVert \tilde\mu - \mu_{\mathrm{ref}}\rVert^2}{2\sigma_t^2}
# \;-\; \frac{\sqrt{\tilde b_t}\, z \cdot (\mu_{\mathrm{ref}} - \mu_\theta)}{\sigma_t^2}$$
#
# (the $\tilde b_t \lVert z\rVert^2$ terms appear in both squares and cancel exactly; the last term is zero on
# average over $z$). Averaged over the action, with $\lVert\cdot\rVert^2$ a **sum** over the $D$ elements and
# $\mathrm{err}$ a **mean**:
#
# $$\mathbb E_q\big[\text{log-ratio}\big] = -\frac{k_t}{2}\big(\lVert\epsilon_\theta - \epsilon\rVert^2 - \lVert\epsilon_{\mathrm{ref}} - \epsilon\rVert^2\big)
# = -\frac{k_t D}{2}\big(\mathrm{err}_\theta - \mathrm{err}_{\mathrm{ref}}\big), \qquad
# k_t = \frac{b_t^2}{\sigma_t^2\, \alpha_t (1 - \bar\alpha_t)},$$
#
# which is `implicit_reward(err_theta, err_ref, beta = k_t * D)`. Diff-contrast (*Diffusion Preference Alignment
# via Relative Text-Image Contrast*, Eq. (8) and App. Eq. (11)-(12)) and DSPO (Zhu, Xiao and Honavar, *DSPO: Direct
# Score Preference Optimization for Diffusion Model Alignment*, Eq. (11) and App. B.1) derive the same thing. The
# section "From one step to Diffusion-DPO's objective" below carries it from one step to the whole chain. Now the
# numbers.

# %%
import copy
import math

import lesson
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

import minipref
from full.models import flow
from toy.data import DESIRABLE, UNDESIRABLE

QUICK = lesson.QUICK
N_POINTS = 48 if QUICK else 128  # clean points x0, one x_t each
N_DRAWS = 2000 if QUICK else 20000  # actions x_{t-1} drawn from the posterior per point
TIMESTEPS = (10, 100, 500)
generator = torch.Generator().manual_seed(1)

# %% [markdown]
# ## The toy's schedule, its reference model, and a policy
#
# `lesson.pretrained_toy()` pretrains the toy's epsilon-MLP exactly as `python -m toy` does (toy/train.py). The
# policy is a copy with every weight nudged by Gaussian noise: any two models would do, the identity holds for each
# `x0`, `t`, `eps`.

# %%
reference, scheduler, pretrain_losses = lesson.pretrained_toy()
policy = copy.deepcopy(reference)
with torch.no_grad():
    for parameter in policy.parameters():
        parameter.add_(0.03 * torch.randn(parameter.shape, generator=generator))

# The schedule in float64, from the scheduler's betas (= the b_t of the text; diffusers keeps alphas_cumprod in float32, whose round-off
# would hide the exact identities below behind ~1e-7 noise).
betas = scheduler.betas.double()
alphas = 1 - betas
abar = torch.cumprod(alphas, dim=0)
abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])  # abar_{t-1}, with abar_{-1} = 1
beta_tilde = (1 - abar_prev) / (1 - abar) * betas  # b~_t, the posterior variance = diffusers' "fixed_small" sigma_t^2
k = betas**2 / (beta_tilde * alphas * (1 - abar))  # k_t (inf at t = 0, where sigma_0 = 0: the last step is exact)
D = 2  # the toy's dimension count
print(f"T = {scheduler.config.num_train_timesteps}, abar_T = {abar[-1]:.1e}, pretraining loss {np.mean(pretrain_losses[-50:]):.4f}")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (diffusers' add_noise, in float64)."""
    return abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps


def model_eps(model, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """eps_model(x_t, t) in float64 (the MLP runs in float32; everything after it in float64)."""
    with torch.no_grad():
        return model(x_t.float(), torch.full((len(x_t),), t)).double()


def model_mean(eps_pred: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """mu_theta = (x_t - b_t / sqrt(1 - abar_t) eps_pred) / sqrt(alpha_t)."""
    return (x_t - betas[t] / (1 - abar[t]).sqrt() * eps_pred) / alphas[t].sqrt()


# %% [markdown]
# ## The two chains on the toy
#
# The **forward** chain adds noise, $x_t = \sqrt{\alpha_t}\, x_{t-1} + \sqrt{b_t}\, z$, until $x_T$ is a
# standard Gaussian whatever $x_0$ was. The **reverse** chain is the policy: start from $x_T \sim \mathcal N(0, I)$
# and take the Gaussian action $p_\theta(x_{t-1} \mid x_t)$ a thousand times (`DDPMScheduler.step`). Below, a few
# paths of each for the pretrained model, and where 512 reverse chains end: on the pretraining Gaussian
# $\mathcal N((0.5, 0.8), 0.04 I)$ (toy/data.py), which is what the reference has learned. Each panel shows the
# $y$ coordinate against $t$, over the band that the forward process gives the noised data,
# $y_t \sim \mathcal N(\sqrt{\bar\alpha_t}\, \mu_y, \bar\alpha_t \sigma_y^2 + 1 - \bar\alpha_t)$.

# %%
T = scheduler.config.num_train_timesteps
N_PATHS, N_ENDS = 6, 512


def forward_chain(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_0, x_1, ..., x_T under q: (T + 1, N, 2)."""
    path = [x0]
    for t in range(T):
        path.append(alphas[t].sqrt() * path[-1] + betas[t].sqrt() * torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
    return torch.stack(path)


def reverse_chain(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """x_T, ..., x_0 sampled with DDPMScheduler.step from the model: (T + 1, n, 2)."""
    x = torch.randn(n, 2, generator=generator)
    path = [x]
    for t in range(T - 1, -1, -1):
        with torch.no_grad():
            x = scheduler.step(model(x, torch.full((n,), t)), t, x, generator=generator).prev_sample
        path.append(x)
    return torch.stack(path)


chain_generator = torch.Generator().manual_seed(2)  # its own draws: the checks below keep theirs
forward = forward_chain(DESIRABLE.sample(N_PATHS, chain_generator).double(), chain_generator)
reverse = reverse_chain(reference, N_ENDS, chain_generator)
ends = reverse[-1]
print(f"forward: {N_PATHS} paths end at |x_T| up to {forward[-1].norm(dim=1).max():.2f}; reverse: {N_ENDS} chains end at mean "
      f"({ends[:, 0].mean():.3f}, {ends[:, 1].mean():.3f}), std ({ends[:, 0].std():.3f}, {ends[:, 1].std():.3f})")
lesson.check_range("after T forward steps nothing of x_0 is left: abar_T < 1e-4", abar[-1].item(), high=1e-4)
lesson.check("the reverse chains of the pretrained model end on the pretraining Gaussian (mean within 0.05, std within 0.05 of 0.2)",
             bool(((ends.mean(0) - torch.tensor([0.5, 0.8])).abs() < 0.05).all() and ((ends.std(0) - 0.2).abs() < 0.05).all()),
             f"mean ({ends[:, 0].mean():.3f}, {ends[:, 1].mean():.3f}), std ({ends[:, 0].std():.3f}, {ends[:, 1].std():.3f})")

def noised_y(mean_y: float, var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of y_t under q when y_0 ~ N(mean_y, var): sqrt(abar_t) mean_y, sqrt(abar_t var + 1 - abar_t)."""
    ab = torch.cat([torch.ones(1, dtype=torch.float64), abar])  # abar at t = 0..T, with abar_0 = 1 (clean data)
    return ab.sqrt() * mean_y, (ab * var + 1 - ab).sqrt()


# The reverse chains visit the same marginals q(x_t) as the forward process applied to the pretraining data: check
# the 512 chains' y at a few steps against them (reverse[i] is x_{T - i}).
pre_mean, pre_std = noised_y(0.8, 0.04)
marginal_gaps = {t: (abs(reverse[T - t][:, 1].mean().item() - pre_mean[t].item()),
                     abs(reverse[T - t][:, 1].std().item() - pre_std[t].item())) for t in (900, 500, 100)}
lesson.check("... and on the way they follow q(y_t) of the noised pretraining data (mean and std within 0.1 at t = 900, 500, 100)",
             all(max(gap) < 0.1 for gap in marginal_gaps.values()),
             ", ".join(f"t {t}: {a:.3f} / {b:.3f}" for t, (a, b) in marginal_gaps.items()))

fig, axes = plt.subplots(1, 3, figsize=(14, 4.0), layout="constrained")
steps = np.arange(T + 1)
for ax, paths, (band_mean, band_std), title in (
        (axes[0], forward[:, :, 1], noised_y(0.8, 0.01), "forward: y_t of 6 desirable points"),
        (axes[1], reverse.flip(0)[:, :N_PATHS, 1], (pre_mean, pre_std), "reverse (the policy): y_t of 6 chains")):
    ax.fill_between(steps, band_mean - 2 * band_std, band_mean + 2 * band_std, color="0.9", label="q(y_t): mean +- 2 std")
    ax.plot(steps, paths.numpy(), lw=0.7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("t")
axes[1].invert_xaxis()  # the reverse chain runs from t = T down to 0: time flows left to right in both panels
axes[0].set_ylabel("y")
axes[0].legend(fontsize=7, loc="lower left")
axes[2].scatter(ends[:, 0], ends[:, 1], s=3, color="tab:red", label=f"x_0 of {N_ENDS} reverse chains")
axes[2].add_patch(plt.Circle((0.5, 0.8), 0.4, fill=False, ls="--", color="k", label="pretraining Gaussian, 2 std"))
axes[2].set_aspect("equal")
axes[2].set_title("where the reverse chains end", fontsize=10)
axes[2].set_xlabel("x")
axes[2].set_ylabel("y")
axes[2].legend(fontsize=7, loc="lower right")
fig.suptitle("The toy's chains: the forward process forgets x_0; the pretrained policy's reverse chain rebuilds the data",
             fontsize=10)
lesson.save_figure(fig, "01_chains")

# %% [markdown]
# ## Check 1: this Gaussian is what diffusers samples
#
# `DDPMScheduler.step` (with `clip_sample=False`, as the toy sets it) computes the step through the predicted `x0`
# and adds `sqrt(variance) * noise`; with the same generator we can reproduce its draw from `mu_theta` and
# `b~_t` above.

# %%
x0 = DESIRABLE.sample(N_POINTS, generator).double()
eps = torch.randn(N_POINTS, 2, generator=generator, dtype=torch.float64)
noise_gap = max((scheduler.add_noise(x0.float(), eps.float(), torch.full((N_POINTS,), t)).double() - add_noise(x0, eps, t))
                .abs().max().item() for t in TIMESTEPS)
lesson.check("our float64 x_t == diffusers' add_noise", noise_gap < 1e-5, f"largest gap {noise_gap:.1e} (float32 round-off)")
step_gaps = []
for t in TIMESTEPS:
    x_t = add_noise(x0, eps, t)
    eps_theta = model_eps(policy, x_t, t).float()
    diffusers_step = scheduler.step(eps_theta, t, x_t.float(), generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))  # the same draw diffusers made
    ours = model_mean(eps_theta.double(), x_t, t) + beta_tilde[t].sqrt() * z.double()
    step_gaps.append((diffusers_step.double() - ours).abs().max().item())
lesson.check("DDPMScheduler.step samples N(mu_theta, b~_t I)", max(step_gaps) < 1e-4,
             f"largest gap {max(step_gaps):.1e} over t = {TIMESTEPS} (float32 round-off)")

# %% [markdown]
# ## Check 2: the posterior mean is the model mean with the true noise
#
# Ho et al.'s Eq. (7) writes $\tilde\mu$ from $x_0$ and $x_t$; substituting $x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,
# \epsilon) / \sqrt{\bar\alpha_t}$ gives `model_mean` with $\epsilon$ in place of $\epsilon_\theta$. That is
# the only reason a denoising error appears in a log-probability.

# %%
def posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    return (abar_prev[t].sqrt() * betas[t] / (1 - abar[t])) * x0 + (alphas[t].sqrt() * (1 - abar_prev[t]) / (1 - abar[t])) * x_t


gaps = []
for t in TIMESTEPS:
    x_t = add_noise(x0, eps, t)
    gaps.append((posterior_mean(x0, x_t, t) - model_mean(eps, x_t, t)).abs().max().item())
lesson.check("mu_tilde(x0, x_t) == mu(eps = true noise)", max(gaps) < 1e-12, f"largest gap {max(gaps):.1e} (float64)")

# %% [markdown]
# ## Check 3: the average log-ratio is `implicit_reward(err_theta, err_ref, beta = k_t * D)`
#
# For each $x_0$ we draw `N_DRAWS` actions from the posterior, score each under both models with
# `minipref.gaussian_step_log_prob` (the same function SPO uses; it returns the **mean** over elements, so the
# log-density is $D$ times it), and average. The Monte-Carlo error of each average is its standard error; the
# claim holds if every point's gap is within 5 of them. Then the same with **antithetic** draws ($z$ and $-z$):
# the cross term is odd in $z$, so it cancels exactly and the agreement is to float64 round-off.

# %%
rows, per_t = [], {}
for t in TIMESTEPS:
    x_t = add_noise(x0, eps, t)
    eps_theta, eps_ref = model_eps(policy, x_t, t), model_eps(reference, x_t, t)
    mu_theta, mu_ref, mu_tilde = model_mean(eps_theta, x_t, t), model_mean(eps_ref, x_t, t), posterior_mean(x0, x_t, t)
    sigma = beta_tilde[t].sqrt().item()

    def log_ratio(x_prev: torch.Tensor) -> torch.Tensor:
        """log p_theta(x_prev | x_t) - log p_ref(x_prev | x_t) for actions (M, N, 2) -> (M, N)."""
        m = x_prev.shape[0]
        flat = x_prev.reshape(-1, 2)  # (M, N, 2) -> (M*N, 2)
        log_p = lambda mu: D * minipref.gaussian_step_log_prob(flat, mu.expand(m, -1, -1).reshape(-1, 2), sigma)  # noqa: E731
        return (log_p(mu_theta) - log_p(mu_ref)).reshape(m, -1)

    z = torch.randn(N_DRAWS, N_POINTS, 2, generator=generator, dtype=torch.float64)
    draws = log_ratio(mu_tilde + sigma * z)  # (M, N)
    mc_mean, mc_se = draws.mean(0), draws.std(0) / N_DRAWS**0.5
    antithetic = 0.5 * (log_ratio(mu_tilde + sigma * z[:4]) + log_ratio(mu_tilde - sigma * z[:4])).mean(0)

    err_theta, err_ref = minipref.per_sample_mse(eps_theta, eps), minipref.per_sample_mse(eps_ref, eps)
    predicted = minipref.implicit_reward(err_theta, err_ref, beta=(k[t] * D).item())
    z_scores = ((mc_mean - predicted) / mc_se).abs()
    per_t[t] = (predicted, mc_mean, mc_se)
    rows.append({"t": t, "k_t": k[t].item(), "max_z": z_scores.max().item(),
                 "antithetic_gap": (antithetic - predicted).abs().max().item(),
                 "mean_predicted": predicted.mean().item(), "mean_monte_carlo": mc_mean.mean().item(),
                 "single_draw_std": draws.std(0).mean().item(), "mean_abs_reward": predicted.abs().mean().item()})

print(f"{'t':>4} {'k_t':>8} {'mean implicit_reward':>21} {'mean MC log-ratio':>18} {'max |gap|/SE':>13} {'antithetic gap':>15}")
for r in rows:
    print(f"{r['t']:>4} {r['k_t']:>8.4f} {r['mean_predicted']:>21.3e} {r['mean_monte_carlo']:>18.3e} {r['max_z']:>13.2f} {r['antithetic_gap']:>15.1e}")
lesson.check("Monte-Carlo log-ratio == implicit_reward(beta = k_t D) for every x0 and t",
             all(r["max_z"] < 5 for r in rows), f"largest |gap| = {max(r['max_z'] for r in rows):.2f} standard errors")
lesson.check("antithetic draws: equal to float64 round-off", all(r["antithetic_gap"] < 1e-9 for r in rows),
             f"largest gap {max(r['antithetic_gap'] for r in rows):.1e}")
print("One action alone is a poor estimate: its log-ratio has a standard deviation "
      f"{rows[0]['single_draw_std'] / rows[0]['mean_abs_reward']:.0f}x the reward's typical size at t = {TIMESTEPS[0]}. "
      "The reward is an expectation over actions, which the squared errors give in closed form.")

# %%
# Constrained layout keeps each panel's tick labels clear of its neighbour's; the rewards at large t are ~1e-3, so
# the axes use scientific notation and at most four ticks (longer labels collided).
fig, axes = plt.subplots(1, len(TIMESTEPS), figsize=(4.4 * len(TIMESTEPS), 4.0), layout="constrained")
for ax, t in zip(axes, TIMESTEPS):
    predicted, mc_mean, mc_se = (v.numpy() for v in per_t[t])
    ax.errorbar(predicted, mc_mean, yerr=2 * mc_se, fmt=".", ms=4, alpha=0.7, label="Monte Carlo (+-2 SE)")
    lo, hi = min(predicted.min(), mc_mean.min()), max(predicted.max(), mc_mean.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_title(f"t = {t}, k_t = {k[t]:.4f}", fontsize=10)
    ax.set_xlabel("implicit_reward(beta = k_t D)")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(plt.MaxNLocator(4))
    ax.ticklabel_format(style="sci", scilimits=(-2, 2), useMathText=True)
axes[0].set_ylabel("mean over actions of log p_theta - log p_ref")
axes[0].legend(fontsize=8)
fig.suptitle("The reverse-step log-ratio, averaged over posterior draws, is a difference of denoising errors")
lesson.save_figure(fig, "01_log_ratio_vs_implicit_reward")

# %% [markdown]
# ## From one step to Diffusion-DPO's objective
#
# LLM-DPO (prerequisites, section 3) compares the log-probabilities of two whole responses. For a diffusion model
# the "response" is the whole chain $x_{0:T}$, and DPO with KL weight $\beta_{KL}$ would read
#
# $$\mathcal L = -\log\sigma\Big(\beta_{KL}\Big[\log\frac{p_\theta(x^w_{0:T})}{p_{\mathrm{ref}}(x^w_{0:T})}
# - \log\frac{p_\theta(x^l_{0:T})}{p_{\mathrm{ref}}(x^l_{0:T})}\Big]\Big).$$
#
# Wallace et al. (*Diffusion Model Alignment Using Direct Preference Optimization*, arXiv:2311.12908, Sec. 4) get
# from there to a loss on single noised images in four steps:
#
# 1. **The chain is unknown; use the forward process.** Only $x_0$ is in the dataset. They average over chains
#    $x_{1:T} \sim q(x_{1:T} \mid x_0)$ (in place of the policy's own reverse chain, an approximation). The prior
#    $p(x_T) = \mathcal N(0, I)$ is shared and cancels, so the chain's log-ratio is the **sum over steps** of the
#    reverse-step log-ratios above; averaged over $q$, each step's term is its closed form,
#    `implicit_reward(beta = k_t D)`:
#
#    $$\mathbb E_q\Big[\log\frac{p_\theta(x_{0:T})}{p_{\mathrm{ref}}(x_{0:T})}\Big] = \sum_t \mathbb E_{q(x_t \mid x_0)}\Big[-\frac{k_t D}{2}(\mathrm{err}_\theta - \mathrm{err}_{\mathrm{ref}})\Big].$$
#
# 2. **The factor $T$.** A sum over $T$ steps is $T$ times the mean over a uniform $t$:
#    $\sum_t f(t) = T\, \mathbb E_{t \sim U}[f(t)]$. One random $t$ per image (as in training) is an unbiased,
#    noisier estimate.
# 3. **Jensen's bound.** $-\log\sigma$ is convex, so $-\log\sigma(\mathbb E[m]) \le \mathbb E[-\log\sigma(m)]$:
#    moving the expectation over $(t, x_t)$ *outside* gives an upper bound that can be minimised one $(t, x_t)$ at
#    a time:
#
#    $$\mathcal L \le \mathbb E_{t, x^w_t, x^l_t}\Big[-\log\sigma\Big(-\beta_{KL}\, T\, \frac{k_t D}{2}\big[(\mathrm{err}^w_\theta - \mathrm{err}^w_{\mathrm{ref}}) - (\mathrm{err}^l_\theta - \mathrm{err}^l_{\mathrm{ref}})\big]\Big)\Big].$$
#
# 4. **The timestep weight folded into $\beta$.** Holding $k_t$ constant (Ho et al.'s "simple" weighting) turns
#    $\beta_{KL} T k_t D$ into one number, the $\beta$ of $r = -(\beta/2)(\mathrm{err}_\theta -
#    \mathrm{err}_{\mathrm{ref}})$. That is Diffusion-DPO (lesson 2), and $\beta = \beta_{KL} T k_t D$ says what
#    kind of number $\beta$ is.
#
# Steps 1 to 3 can be checked numerically. We draw whole forward chains (as `forward_chain` above, all $T$ steps) from
# `N_X0` desirable and as many undesirable points, score every reverse step $t = 1, \dots, T-1$ of each chain under
# both models (the last step, $t = 0$, has $\sigma_0 = 0$ in diffusers: it is the decoder term $L_0$ that Ho et
# al. treat apart), and compare. The policy here is a copy with larger weight noise (0.1) than above, so that it is
# clearly worse than the reference and the chain's log-ratio is clearly negative.

# %%
N_X0, N_CHAINS = 8, (32 if QUICK else 128)  # chains per point


def perturbed(model, noise_std: float, generator: torch.Generator):
    """A copy of ``model`` with N(0, noise_std^2) added to every weight."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copy_.parameters():
            parameter.add_(noise_std * torch.randn(parameter.shape, generator=generator))
    return copy_


def chain_log_ratios(policy_model, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward chains from ``x0`` (N, 2), scored step by step under ``policy_model`` and the reference.

    Returns the sampled log-ratio of each whole chain (sum over t = 1..T-1 of log p_theta - log p_ref at the drawn
    x_{t-1}), shape (N,), and implicit_reward(beta = k_t D) at every step, shape (T, N) (row 0 unused).
    """
    n = len(x0)
    x_prev = alphas[0].sqrt() * x0 + betas[0].sqrt() * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    sampled = torch.zeros(n, dtype=torch.float64)
    reward = torch.zeros(T, n, dtype=torch.float64)
    for t in range(1, T):
        x_t = alphas[t].sqrt() * x_prev + betas[t].sqrt() * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        eps_t = (x_t - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()  # the noise that takes x0 to x_t
        eps_theta, eps_ref = model_eps(policy_model, x_t, t), model_eps(reference, x_t, t)
        mu_theta, mu_ref = model_mean(eps_theta, x_t, t), model_mean(eps_ref, x_t, t)
        # log N(x_prev; mu_theta, sigma_t^2) - log N(x_prev; mu_ref, sigma_t^2): the normalisers cancel
        sampled += -(((x_prev - mu_theta) ** 2).sum(1) - ((x_prev - mu_ref) ** 2).sum(1)) / (2 * beta_tilde[t])
        reward[t] = minipref.implicit_reward(minipref.per_sample_mse(eps_theta, eps_t),
                                             minipref.per_sample_mse(eps_ref, eps_t), beta=(k[t] * D).item())
        x_prev = x_t
    return sampled, reward


far_policy = perturbed(reference, 0.1, generator)
x0_chain = torch.cat([DESIRABLE.sample(N_X0, generator), UNDESIRABLE.sample(N_X0, generator)]).double()
x0_chain = x0_chain.repeat_interleave(N_CHAINS, 0)  # (2 N_X0 N_CHAINS, 2): the first half desirable
n_chains = len(x0_chain)
sampled_log_ratio, reward_per_step = chain_log_ratios(far_policy, x0_chain, generator)
closed_form = reward_per_step.sum(0)  # step 1: sum_t of the closed forms along the same chains
one_t = torch.randint(1, T, (n_chains,), generator=generator)  # step 2: one uniform t per chain, times (T - 1)
one_t_estimate = (T - 1) * reward_per_step[one_t, torch.arange(n_chains)]


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std() / len(values) ** 0.5).item()


(chain_mean, chain_se), (closed_mean, _) = mean_se(sampled_log_ratio), mean_se(closed_form)
gap_mean, gap_se = mean_se(sampled_log_ratio - closed_form)
one_t_mean, one_t_se = mean_se(one_t_estimate)
print(f"{n_chains} chains of {T - 1} steps: sampled log-ratio {chain_mean:.2f} +- {chain_se:.2f}, "
      f"sum of closed forms {closed_mean:.2f}, paired gap {gap_mean:.3f} +- {gap_se:.3f}; "
      f"(T - 1) x one random step {one_t_mean:.2f} +- {one_t_se:.2f}")
lesson.check_range("the chain's log-ratio is clearly negative (a worse policy)", chain_mean, high=-5 * chain_se)
lesson.check_close("step 1: E_q[chain log-ratio] == sum over t of implicit_reward(beta = k_t D), within 4 SE",
                   gap_mean, 0.0, abs_tol=4 * gap_se)
lesson.check_close("step 2: (T - 1) x implicit_reward at one uniform t estimates the same sum, within 4 SE",
                   one_t_mean, closed_mean, abs_tol=4 * one_t_se)
lesson.check_range("... at the price of a much larger standard error than the full sum's",
                   one_t_se / (closed_form.std() / n_chains**0.5).item(), 3.0)

# Step 3, per (desirable, undesirable) pair of points: the chain loss against its Jensen bound. The margin of one
# (t, x_t) draw is (T - 1) * beta_KL * (r_w - r_l); beta_KL is chosen so that the chain margins are of order 1.
BETA_KL = 0.05


def chain_loss_and_bound(reward: torch.Tensor, beta_kl: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair i = (desirable i, undesirable i): -log sigmoid(E[m]) and its Jensen bound E[-log sigmoid(m)]."""
    r_w, r_l = reward[1:, : n_chains // 2], reward[1:, n_chains // 2:]  # (T - 1, N_X0 * N_CHAINS) each
    step_margin = ((T - 1) * beta_kl * (r_w - r_l)).reshape(T - 1, N_X0, N_CHAINS)
    return (torch.nn.functional.softplus(-step_margin.mean(dim=(0, 2))),
            torch.nn.functional.softplus(-step_margin).mean(dim=(0, 2)))


chain_loss, jensen_bound = chain_loss_and_bound(reward_per_step, BETA_KL)
print("per pair, chain loss vs its bound: " + ", ".join(f"{a:.3f} <= {b:.3f}" for a, b in zip(chain_loss, jensen_bound)))
lesson.check("step 3: Jensen, the per-(t, x_t) loss bounds the chain loss for every pair",
             bool((jensen_bound >= chain_loss).all()), f"smallest gap {(jensen_bound - chain_loss).min():.3f}")
lesson.check_range("... and the bound is loose here: on average it exceeds the chain loss by more than 0.05",
                   (jensen_bound - chain_loss).mean().item(), 0.05)

# %% [markdown]
# ## The timestep weight $k_t$, and what $\beta = 5000$ means
#
# With $\sigma_t^2 = \tilde b_t$, $k_t = b_t / (\alpha_t (1 - \bar\alpha_{t-1}))$: huge at the last steps (the
# model mean must be right to within a tiny posterior variance) and small elsewhere. Diffusion-DPO draws $t$
# uniformly and uses one constant, so $\beta$ plays the role of $k_t D$ for some "typical" $t$. Which one? Below:
# $k_t D$ for the toy ($D = 2$) and for Stable Diffusion 1.5 at 512 px ($D = 4 \times 64 \times 64$ latent
# elements, its `scaled_linear` schedule; for the real model,
# `DDPMScheduler.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="scheduler")` gives the
# same betas).

# %%
def timestep_weight(noise_scheduler: DDPMScheduler) -> torch.Tensor:
    b = noise_scheduler.betas.double()
    a = 1 - b
    ab = torch.cumprod(a, dim=0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return b / (a * (1 - ab_prev))  # k_t with sigma_t^2 = b~_t; entry 0 is inf


sd15_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
D_SD15 = 4 * 64 * 64
ts = np.arange(1, 1000)
toy_kD = (timestep_weight(scheduler)[1:] * D).numpy()
sd_kD = (timestep_weight(sd15_scheduler)[1:] * D_SD15).numpy()
lesson.check("k_t from the schedule equals k_t from its definition (toy)",
             np.allclose(toy_kD, (k[1:] * D).numpy(), rtol=1e-12), "b_t^2 / (sigma_t^2 alpha_t (1 - abar_t))")
t_at_5000 = int(ts[np.argmin(np.abs(sd_kD - 5000))])
print(f"{'':22} {'t=1':>9} {'t=10':>9} {'t=100':>9} {'t=500':>9} {'t=999':>9} {'median':>9} {'T x mean':>10}")
for name, kd in (("toy, D = 2", toy_kD), ("SD1.5 512px, D = 16384", sd_kD)):
    cells = " ".join(f"{kd[t - 1]:>9.4g}" for t in (1, 10, 100, 500, 999))
    print(f"{name:22} {cells} {np.median(kd):>9.4g} {1000 * kd.mean():>10.4g}")
print(f"SD1.5: beta = 5000 equals k_t D at t = {t_at_5000}; the median over t is {np.median(sd_kD):.0f}.")

fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (name, kd), color in zip(((f"SD1.5 at 512 px (D = {D_SD15})", sd_kD), ("toy (D = 2)", toy_kD)), ("tab:blue", "tab:orange")):
    ax.loglog(ts, kd, color=color, label=f"{name}: one step, k_t D")
    ax.loglog(ts, 1000 * kd, color=color, ls="--", lw=1, label=f"{name}: whole chain, T k_t D")
ax.axhline(5000, color="tab:red", lw=1, label="beta = 5000 (Diffusion-DPO on SD, our convention)")
ax.axhline(500, color="tab:green", lw=1, label="beta = 500 (the toy's default)")
ax.plot([t_at_5000], [5000], "o", color="tab:red")
ax.set_xlabel("training timestep t")
ax.set_ylabel("the beta that makes r an exact log-ratio")
ax.set_title("The timestep weight that one constant beta stands in for", fontsize=10)
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: inside, it covered the toy's line
lesson.save_figure(fig, "01_timestep_weight")

# %%
kl_weight = 5000 / (1000 * sd_kD)  # beta / (T k_t D): the KL weight that beta = 5000 implies at each t
toy_chain = 1000 * toy_kD
lesson.check_close("SD1.5: k_t D at t = 1 is about 16,500", float(sd_kD[0]), 16500, rel_tol=0.02)
lesson.check_close("SD1.5: k_t D at t = 500 is about 110", float(sd_kD[499]), 110, rel_tol=0.02)
lesson.check("SD1.5: beta = 5000 equals k_t D at t = 3", t_at_5000 == 3, f"t = {t_at_5000}")
lesson.check_close("SD1.5: the median of k_t D over t is about 133", float(np.median(sd_kD)), 133, rel_tol=0.02)
lesson.check_range("SD1.5: 5000 is below T k_t D at every t", float((1000 * sd_kD).min()), 5000)
lesson.check("SD1.5: the implied KL weight runs from ~3e-4 to ~0.05",
             2.5e-4 < kl_weight.min() < 3.5e-4 and 0.04 < kl_weight.max() < 0.06,
             f"{kl_weight.min():.2e} to {kl_weight.max():.3f}")
lesson.check("toy: T k_t D runs from ~20 to ~2400, and 500 lies inside",
             15 < toy_chain.min() < 25 and 2300 < toy_chain.max() < 2500 and toy_chain.min() < 500 < toy_chain.max(),
             f"{toy_chain.min():.1f} to {toy_chain.max():.0f}")

# %% [markdown]
# **Reading it.** For SD1.5 the $\beta$ that makes $r$ the exact log-ratio of *one* reverse step runs from about
# 16,500 ($t = 1$) down to about 110 ($t \approx 500$). $\beta = 5000$ lies inside that band, at its small-$t$ end
# (it is $k_t D$ at $t \approx 3$), well above the median over $t$ (~133). Summed over the whole chain, the
# log-ratio of two models is $T\,\mathbb E_t[\dots]$ (dashed lines), and Diffusion-DPO's own derivation also
# multiplies by the KL weight of the RLHF objective: against that, 5000 is *below* $T k_t D$ at every $t$, i.e. a
# KL weight $\beta_{KL} = \beta / (T k_t D)$ between ~3e-4 and ~0.05. The toy's $\beta = 500$ sits inside its chain
# band ($T k_t D$ from ~20 to ~2400; toy/methods.py explains the choice). So $\beta$ is not derived from the
# schedule: the derivation says *what kind* of number it is (a timestep weight times an element count, times a KL
# weight), and the value is tuned. Diffusion-DPO used 5000; Diff-contrast (*Diffusion Preference Alignment via
# Relative Text-Image Contrast*, App. C) found 2000 best of {2000, 5000, 7000, 10000}; docs/toy.md sweeps 100 to
# 5000.
#
# **The same $\beta$ at another resolution: a convention, not a property.** Because $\mathrm{err}$ is a *mean*
# over the $D$ elements, the same $\beta$ gives rewards of the same size at any resolution, and that is how
# $\beta$ is used in practice: 5000 for SD1.5 at 512 px and for SDXL at 1024 px (the diffusers SDXL script, our
# `sdxl-dpo` preset). It is a usage convention. By $\beta = \beta_{KL} T k_t D$ the objective itself changes:
# SDXL uses the same schedule (so the same $k_t$) on $4 \times 128 \times 128$ latent elements, 4 times SD1.5's,
# so the same $\beta$ there is a **4 times smaller KL weight**, a looser leash on the whole chain. Keeping SD1.5's
# KL weight at 1024 px would take $\beta = 20000$. Checked below.
#
# **Other implementations' $\beta$.** The diffusers SD1.5 DPO script writes `beta_dpo * (ref_diff - model_diff)`
# without the 1/2, so its 2500 is our 5000 (its SDXL script keeps the 1/2); the Diffusion-KTO code has no 1/2
# either, so the paper's 5000 is our 10000 (docs/conventions.md §2, "The same run in every implementation's beta", has
# the table, with the source line of each).

# %%
sdxl_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
D_SDXL = 4 * 128 * 128
sdxl_kD = (timestep_weight(sdxl_scheduler)[1:] * D_SDXL).numpy()
kl_ratio = (5000 / (1000 * sd_kD)) / (5000 / (1000 * sdxl_kD))  # beta_KL at SD1.5 / beta_KL at SDXL, same beta
lesson.check("the same beta = 5000 is a 4x smaller KL weight at SDXL's 4 x 128 x 128 latents than at SD1.5's, at every t",
             bool(np.allclose(kl_ratio, 4.0, rtol=1e-12)), f"ratio {kl_ratio.min():.6f} to {kl_ratio.max():.6f}")

# %% [markdown]
# ## On a rectified-flow model (SD3, SD3.5, FLUX.1)
#
# SD3 and FLUX.1 are trained by rectified flow (docs/flow_matching.md has the derivation and the sources): the noise
# level is $\sigma \in (0, 1]$, the noised latent $x_\sigma = (1 - \sigma) x_0 + \sigma \epsilon$, and the network
# predicts the velocity $v = \epsilon - x_0$. Which terms of the bound above change? At a fixed $x_\sigma$ a velocity
# and a noise are two names for one prediction: from the noising line $\epsilon = x_\sigma + (1 - \sigma) v$, so a
# velocity $v_\theta$ implies the noise $\epsilon_\theta = x_\sigma + (1 - \sigma) v_\theta$, off by
# $\epsilon_\theta - \epsilon = (1 - \sigma)(v_\theta - v)$. Squared and averaged:
#
# $$\mathrm{err}_\epsilon = (1 - \sigma)^2\, \mathrm{err}_v, \qquad
# r = -\frac{\beta}{2}(\mathrm{err}_\epsilon - \mathrm{err}_{\epsilon,\mathrm{ref}})
#   = -\frac{\beta (1 - \sigma)^2}{2}(\mathrm{err}_v - \mathrm{err}_{v,\mathrm{ref}}).$$
#
# So the error (a velocity error), $x_\sigma$ and the draw of $\sigma$ change; the reward, the sigmoid, the shared
# $(\sigma, \epsilon)$ of a pair and the reference do not. The reverse-step Gaussians the reward is a log-ratio of
# are those of the stochastic sampler with the flow's marginals (Flow-GRPO's SDE form, *Flow-GRPO: Training Flow
# Matching Models via Online RL*, arXiv:2505.05470); with $k_t$ held constant as above, $\beta$ keeps its SD scale
# on the noise-equivalent error, and on the velocity error the weight is $\beta_\sigma = \beta (1 - \sigma)^2$. It
# is 0 at $\sigma = 1$ (at pure noise every velocity implies the right noise) and $\beta$ near $\sigma = 0$.
# `full.train` hands the core exactly $\epsilon_\theta$, so every objective runs unchanged (`full/models/flow.py`).
# First, on random tensors in float64: the identity, the wrong weight $(1 - \sigma)$, and DPO at the reference.

# %%
g_flow = torch.Generator().manual_seed(0)
B_FLOW, LATENT = 256, (16, 8, 8)  # SD3 / FLUX latents have 16 channels
x0_f = torch.randn(B_FLOW, *LATENT, generator=g_flow, dtype=torch.float64)
eps_f = torch.randn(B_FLOW, *LATENT, generator=g_flow, dtype=torch.float64)
sigma_f = torch.rand(B_FLOW, generator=g_flow, dtype=torch.float64)
x_sigma = flow.add_noise(x0_f, eps_f, sigma_f)  # (1 - sigma) x0 + sigma eps
v_true = flow.velocity_target(x0_f, eps_f)  # eps - x0


def a_velocity_model(noise_scale: float) -> torch.Tensor:
    """A model's velocity prediction: the true velocity plus an error of the given size."""
    return v_true + noise_scale * torch.randn(B_FLOW, *LATENT, generator=g_flow, dtype=torch.float64)


v_theta, v_ref = a_velocity_model(0.3), a_velocity_model(0.3)
err_v, ref_err_v = flow.velocity_error(v_theta, x0_f, eps_f), flow.velocity_error(v_ref, x0_f, eps_f)
err_eps = minipref.per_sample_mse(flow.noise_from_velocity(x_sigma, v_theta, sigma_f), eps_f)  # the implied noise
ref_err_eps = minipref.per_sample_mse(flow.noise_from_velocity(x_sigma, v_ref, sigma_f), eps_f)
identity_gap = ((err_eps - (1 - sigma_f) ** 2 * err_v).abs() / err_eps).max().item()
wrong_gap = ((err_eps - (1 - sigma_f) * err_v).abs() / err_eps).max().item()
lesson.check_range("err_eps = (1 - sigma)^2 err_v for the noise a velocity implies (max relative gap, float64)",
                   identity_gap, high=1e-12)
lesson.check_range("... and the weight (1 - sigma) is not it", wrong_gap, low=0.5)
reward_eps = minipref.implicit_reward(err_eps, ref_err_eps, 5000.0)  # -(beta/2)(err_eps - ref_err_eps)
beta_sigma = 5000.0 * (1 - sigma_f) ** 2  # beta (1 - sigma)^2 on the velocity errors, per sample
reward_v = -(beta_sigma / 2) * (err_v - ref_err_v)
reward_gap = ((reward_v - reward_eps).abs() / reward_eps.abs()).max().item()
lesson.check_range("the reward from velocity errors with beta (1 - sigma)^2 is the eps-form reward with beta, sample "
                   "by sample (max relative gap)", reward_gap, high=1e-9)
half = B_FLOW // 2  # the first half as winners, the second as losers
at_reference = minipref.dpo_loss(err_eps[:half], err_eps[half:], err_eps[:half], err_eps[half:], beta=5000.0)
lesson.check_close("DPO at the reference is log 2 with flow errors", at_reference.loss.item(), math.log(2),
                   abs_tol=1e-12)

# %% [markdown]
# **How $\beta$'s scale relates to the SD convention.** minipref keeps the SD convention above: $\beta$ on the
# noise-equivalent error, 5000 for the Diffusion-DPO recipe. Another convention puts a constant $\beta_v$ on the raw
# velocity error (SimpleTuner's Flow-DPO), i.e. $\beta_{SD}(\sigma) = \beta_v / (1 - \sigma)^2$ per step: the
# high-noise steps weighted up, a different objective. A rough match between the two (**a heuristic of ours, not a
# paper's**) gives both the same *average* weight over the trained $\sigma$: $\beta_v = \beta_{SD}\,
# \mathbb E[(1 - \sigma)^2]$, with $\sigma$ drawn as the diffusers training scripts draw it. SD3's script draws
# $u$ logit-normal(0, 1) into a table shifted by 3, so most draws are at high noise; FLUX's draws $u$ uniformly
# from the unshifted table. docs/flow_matching.md §3 measured 0.1126 (SD3) and 0.3336 (FLUX; 1/3 in the continuum)
# with 200,000 draws; here the same draws, fewer in quick mode.

# %%
N_SIGMA = 20_000 if QUICK else 200_000
DOC_SECOND_MOMENT = {"SD3": 0.1126, "FLUX.1": 0.3336}  # docs/flow_matching.md §3
schedules = {  # the schedulers' configs as SD3 and FLUX.1 ship them; training draws from the table as it is
    "SD3": (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), flow.SD3_SCRIPT_SAMPLING),
    "FLUX.1": (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096), flow.FLUX_SCRIPT_SAMPLING)}
flow_scale = {}
for name, (scheduler_f, sampling) in schedules.items():
    _, sigmas_drawn = flow.sample_timesteps(flow.training_schedule(scheduler_f.config), N_SIGMA, sampling,
                                            generator=torch.Generator().manual_seed(0))
    w = (1 - sigmas_drawn.double()) ** 2
    mean, se = w.mean().item(), (w.std() / math.sqrt(N_SIGMA)).item()
    flow_scale[name] = {"second_moment": mean, "se": se, "beta_v_for_5000": 5000 * mean,
                        "median_sigma": sigmas_drawn.median().item()}
    print(f"{name:7} E[(1 - sigma)^2] = {mean:.4f} +- {se:.4f} (median sigma {sigmas_drawn.median():.3f}); "
          f"beta_SD = 5000 ~ beta_v = {5000 * mean:.0f}")
    # the docs' 200,000-draw estimate has its own standard error, about se * sqrt(N_SIGMA / 200,000)
    tolerance = 5 * se * math.sqrt(1 + N_SIGMA / 200_000) + 5e-5  # + the docs' rounding to 4 digits
    lesson.check_close(f"{name}: E[(1 - sigma)^2] under the script's sampling is docs/flow_matching.md's", mean,
                       DOC_SECOND_MOMENT[name], abs_tol=tolerance)
lesson.check_close("FLUX.1: uniform u on the unshifted table gives 1/3, the continuum's E[u^2]",
                   flow_scale["FLUX.1"]["second_moment"], 1 / 3, abs_tol=5 * flow_scale["FLUX.1"]["se"] + 1e-3)
lesson.check("SD3 trains mostly at high noise: its average weight is about 3x smaller than FLUX.1's",
             2.5 < flow_scale["FLUX.1"]["second_moment"] / flow_scale["SD3"]["second_moment"] < 3.5,
             f"ratio {flow_scale['FLUX.1']['second_moment'] / flow_scale['SD3']['second_moment']:.2f}")

# %% [markdown]
# **Reading it.** With the SD convention, SD3's sampling puts most draws where $(1 - \sigma)^2$ is small (median
# $\sigma$ about 0.75), so on average a velocity error counts about 0.11 of its size, and $\beta_{SD} = 5000$ is, on
# average, a constant $\beta_v \approx 560$ on velocity errors; for FLUX.1 $\approx 1670$. These numbers translate
# between the two conventions on average only: per step they weight $\sigma$ differently, and which one trains a
# flow model better is not settled by anything here (docs/flow_matching.md §3, §5).

# %% [markdown]
# ## Takeaways
#
# * One reverse step of DDPM is a Gaussian policy whose variance does not depend on the model, so the log-ratio of
#   two models, averaged over the posterior action, is a difference of denoising errors:
#   `implicit_reward(err_theta, err_ref, beta = k_t D)`.
# * Over the whole chain, under $q(x_{1:T} \mid x_0)$, the log-ratio is the sum of these terms, $T$ times their
#   mean over a uniform $t$; Jensen's inequality turns DPO on chains into an upper bound that is minimised one
#   $(t, x_t)$ at a time; holding $k_t$ constant folds $\beta_{KL} T k_t D$ into Diffusion-DPO's $\beta$.
# * $\beta$ is therefore a KL weight times a timestep weight times an element count; its value is tuned, not
#   derived, and the same $\beta$ at another resolution is another KL weight.
# * On a rectified-flow model (SD3, FLUX.1) only the error changes: the noise a velocity implies is off by
#   $(1 - \sigma)$ times the velocity's error, so $\mathrm{err}_\epsilon = (1 - \sigma)^2 \mathrm{err}_v$ and the
#   SD-scale $\beta$ becomes $\beta (1 - \sigma)^2$ on velocity errors: about 0.11 $\beta$ (SD3's sampling) or
#   $\beta / 3$ (FLUX.1's) on average.
#
# ## Exercises
#
# 1. Predict $k_t D$ at $t = 1$ for SDXL at 1024 px ($4 \times 128 \times 128$ latent elements, the same schedule)
#    before computing it with `timestep_weight`. What $\beta$ would give SDXL the KL weight that $\beta = 5000$
#    gives SD1.5?
# 2. Change the far policy's weight noise from 0.1 to 0.03. Predict how the chain's log-ratio and its standard
#    error change, and whether the "clearly negative" check still holds. (Hint: the reference is a minimum of the
#    denoising loss.)
# 3. Make `BETA_KL` ten times larger and predict what happens to the gap between the chain loss and its Jensen bound.
#
# Next: lesson 2 turns this reward into the Diffusion-DPO loss and trains with it.

# %%
lesson.save_results("01_policy", {
    "quick": QUICK, "draws": N_DRAWS, "points": N_POINTS, "timesteps": rows,
    "diffusers_step_gap": max(step_gaps), "sd15_t_where_kD_is_5000": t_at_5000,
    "chain": {"chains": n_chains, "sampled_mean": chain_mean, "sampled_se": chain_se, "closed_form_mean": closed_mean,
              "paired_gap": gap_mean, "paired_gap_se": gap_se, "one_t_mean": one_t_mean, "one_t_se": one_t_se,
              "jensen_min_gap": (jensen_bound - chain_loss).min().item()},
    "sd15_kD": {"t1": float(sd_kD[0]), "t10": float(sd_kD[9]), "t100": float(sd_kD[99]), "t500": float(sd_kD[499]),
                "median": float(np.median(sd_kD)), "T_times_mean": float(1000 * sd_kD.mean())},
    "sdxl_kl_weight_ratio": float(kl_ratio.mean()),
    "reverse_chain_end": {"mean": ends.mean(0).tolist(), "std": ends.std(0).tolist()},
    "flow": {"identity_gap": identity_gap, "wrong_weight_gap": wrong_gap, "reward_gap": reward_gap,
             "loss_at_reference": at_reference.loss.item(), "draws": N_SIGMA,
             "scale": flow_scale},
})

# %% [markdown]
# ## Solutions
#
# Each solution states the prediction, runs the experiment and checks the prediction with the same `lesson.check`
# as the lesson. They run with `python tutorials/01_policy.py --solutions` (or `MINIPREF_SOLUTIONS=1`; in a
# notebook, set `lesson.SOLUTIONS = True` before running this cell and the ones below).
#
# **1.** SDXL has the same schedule, hence the same $k_t$, and 4 times the elements: $k_1 D \approx 4 \times 16{,}500
# \approx 66{,}000$. $\beta_{KL} = \beta / (T k_t D)$, so the same KL weight needs 4 times the $\beta$: 20,000.
#
# **2.** The reference minimises the expected denoising loss, so a small weight perturbation $\delta$ raises the
# error by $O(\delta^2)$: the chain's log-ratio should shrink roughly quadratically, by about $(0.03/0.1)^2 = 0.09$,
# and not linearly (0.3). Its standard error shrinks less: the per-chain log-ratio also has a part linear in
# $\delta$ (on one chain the perturbed prediction can be off either way; that averages out over chains, not within
# one). So the mean moves closer to 0 in units of its standard error, and the "clearly negative" check has less
# room. The run (same noise direction, lengths 0.03 and 0.1): the mean shrinks to about 0.03 of the 0.1 policy's,
# faster still than quadratic (at 0.1 the perturbation is already past the quadratic regime); the standard error
# to about 0.11-0.12; the check still holds, with a quarter to a third of its margin counted in standard errors
# (quick and full mode).
#
# **3.** The step margins scale with $\beta_{KL}$. Where the margins are small, $\mathrm{softplus}(-m) \approx
# \log 2 - m/2 + m^2/8$ and the gap between $\mathbb E[\mathrm{softplus}(-m)]$ and $\mathrm{softplus}(-\mathbb E[m])$
# is about $\mathrm{Var}(m)/8$: ten times the margins, a hundred times the gap. Where they are large,
# $\mathrm{softplus}(-m) \approx \max(0, -m)$ is piecewise linear and the gap grows like $\beta_{KL}$: ten times.
# So the gap grows by between 10 and 100 times; measured: about 12 times in quick mode, 18 in full mode (at
# `BETA_KL = 0.05` the margins of one $(t, x_t)$ draw are already large, nearer the linear end).

# %%
def solution_1() -> dict:
    predicted = 4 * float(sd_kD[0])
    lesson.check_close("1. SDXL: k_1 D is 4 x SD1.5's", float(sdxl_kD[0]), predicted, rel_tol=1e-12,
                       detail=f"SD1.5 {sd_kD[0]:.0f}")
    beta_same_kl = 5000 * D_SDXL / D_SD15
    lesson.check_close("1. SDXL: beta = 20000 gives the KL weight beta 5000 gives SD1.5",
                       float((beta_same_kl / (1000 * sdxl_kD)).mean() / kl_weight.mean()), 1.0, rel_tol=1e-12)
    return {"sdxl_k1D": float(sdxl_kD[0]), "beta_same_kl": beta_same_kl}


def solution_2() -> dict:
    closer = perturbed(reference, 0.03, torch.Generator().manual_seed(30))
    farther = perturbed(reference, 0.1, torch.Generator().manual_seed(30))  # the same noise direction, 0.1 long
    sampled = {}
    for name, model in (("0.03", closer), ("0.1", farther)):
        sampled[name], _ = chain_log_ratios(model, x0_chain, torch.Generator().manual_seed(31))
    (m03, se03), (m10, se10) = mean_se(sampled["0.03"]), mean_se(sampled["0.1"])
    print(f"2. chain log-ratio: noise 0.1 {m10:.2f} +- {se10:.2f}; noise 0.03 {m03:.3f} +- {se03:.3f}; "
          f"ratio of means {m03 / m10:.3f} (predicted ~0.09), ratio of SEs {se03 / se10:.2f}, "
          f"of |mean| / SE {(m03 / se03) / (m10 / se10):.2f}")
    # log-midpoint of the quadratic (0.09) and linear (0.3) predictions: below it, the quadratic one is closer
    lesson.check_range("2. the mean shrinks ly: closer to (0.03/0.1)^2 = 0.09 than to 0.3",
                       m03 / m10, 0.0, math.sqrt(0.09 * 0.3))
    lesson.check_range("2. the standard error shrinks less than the mean does", (se03 / se10) / (m03 / m10), 1.0)
    lesson.check_range("2. the 'clearly negative' check still holds at noise 0.03", m03, high=-5 * se03)
    return {"mean_0.03": m03, "se_0.03": se03, "mean_0.1": m10, "se_0.1": se10,
            "still_clearly_negative": m03 < -5 * se03}


def solution_3() -> dict:
    gaps = {}
    for beta_kl in (BETA_KL, 10 * BETA_KL):
        loss, bound = chain_loss_and_bound(reward_per_step, beta_kl)
        gaps[beta_kl] = (bound - loss).mean().item()
    ratio = gaps[10 * BETA_KL] / gaps[BETA_KL]
    print(f"3. mean Jensen gap: BETA_KL {BETA_KL}: {gaps[BETA_KL]:.3f}; {10 * BETA_KL}: {gaps[10 * BETA_KL]:.3f} ({ratio:.1f}x)")
    lesson.check_range("3. ten times BETA_KL widens the Jensen gap by between 10x (linear regime) and 100x (quadratic)",
                       ratio, 10.0, 100.0)
    return {"gap": gaps[BETA_KL], "gap_x10": gaps[10 * BETA_KL]}


lesson.run_solutions("01_policy", solution_1, solution_2, solution_3)
