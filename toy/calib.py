"""``python -m toy.calib``: the fixed CPU workload that turns wall times into **calibration units**.

Absolute times on shared 2-core machines vary 2-3x from one machine (and hour) to the next, so the speed targets
of this repository are ratios: "N calibration units" = (wall seconds of the job) / (seconds this prints), the two
measured back to back on the same machine (``python -m toy.bench`` does exactly that).

The workload: 1000 Adam steps (lr 1e-3) of a tiny-diffusion-sized MLP, ``34 -> 128 -> 128 -> 128 -> 2`` with GELU
(the toy network's width: a 2D point plus a 32-dim timestep embedding), on one fixed batch of 256 with an MSE loss,
on **one** torch thread, seed 0. It is repeated 3 times and the fastest repeat, times 3, is printed in seconds
(3000 steps' worth): the fastest of three is less sensitive to a neighbour's burst on a shared machine.

This is, line for line, the calibration workload against which every calibration-unit figure in docs/ was
measured before it moved into the repository, so those figures and new measurements stay comparable; do not
change it (a different workload would silently change what one unit means). It imports nothing but torch, so
``python toy/calib.py`` runs it too (``$MINIPREF_CALIB`` can point ``python -m toy.bench`` at another file).
"""

import time

import torch


def measure() -> float:
    """Seconds for 3000 Adam steps: the fastest of 3 x 1000, times 3."""
    torch.set_num_threads(1); torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(34, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
                              torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 2))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.randn(256, 34); y = torch.randn(256, 2)
    best = float("inf")
    for _ in range(3):  # 3 x 1000 steps, the fastest repeat x 3: less sensitive to a neighbour's burst
        t0 = time.perf_counter()
        for _ in range(1000):
            loss = (net(x) - y).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
        best = min(best, time.perf_counter() - t0)
    return 3 * best


def main() -> None:
    print(f"{measure():.3f}")


if __name__ == "__main__":
    main()
