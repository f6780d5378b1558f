"""The toy as a rectified-flow model (``python -m toy --flow``): the same data, network, objectives and metrics as
the diffusion toy; what changes is the forward process, the training target and the sampler (issue 23, item 5).

A rectified-flow model (SD3, SD3.5, FLUX.1) indexes time by ``s`` in ``(0, 1]`` (diffusers' ``sigma``; ``s = 1`` is
pure noise) and is trained to predict a velocity:

    x_s = (1 - s) x0 + s eps,        v = dx_s / ds = eps - x0,        err_v = mean (v_theta - v)^2

and sampled by integrating the ODE ``dx/ds = v_theta(x, s)`` from ``s = 1`` (noise) down to ``s = 0`` with Euler
steps. docs/flow_matching.md derives the rest; in short:

* **The objectives take the noise-equivalent error.** At a fixed ``x_s`` a velocity implies a noise,
  ``eps = x_s + (1 - s) v``, so a velocity off by ``v_theta - v`` implies a noise off by ``(1 - s)(v_theta - v)`` and

      err_eps = (1 - s)^2 err_v

  Every minipref objective gets ``err_eps`` with the diffusion toy's beta (the "SD-equivalent" convention of
  docs/flow_matching.md §3; ``full/models/flow.py``'s ``noise_equivalent_error`` is the same line, and
  tests/test_toy_flow.py checks they agree). The objectives are not changed; DSPO, which takes predictions, gets the
  implied noise ``x_s + (1 - s) v_theta`` (so its ``eps_theta - eps_ref = (1 - s)(v_theta - v_ref)``).
  Pretraining is the plain rectified-flow loss, unweighted ``err_v`` (the FLUX script's ``weighting_scheme none``).
* **Timesteps: uniform**, the FLUX training script's density (``weighting_scheme none``: ``u ~ U(0, 1)``, index
  ``floor(1000 u)`` into the unshifted 1000-entry table of diffusers' ``FlowMatchEulerDiscreteScheduler``), not the
  SD3 script's logit-normal. Why: the data's std (0.1-0.2) is small against unit noise, so its shape is decided at
  small ``s``: the desirable std's share of ``x_s``, ``(1 - s) 0.1``, exceeds the noise's ``s`` only for
  ``s < 0.09``. Uniform ``u`` draws that range 9% of the time, logit-normal(0, 1) 1% (``P(z < logit 0.09 = -2.31)``),
  and SD3's shift 3 less still. The draw is the diffusion toy's own ``randint(0, 1000)``, so the index ``i`` is
  drawn exactly as the DDPM ``t`` is, and ``s = (i + 1) / 1000`` (``i = 999`` is pure noise, as ``t = 999`` nearly is). The network is the diffusion toy's MLP, fed the index ``i``
  (SD3 feeds ``1000 s = i + 1``: one row of the embedding table apart).
* **The sampler** (``EulerSampler``): ``FLOW_SAMPLING_STEPS`` = 100 Euler steps, on diffusers' shifted grid
  ``s = shift u / (1 + (shift - 1) u)`` with ``u`` uniform and ``shift = 1/3`` (SD3 samples with shift 3, which moves
  steps toward noise for large images; the toy needs them near the data), each rounded to the training table.
  Euler is first order: even with the *exact* velocity field of a Gaussian it maps the mean exactly but shrinks the
  std by a factor we can compute (``euler_std_factor``): 0.981 for the desirable Gaussian (std 0.1), 0.986 for the
  pretraining one (0.2), against 0.956 / 0.975 for 100 unshifted steps and 0.83 / 0.90 for 25 (tests check it).
* **SPO is refused**: it scores the log-density of *stochastic* sampler steps (DDIM, eta = 1); the flow toy's Euler
  sampler is deterministic, so there is no step Gaussian to score (Flow-GRPO's SDE form would give one; not built).
  ``python -m toy --flow`` skips it with one line; ``--flow --methods spo`` is an error saying why.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from minipref import per_sample_mse

from .model import EpsMLP
from .schedule import NUM_TRAIN_TIMESTEPS
from .train import pretrain

FLOW_SAMPLING_STEPS = 100  # Euler steps for the evaluation samples (the diffusion toy: 25 DPM-Solver++ steps)
SAMPLING_SHIFT = 1.0 / 3.0  # the Euler grid's shift (SD3 samples with 3.0; the toy wants steps near the data)
REFUSED = ("SPO scores the log-density of stochastic sampler steps (DDIM, eta = 1); the flow toy samples with a "
           "deterministic Euler ODE, so there is no step Gaussian to score")


class VelocityMLP(EpsMLP):
    """``v_theta(x_s, i, c)``: the diffusion toy's MLP unchanged (toy/model.py), its output read as a velocity;
    ``i`` is the index of ``s = (i + 1) / 1000`` in the training table (``FlowSchedule``)."""


class FlowSchedule:
    """The rectified-flow forward process on the training table of ``FlowMatchEulerDiscreteScheduler`` (1000 entries,
    shift 1): index ``i`` in ``0 .. 999`` is ``s = (i + 1) / 1000``, from 0.001 to 1 (pure noise).

    It stands where the diffusion toy's ``NoiseSchedule`` stands: ``add_noise`` with the same arguments, and
    ``denoising_error``, which ``toy.model.denoising_error`` calls instead of its own, so that the methods, the
    held-out accuracy and the training curves run unchanged on the flow model.
    """

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.num_train_timesteps = num_train_timesteps
        self.sigmas = torch.arange(1, num_train_timesteps + 1, dtype=torch.float32) / num_train_timesteps

    def sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """``s`` of indices ``t`` ``(B,)`` as ``(B, 1)``, to broadcast over a point."""
        return self.sigmas.to(like.dtype)[t].reshape(-1, *[1] * (like.ndim - 1))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_s = (1 - s) x0 + s eps`` for ``x0``, ``noise`` ``(B, 2)`` and indices ``t`` ``(B,)``."""
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def velocity_error(
        self, model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(err_v (B,), v_pred (B, 2), x_s (B, 2))``: the rectified-flow loss per sample, ``mean (v_theta - v)^2``."""
        x_s = self.add_noise(x0, noise, t)
        v_pred = model(x_s, t, cond)
        return per_sample_mse(v_pred, velocity_target(x0, noise)), v_pred, x_s

    def denoising_error(
        self, model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(err_eps (B,), eps_pred (B, 2))``: what every objective gets, as the diffusion toy's errors are.

        ``err_eps = (1 - s)^2 err_v`` is the noise error of the same prediction; ``eps_pred = x_s + (1 - s) v_theta``
        is the noise the velocity implies (DSPO takes predictions, and ``eps_pred - eps = (1 - s)(v_theta - v)``).
        """
        err_v, v_pred, x_s = self.velocity_error(model, x0, t, noise, cond)
        s = self.sigma(t, x0)
        return noise_equivalent_error(err_v, s.reshape(-1)), x_s + (1 - s) * v_pred


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """``v = d x_s / ds = eps - x0``, the same at every ``s``."""
    return noise - x0


def noise_equivalent_error(err_v: Tensor, s: Tensor) -> Tensor:
    """``err_eps = (1 - s)^2 err_v`` (docs/flow_matching.md §2; ``full.models.flow.noise_equivalent_error``):
    from ``eps = x_s + (1 - s) v`` at a fixed ``x_s``, ``eps_theta - eps = (1 - s)(v_theta - v)``."""
    return (1 - s) ** 2 * err_v


def pretrain_flow(config, schedule: FlowSchedule, generator: torch.Generator, progress: bool = True):
    """``toy.train.pretrain`` for the flow model: the same data, optimiser and steps, the loss ``mean err_v``."""
    return pretrain(config, schedule, generator, progress, model_class=VelocityMLP, desc="pretrain (flow)",
                    error=lambda model, x0, t, noise: schedule.velocity_error(model, x0, t, noise)[0])


def euler_grid(num_steps: int = FLOW_SAMPLING_STEPS, shift: float = SAMPLING_SHIFT,
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[Tensor, Tensor]:
    """The Euler chain's table indices ``(N,)`` and its ``s`` values ``(N + 1,)``, from 1 down to 0.

    ``u`` uniform in ``(0, 1]``, shifted as diffusers' ``FlowMatchEulerDiscreteScheduler`` shifts sigmas,
    ``s = shift u / (1 + (shift - 1) u)``, and rounded to the training table (the model never saw other ``s``).
    """
    u = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
    s = shift * u / (1 + (shift - 1) * u)
    index = np.clip(np.round(s * num_train_timesteps).astype(np.int64), 1, num_train_timesteps) - 1
    if len(np.unique(index)) != num_steps:
        raise ValueError(f"{num_steps} steps with shift {shift} repeat a table entry; use fewer steps")
    sigmas = np.concatenate([(index + 1) / num_train_timesteps, [0.0]])
    return torch.from_numpy(index), torch.from_numpy(sigmas.astype(np.float32))


class EulerSampler:
    """Euler steps of ``dx/ds = v_theta(x, s)`` from ``s = 1`` to 0: ``x <- x + (s_next - s) v_theta(x, s)``.

    The same interface as the diffusion toy's ``DPMSolver`` (``sample(model, x_T, cond)``), so SPIN's pools, the
    training curves and the evaluation samples use it unchanged.
    """

    def __init__(self, schedule: FlowSchedule | None = None, num_inference_steps: int = FLOW_SAMPLING_STEPS,
                 shift: float = SAMPLING_SHIFT):
        T = NUM_TRAIN_TIMESTEPS if schedule is None else schedule.num_train_timesteps
        self.num_inference_steps = num_inference_steps
        self.timesteps, self.sigmas = euler_grid(num_inference_steps, shift, T)
        self.steps = (self.sigmas[1:] - self.sigmas[:-1]).tolist()  # ds < 0: toward the data

    @torch.no_grad()
    def sample(self, model: nn.Module, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Run the chain from ``x_1 = x`` ``(n, 2)`` (pure noise); returns ``x_0``."""
        n = len(x)
        for t, ds in zip(self.timesteps, self.steps):
            x = x + ds * model(x, t.expand(n), cond)
        return x


def make_euler_sampler(schedule: FlowSchedule) -> EulerSampler:
    return EulerSampler(schedule)


def euler_std_factor(std: float, sigmas: Tensor) -> float:
    """What the Euler chain on ``sigmas`` does to the std of the data Gaussian ``N(mu, std^2 I)`` given its *exact*
    velocity field: the sampled std is ``std * euler_std_factor(std, sigmas)`` (1 for an exact solver).

    The marginal at ``s`` is ``N((1 - s) mu, m(s)^2 I)``, ``m(s)^2 = (1 - s)^2 std^2 + s^2``, and the exact field is
    ``v(x, s) = -mu + (m'(s) / m(s)) (x - (1 - s) mu)``. So ``d = x - (1 - s) mu`` obeys ``d' = (m' / m) d``, and one
    Euler step multiplies ``d`` by ``1 + (s_next - s) m'(s) / m(s)`` while moving the mean exactly. From ``m(1) = 1``
    the sampled std is the product of these factors; divided by ``std`` it is the chain's relative error.
    """
    factor, var = 1.0, std**2
    s = sigmas.double().tolist()
    for here, there in zip(s[:-1], s[1:]):
        m2 = (1 - here) ** 2 * var + here**2
        factor *= 1 + (there - here) * (here - (1 - here) * var) / m2  # m' m = s - (1 - s) std^2
    return factor / std


def refusal(spec) -> str | None:
    """Why a toy method cannot run on the flow toy, or None: by its row's data kind, never by name."""
    return REFUSED if spec.row.data == "online" else None


def flow_method_names(names: list[str] | None) -> list[str]:
    """The methods a flow run trains: ``names``, or every method it can run; a refused one named is an error."""
    from .methods import METHODS, resolve

    if names is None:
        return [name for name, spec in METHODS.items() if refusal(spec) is None]
    for spec in resolve(names):
        if refusal(spec) is not None:
            raise ValueError(f"{spec.name} cannot run on the flow toy: {refusal(spec)}")
    return list(names)


def skipped(names: list[str] | None) -> dict[str, str]:
    """``{method: why}`` for the methods a flow run with ``names`` (None: all) leaves out."""
    from .methods import METHODS

    return {} if names is not None else {n: refusal(s) for n, s in METHODS.items() if refusal(s) is not None}


def flow_record(output: dict, names: list[str] | None, pretrain_losses: list[float]) -> None:
    """What a flow run adds to ``metrics.json``: the model, the methods it left out and why, the first loss."""
    output["model"] = "rectified flow (toy/flow.py)"
    output["skipped"] = skipped(names)
    output["pretrain"]["first_loss"] = float(np.mean(pretrain_losses[:50]))
