"""Train with plain SGD in a test: its update is linear in the gradient, so two runs whose gradients agree to float
rounding end with updates that agree to float rounding. (AdamW's first update is lr * g / (|g| + eps), about
lr * sign(g): it turns rounding noise in a near-zero gradient into a full step of either sign.)

`use_sgd()` makes every `TrainingRun` build SGD where `full.run.loop.make_optimizer` builds AdamW (the same learning
rate, scaling and lr schedule) and remembers the trained parameters as they were before the first step;
`write_update(output_dir)` then saves what the run changed, ``final - initial`` per trained tensor (in the
parameters' order, the same in every run of one model), to ``<output_dir>/sgd_update.pt``."""

from __future__ import annotations

from pathlib import Path

import torch

UPDATE_NAME = "sgd_update.pt"
_STARTS: dict[str, tuple[list, list]] = {}  # output_dir -> (the trained parameters, their values before step 1)


def sgd(params, lr, **adam_only) -> torch.optim.SGD:
    """SGD where make_optimizer builds AdamW, at the same learning rate (betas, eps, weight decay are Adam's)."""
    return torch.optim.SGD(params, lr=lr)


def use_sgd(monkeypatch=None) -> None:
    import full.run.loop as loop

    make_adamw = loop.make_optimizer

    def make_sgd(config, params, accelerator):
        params = list(params)
        _STARTS[str(Path(config.output_dir).resolve())] = (params, [p.detach().clone() for p in params])
        adamw, torch.optim.AdamW = torch.optim.AdamW, sgd
        try:
            return make_adamw(config, params, accelerator)
        finally:
            torch.optim.AdamW = adamw

    if monkeypatch is not None:
        monkeypatch.setattr(loop, "make_optimizer", make_sgd)
    else:
        loop.make_optimizer = make_sgd


def write_update(output_dir) -> Path:
    params, initial = _STARTS.pop(str(Path(output_dir).resolve()))
    path = Path(output_dir) / UPDATE_NAME
    torch.save([(p.detach() - p0).double() for p, p0 in zip(params, initial)], path)
    return path


def relative_difference(one: list, two: list) -> float:
    """|two - one| / |one| over all tensors together (Frobenius norms)."""
    diff = sum(((b - a) ** 2).sum() for a, b in zip(one, two)) ** 0.5
    norm = sum((a ** 2).sum() for a in one) ** 0.5
    assert norm > 0, "the run did not change its weights"
    return float(diff / norm)
