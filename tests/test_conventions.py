"""docs/conventions.md, "The same run in every implementation's beta": every row recomputed.

For each row the table gives an implementation, its beta and the minipref beta of the same run. Here each
implementation's loss is transcribed from its public code (written longhand from the formula in the row, in plain
torch) and evaluated at *its* beta; minipref is evaluated at the *minipref* beta the table states; the two must agree.
A wrong factor in the table (e.g. "2500 -> 2500", or the SDXL script's 5000 read as having no 1/2) fails here. A new
row without a transcription here fails too, so the table cannot grow unchecked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minipref
from tests.core_helpers import F64, assert_close, generator

TABLE_TITLE = "### The same run in every implementation's beta"
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def read_table() -> list[tuple[str, float, float]]:
    """(implementation, its beta, minipref beta) for every row that states both numbers."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "conventions.md").read_text()
    section = text.split(TABLE_TITLE, 1)[1]
    rows = []
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-"}:  # the header separator
            continue
        theirs, ours = NUMBER.search(cells[2]), NUMBER.search(cells[3])
        if theirs and ours:
            rows.append((cells[0], float(theirs.group()), float(ours.group())))
    return rows


# ---- the batches every transcription sees: winners first, then losers; model, reference, shared noise ----------
B, SHAPE = 4, (4, 3, 3)


def _batches(beta: float):
    """A random batch, and two whose margins are O(1) at this beta (so no loss saturates at beta 5000) with the
    model's drift from the reference at 0.2 and 0.05 per element: on both sides of the DSPO SDXL switch (0.1).
    In those two the reference predicts the noise exactly, so err_ref = 0 and err = drift = base + k / beta."""
    gen = generator(7)
    target = torch.randn(2 * B, *SHAPE, generator=gen, dtype=F64)
    model_pred = target + 0.3 * torch.randn(2 * B, *SHAPE, generator=gen, dtype=F64)
    ref_pred = target + 0.3 * torch.randn(2 * B, *SHAPE, generator=gen, dtype=F64)
    batches = [(model_pred, ref_pred, target)]
    for base in (0.2, 0.05):
        direction = torch.randn(2 * B, *SHAPE, generator=gen, dtype=F64)
        direction = direction / direction.pow(2).mean(dim=[1, 2, 3], keepdim=True).sqrt()  # mean square exactly 1
        drift = base + 2.0 * torch.rand(2 * B, generator=gen, dtype=F64) / beta
        batches.append((target + drift.sqrt()[:, None, None, None] * direction, target.clone(), target))
    return batches


def _errors(model_pred, ref_pred, target):
    """mean over C, H, W, as every one of these codes computes it."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    return model_losses, ref_losses


def _diffs(model_pred, ref_pred, target):
    model_losses, ref_losses = _errors(model_pred, ref_pred, target)
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    return model_w - model_l, ref_w - ref_l  # model_diff, ref_diff


def dpo_with_the_half(beta_dpo, model_pred, ref_pred, target):
    """Diffusion-DPO train.py and diffusers train_diffusion_dpo_sdxl.py: scale_term = -0.5 * beta_dpo."""
    model_diff, ref_diff = _diffs(model_pred, ref_pred, target)
    inside = -0.5 * beta_dpo * (model_diff - ref_diff)
    return -F.logsigmoid(inside).mean()


def dpo_without_the_half(beta_dpo, model_pred, ref_pred, target):
    """diffusers train_diffusion_dpo.py (SD1.5): logits = ref_diff - model_diff; -logsigmoid(beta_dpo * logits)."""
    model_diff, ref_diff = _diffs(model_pred, ref_pred, target)
    return -F.logsigmoid(beta_dpo * (ref_diff - model_diff)).mean()


def minipref_dpo(beta, model_pred, ref_pred, target):
    model_losses, ref_losses = _errors(model_pred, ref_pred, target)
    return minipref.dpo_loss(*model_losses.chunk(2), *ref_losses.chunk(2), beta=beta).loss


def kto_code(beta, model_pred, ref_pred, target):
    """train_kto_sd_v1.5.py, --loss kto --halo sigmoid: g = -model_losses + ref_loss, kl = clamp(mean g, 0),
    u = sign * beta * (g - kl), loss = mean(lambda_y (1 - sigmoid(u))); here every other image is desirable."""
    model_losses, ref_losses = _errors(model_pred, ref_pred, target)
    labels = torch.arange(2 * B) % 2 == 0
    g = -model_losses - (-ref_losses)
    kl = g.mean().detach().clamp(min=0)
    u = (2 * labels.to(F64) - 1) * beta * (g - kl)
    return (1 - torch.sigmoid(u)).mean()


def minipref_kto(beta, model_pred, ref_pred, target):
    model_losses, ref_losses = _errors(model_pred, ref_pred, target)
    labels = torch.arange(2 * B) % 2 == 0
    return minipref.kto_loss(model_losses, ref_losses, labels, beta=beta, utility="kahneman_tversky").loss


def contrast_paper(beta, model_pred, ref_pred, target):
    """Paper 002 Eq. (9) with the original DPO reward -1/2 beta (...), at W = I (its DPO limit)."""
    return dpo_with_the_half(beta, model_pred, ref_pred, target)


def minipref_contrast(beta, model_pred, ref_pred, target):
    model_losses, ref_losses = _errors(model_pred, ref_pred, target)
    identity = torch.eye(B, dtype=F64)
    return minipref.contrast_loss(
        *model_losses.chunk(2), *ref_losses.chunk(2), None, None, beta=beta, weights=identity
    ).loss


def dspo_code(sdxl):
    """huaishengzhu/DSPO train.py: inside = -0.5 * beta_dpo * (model_diff - ref_diff); pred2 = winners' model - ref;
    SD1.5: mean((model_diff_w - beta_dpo (1 - sigmoid(inside)) pred2)^2); SDXL: the switch at 0.1."""

    def loss(beta_dpo, model_pred, ref_pred, target):
        model_diff, ref_diff = _diffs(model_pred, ref_pred, target)
        inside = -0.5 * beta_dpo * (model_diff - ref_diff)
        gate = (1 - torch.sigmoid(inside))[:, None, None, None]
        pred2, _ = (model_pred - ref_pred).chunk(2)
        model_diff_w, _ = (model_pred - target).chunk(2)
        if sdxl:
            if pred2.pow(2).mean(dim=[1, 2, 3]).mean() >= 0.1:
                return (gate * pred2).pow(2).mean()
            return gate.pow(2).mean()
        return (model_diff_w - beta_dpo * gate * pred2).pow(2).mean()

    return loss


def minipref_dspo(variant):
    def loss(beta, model_pred, ref_pred, target):
        model_losses, ref_losses = _errors(model_pred, ref_pred, target)
        pred_w, ref_pred_w, target_w = model_pred[:B], ref_pred[:B], target[:B]
        return minipref.dspo_loss(pred_w, ref_pred_w, target_w, model_losses[B:], ref_losses[B:], beta=beta,
                                  gamma=1.0, variant=variant).loss

    return loss


# (a substring of the row's first cell) -> (the implementation's loss at its beta, minipref's at the minipref beta)
TRANSCRIPTIONS = {
    "Diffusion-DPO, original code": (dpo_with_the_half, minipref_dpo),
    "train_diffusion_dpo.py": (dpo_without_the_half, minipref_dpo),
    "train_diffusion_dpo_sdxl.py": (dpo_with_the_half, minipref_dpo),
    "Diffusion-KTO code": (kto_code, minipref_kto),
    "Diffusion-KTO paper": (kto_code, minipref_kto),
    "Diff-contrast": (contrast_paper, minipref_contrast),
    "DSPO code, SD1.5": (dspo_code(sdxl=False), minipref_dspo("dspo")),
    "DSPO code, SDXL": (dspo_code(sdxl=True), minipref_dspo("dspo_sdxl")),
}

ROWS = read_table()


def _key(implementation: str) -> str:
    matches = [key for key in TRANSCRIPTIONS if key in implementation]
    assert len(matches) == 1, f"row {implementation!r} matches {matches}: give it one transcription here"
    return matches[0]


def _transcription(implementation: str):
    return TRANSCRIPTIONS[_key(implementation)]


def test_the_table_is_read_and_every_row_has_a_transcription():
    assert len(ROWS) == len(TRANSCRIPTIONS)
    for implementation, _, _ in ROWS:
        _transcription(implementation)


@pytest.mark.parametrize("implementation,their_beta,minipref_beta", ROWS, ids=[_key(row[0]) for row in ROWS])
def test_row_is_the_same_run(implementation, their_beta, minipref_beta):
    theirs, ours = _transcription(implementation)
    batches = _batches(their_beta)
    for model_pred, ref_pred, target in batches:
        expected = theirs(their_beta, model_pred, ref_pred, target)
        actual = ours(minipref_beta, model_pred, ref_pred, target)
        assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=f"{implementation}: {their_beta} -> {minipref_beta}")
    # The check has power: half or twice the stated minipref beta gives another loss on some batch.
    for wrong in (minipref_beta / 2, minipref_beta * 2):
        gaps = [float(ours(wrong, *batch) - theirs(their_beta, *batch)) for batch in batches]
        assert max(abs(gap) for gap in gaps) > 1e-6, f"{implementation}: beta {wrong} is indistinguishable"
