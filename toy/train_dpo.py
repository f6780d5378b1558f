"""Diffusion-DPO on the toy in one file, to read top to bottom (the toy's answer to nanoGPT's train.py).

The same run as ``python -m toy --methods dpo`` (toy/train.py, toy/methods.py), written out as one loop around
``minipref.dpo_loss``; it prints the same numbers as that run's ``dpo`` row of metrics.json (tests/test_toy.py
checks it). Paper 000 Eq. (4) / Diffusion-DPO: a winner ``x_w`` (desirable) and a loser ``x_l`` (undesirable)
share a timestep and a noise; the loss rewards the policy for denoising the winner better than the frozen
reference does, more than it does so for the loser.

    python -m toy.train_dpo            # 600 steps after 2000 of pretraining, seed 0
    python -m toy.train_dpo --quick    # 150 steps, as python -m toy --quick
"""

import argparse
import copy
import json
import math

import torch

import minipref
from toy.data import DESIRABLE, PreferenceData
from toy.evaluate import HeldOutPairs, implicit_accuracy, mean_within, sample_metrics
from toy.seeding import generator_for
from toy.sampling import make_sampler, sample
from toy.schedule import NUM_TRAIN_TIMESTEPS, NoiseSchedule
from toy.train import PretrainConfig, pretrain


def main(quick: bool = False, seed: int = 0) -> dict:
    # Hyperparameters: toy/methods.py's dpo row (beta 500 suits this schedule, docs/toy.md says why).
    beta, lr, steps, batch, max_grad_norm = 500.0, 1e-3, 150 if quick else 600, 256, 1.0
    n_samples, eval_pairs, eval_draws = (1000, 500, 16) if quick else (3500, 2000, 32)
    torch.set_num_threads(1)

    # The reference: the pretrained model (N((0.5, 0.8), 0.04 I)), frozen. The policy starts as its copy.
    schedule = NoiseSchedule()
    torch.manual_seed(seed)
    reference, _ = pretrain(PretrainConfig(steps=600) if quick else PretrainConfig(), schedule,
                            generator_for(seed, "pretrain"), progress=False)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    data = PreferenceData.draw(2000, generator_for(seed, "preference data"))  # 2000 desirable + 2000 undesirable
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr, foreach=True)
    warmup = max(1, steps // 20)
    g = generator_for(seed, "dpo")  # every draw of the loop comes from here

    for step in range(steps):
        # lr: linear warmup over 5% of the steps, then cosine decay to 0
        progress = (step - warmup) / max(1, steps - warmup)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        # B pairs: a desirable winner and an undesirable loser, drawn with replacement from the training set
        x_w = data.desirable[torch.randint(len(data.desirable), (batch,), generator=g)]
        x_l = data.undesirable[torch.randint(len(data.undesirable), (batch,), generator=g)]
        # one (t, eps) per pair, shared by its winner and loser: the reward difference is then about x_w vs x_l only
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        noise = torch.randn(batch, 2, generator=g)
        x0, t2, noise2 = torch.cat([x_w, x_l]), torch.cat([t, t]), torch.cat([noise, noise])  # (2B, 2), (2B,), (2B, 2)
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        x_t = schedule.add_noise(x0, noise2, t2)
        # err = mean_d (eps_theta(x_t, t) - eps)^2, per sample: the policy with gradient, the reference without
        err = (policy(x_t, t2) - noise2).pow(2).mean(dim=1)
        with torch.no_grad():
            ref_err = (reference(x_t, t2) - noise2).pow(2).mean(dim=1)
        err_w, err_l = err.chunk(2)
        ref_err_w, ref_err_l = ref_err.chunk(2)
        # L = -log sigmoid( -(beta/2) [ (err_w - ref_err_w) - (err_l - ref_err_l) ] )   (paper 000 Eq. (4))
        out = minipref.dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)  # as the Diffusion-DPO script
        optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {out.metrics['loss']:.4f}  implicit acc {out.metrics['implicit_acc']:.3f}  "
                  f"margin {out.metrics['margin']:.3f}")

    # Evaluation, with the same draws as python -m toy: where the samples land, and how the implicit reward ranks
    # fresh (desirable, undesirable) pairs.
    policy.requires_grad_(False).eval()
    points = sample(policy, make_sampler(schedule), n_samples, generator_for(seed, "samples/dpo"))
    desirable = DESIRABLE.sample(n_samples, generator_for(seed, "desirable reference"))
    metrics = sample_metrics(points, desirable, mean_within(desirable))
    heldout = HeldOutPairs.draw(reference, schedule, eval_pairs, eval_draws, generator_for(seed, "held-out pairs"))
    metrics.update(implicit_accuracy(policy, schedule, heldout))
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m toy.train_dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps and a smaller evaluation, as --quick")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.quick, args.seed)
