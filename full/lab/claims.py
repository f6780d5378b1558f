"""The replication table's claims and its decision rule, fixed before any run (docs/replication.md).

Each row is one headline comparison of a paper, stated as the lab can test it: which two arms (names of
`full/lab/methods.py`, or "base", the pretrained model), which score, which kind of claim. The arms are the lab's
presets unless the name says `_paper` (`methods.paper_setting_methods`: the paper's own objective settings).
`python -m full.lab.replicate` measures every row and `verdict` applies the rule below; nothing here depends on
an outcome, and every row is reported whatever its verdict.

Papers (docs/methods.md, "Papers"): 000 *Aligning Text-to-Image Diffusion Models using Reinforcement Learning from
Human Utility* (no arXiv id); 001 *Aligning Diffusion Models by Optimizing Human Utility*, arXiv:2404.04465;
002 *Diffusion Preference Alignment via Relative Text-Image Contrast*, arXiv:2406.06382; 003 *Aesthetic
Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference Optimization*,
arXiv:2406.04314; 004 *DSPO: Direct Score Preference Optimization for Diffusion Model Alignment* (ICLR 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
NOT_WORSE_MARGIN = 0.15  # "no alignment cost": the win rate's CI must stay above 0.5 - this
EQUAL_BAND = (0.8, 1.25)  # "equal cost": the ratio's CI must lie inside this band

RULE = (
    "Win-rate claims 'A > B': W = mean over training seeds of the fraction of the 18 held-out captions on which A's "
    "per-caption median score over 8 sample seeds (the mean, for the 0/1 size-range flag) beats B's, ties half, A and B trained with the same seed; 95% CI by a "
    "two-stage percentile bootstrap (seeds, then captions, one caption draw shared by the drawn seeds; 10000 resamples, seed 0), replaced by the exact "
    "Clopper-Pearson interval on the captions where every resample gives the same value. HOLDS when the CI's lower "
    "end is above 0.5 and a majority of seeds (2 of 3) have W_s > 0.5; REVERSED when the upper end is below 0.5 and "
    "a majority have W_s < 0.5; otherwise INCONCLUSIVE. 'Not worse' claims (no alignment cost): HOLDS when the lower "
    f"end is above {0.5 - NOT_WORSE_MARGIN:.2f}, REVERSED when the upper end is below 0.5. Ratio claims (cost, in "
    "CPU seconds): the per-seed ratio A/B (the step cost: one full.bench run per seed), 95% percentile bootstrap over "
    "seeds; 'A above B' HOLDS when the lower end is above 1 "
    "and a majority of seeds are above 1, REVERSED when the upper end is below 1 and a majority are below; 'equal' "
    f"HOLDS when the CI lies inside [{EQUAL_BAND[0]}, {EQUAL_BAND[1]}], REVERSED when it lies outside it. Fewer "
    "seeds than the run's minimum: INCONCLUSIVE. Claims on the caption rater's data are judged by the same rule on "
    "its score. Every claim is reported whatever its verdict; no arm is re-run or re-tuned after its result is seen.")

# What each claim's `score` names: the scorer full.evaluate writes (full/lab/rater.py), and how a caption's samples
# are summarised. The median is Diffusion-KTO's protocol (paper 001 App. A); a 0/1 flag is summarised by its mean
# (the median of eight 0/1 flags would hide a drift in up to three of them).
SCORES = {"rater": ("full.lab.rater:Rater", "median"),
          "caption_rater": ("full.lab.rater:CaptionRater", "median"),
          "fidelity": ("full.lab.rater:Fidelity", "median"),
          "out_of_range": ("full.lab.rater:OutOfRange", "mean")}
# Which preference data a claim's arms train on, and the scores its models are evaluated with. "size": the lab's
# data (the rater prefers larger shapes); "caption": the same base samples labelled by the harder CaptionRater
# (bigger or smaller is better by the caption), where a method must read the caption to please it.
TRACKS = {"size": ("rater", "fidelity", "out_of_range"), "caption": ("caption_rater", "fidelity", "out_of_range")}
KINDS = ("wins", "not_worse", "ratio_above", "ratio_equal")
RATIOS = ("step_seconds", "gain_per_second")


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str  # where the paper says it
    claim: str
    paper_value: str  # the paper's number(s), with its metric
    kind: str  # one of KINDS
    a: str  # an arm, or "base"
    b: str
    score: str = "rater"  # one of SCORES, for the win-rate kinds
    ratio: str = ""  # one of RATIOS, for the ratio kinds
    track: str = "size"  # one of TRACKS: which preference data A and B trained on

    @property
    def metric(self) -> str:
        if self.kind in ("ratio_above", "ratio_equal"):
            return {"step_seconds": "CPU seconds per training step (full.bench, one thread), A/B",
                    "gain_per_second": "(mean area gain over base) per training CPU second, A/B"}[self.ratio]
        what = {"rater": "rater (area)", "caption_rater": "caption rater (area, signed by the caption)",
                "fidelity": "caption fidelity", "out_of_range": "share outside the pretraining's size range"}[self.score]
        return f"W(A, B), {what}" + (f"; trained on the {self.track} rater's data" if self.track != "size" else "")


C = Claim
CLAIMS = [
    # 000 Table 1, PickScore means (no win rates, no seeds): SPIN 21.95 > KTO 21.80 > DPO 21.34 > base 21.25 > BCE 20.74
    C("000-spin-kto", "000 Table 1", "SPIN-Diffusion > Diffusion-KTO", "PickScore 21.95 vs 21.80", "wins",
      "spin", "kto_kahneman_tversky"),
    C("000-kto-dpo", "000 Table 1", "Diffusion-KTO > Diffusion-DPO", "PickScore 21.80 vs 21.34", "wins",
      "kto_kahneman_tversky", "dpo"),
    C("000-dpo-base", "000 Table 1", "Diffusion-DPO > base", "PickScore 21.34 vs 21.25", "wins", "dpo", "base"),
    C("000-base-bce", "000 Table 1", "base > BCE LoRA (Eq. 3: no reference, beta 1)", "PickScore 21.25 vs 20.74",
      "wins", "base", "bce_paper"),
    C("000-dpo-fidelity", "000 Sec. 5.1.2", "DPO keeps caption alignment", "CLIP score 19.82 vs 19.80", "not_worse",
      "dpo", "base", "fidelity"),
    # 001 Table 1 (PickScore win rates of Diffusion-KTO) and the utility ablation (App.; Sec. 4.2.3)
    C("001-kto-dpo", "001 Table 1", "Diffusion-KTO > Diffusion-DPO (KTO at the paper's ratio 0.8, beta)",
      "PickScore win rate 59.6%", "wins", "kto_paper", "dpo"),
    C("001-kto-sft", "001 Table 1", "Diffusion-KTO > SFT", "PickScore win rate 73.0%", "wins",
      "kto_kahneman_tversky", "sft"),
    C("001-kt-la", "001 Sec. 4.2.3, App.", "Kahneman-Tversky utility > loss-averse", "'performs best' (no number)",
      "wins", "kto_kahneman_tversky", "kto_loss_averse"),
    C("001-kt-rs", "001 Sec. 4.2.3, App.", "Kahneman-Tversky utility > risk-seeking", "'performs best' (no number)",
      "wins", "kto_kahneman_tversky", "kto_risk_seeking"),
    C("001-dpo-drift", "001 Sec. 7, Fig. 7", "DPO drifts out of the data more than KTO", "2D toy: DPO samples the "
      "undesirable region (no number)", "wins", "dpo", "kto_kahneman_tversky", "out_of_range"),
    # 002 Table 1, SD1.5, HPSv2 prompts
    C("002-contrast-dpo", "002 Table 1", "Diff-contrast > Diffusion-DPO", "HPS win rate 73.4%", "wins",
      "contrast", "dpo"),
    C("002-contrast-sft", "002 Table 1", "Diff-contrast > SFT", "HPS win rate 63.8%", "wins", "contrast", "sft"),
    # 003: user study (Fig. 6, SDXL), GenEval (Table 3), cost (Sec. 5.4)
    C("003-spo-dpo", "003 Fig. 6", "SPO > Diffusion-DPO on preference", "users: 52.8% general preference (SDXL)",
      "wins", "spo", "dpo"),
    C("003-dpo-spo-fidelity", "003 Table 3", "SPO below DPO on caption alignment", "GenEval: SPO under DPO",
      "wins", "dpo", "spo", "fidelity"),
    C("003-spo-fidelity", "003 abstract", "SPO keeps caption alignment vs the base", "'not sacrificing image-text "
      "alignment'", "not_worse", "spo", "base", "fidelity"),
    C("003-spo-efficiency", "003 Sec. 5.4", "SPO gains more reward per training second than DPO", "SPO's GPU hours "
      "20.8% of DPO's (SD1.5)", "ratio_above", "spo", "dpo", ratio="gain_per_second"),
    # 004 Table 1 (win rates vs SD1.5, PickV2 prompts, PickScore), Table 5 (DSPO-E), Table 3 (cost)
    C("004-dspo-kto", "004 Table 1", "DSPO > Diffusion-KTO", "PickScore win rate vs base 73.6 vs 71.4", "wins",
      "dspo", "kto_kahneman_tversky"),
    C("004-dspo-sft", "004 Table 1", "DSPO > SFT", "PickScore win rate vs base 73.6 vs 70.2", "wins", "dspo", "sft"),
    C("004-dspo-dpo", "004 Table 1", "DSPO > Diffusion-DPO", "PickScore win rate vs base 73.6 vs 71.6", "wins",
      "dspo", "dpo"),
    C("004-dspo-dspo_e", "004 Table 5", "DSPO > DSPO-E", "PickScore win rate vs base 73.6 vs 70.2", "wins",
      "dspo", "dspo_e"),
    C("004-dspo-dspo_ref", "004 App. D.1", "DSPO > its SDXL form (Eq. 47)", "not compared (Eq. 47 is used on SDXL)",
      "wins", "dspo", "dspo_ref"),
    C("004-step-cost", "004 Table 3", "DSPO costs what DPO costs per step", "4.18 vs 4.15 min per step",
      "ratio_equal", "dspo", "dpo", ratio="step_seconds"),
    # The same headline comparisons with the arm at its paper's own objective settings (methods.paper_setting_methods)
    C("002-contrast-dpo-paper", "002 Table 1", "Diff-contrast > Diffusion-DPO (contrast at the paper's beta 2000)",
      "HPS win rate 73.4%", "wins", "contrast_paper", "dpo"),
    C("003-spo-dpo-paper", "003 Fig. 6", "SPO > Diffusion-DPO (SPO at the paper's rank 4, batch 10, threshold 0.3, "
      "lr scaled)", "users: 52.8% general preference (SDXL)", "wins", "spo_paper", "dpo"),
    C("004-dspo-dpo-paper", "004 Table 1", "DSPO > Diffusion-DPO (DSPO at the paper's lambda 0.001, gamma 1)",
      "PickScore win rate vs base 73.6 vs 71.6", "wins", "dspo_paper", "dpo"),
    # The harder rater: the headline comparisons again, every arm trained on the caption rater's pairs and feedback
    C("000-dpo-base-caption", "000 Table 1", "Diffusion-DPO > base (caption-dependent rater)",
      "PickScore 21.34 vs 21.25", "wins", "dpo", "base", "caption_rater", track="caption"),
    C("001-kto-dpo-caption", "001 Table 1", "Diffusion-KTO > Diffusion-DPO (caption-dependent rater; KTO at the "
      "paper's ratio 0.8, beta)", "PickScore win rate 59.6%", "wins", "kto_paper", "dpo", "caption_rater",
      track="caption"),
    C("002-contrast-dpo-caption", "002 Table 1", "Diff-contrast > Diffusion-DPO (caption-dependent rater)",
      "HPS win rate 73.4%", "wins", "contrast", "dpo", "caption_rater", track="caption"),
    C("003-spo-dpo-caption", "003 Fig. 6", "SPO > Diffusion-DPO (caption-dependent rater)",
      "users: 52.8% general preference (SDXL)", "wins", "spo", "dpo", "caption_rater", track="caption"),
    C("004-dspo-dpo-caption", "004 Table 1", "DSPO > Diffusion-DPO (caption-dependent rater)",
      "PickScore win rate vs base 73.6 vs 71.6", "wins", "dspo", "dpo", "caption_rater", track="caption"),
]
del C


def claim_named(claim_id: str) -> Claim:
    found = {c.id: c for c in CLAIMS}
    if claim_id not in found:
        raise KeyError(claim_id)
    return found[claim_id]


def arms_of(claims) -> list[tuple[str, str]]:
    """The trained arms the claims need, as (track, arm) in first-use order ("base" is not trained)."""
    return list(dict.fromkeys((c.track, arm) for c in claims for arm in (c.a, c.b) if arm != "base"))


def verdict(kind: str, ci, per_seed, *, min_seeds: int = 3) -> str:
    """"holds" | "reversed" | "inconclusive" by RULE, from the CI and the per-seed values (W_s or ratio_s)."""
    if kind not in KINDS:
        raise ValueError(f"unknown claim kind {kind!r}; one of {KINDS}")
    low, high = ci
    if not low <= high:
        raise ValueError(f"CI must have low <= high, got {ci}")
    per_seed = np.asarray(per_seed, dtype=np.float64)
    if per_seed.size < min_seeds:
        return "inconclusive"
    majority = lambda mask: int(mask.sum()) * 2 > per_seed.size  # noqa: E731  (2 of 3, 2 of 2, 3 of 4)
    if kind == "wins":
        if low > 0.5 and majority(per_seed > 0.5):
            return "holds"
        if high < 0.5 and majority(per_seed < 0.5):
            return "reversed"
    elif kind == "not_worse":
        if low > 0.5 - NOT_WORSE_MARGIN:
            return "holds"
        if high < 0.5:
            return "reversed"
    elif kind == "ratio_above":
        if low > 1.0 and majority(per_seed > 1.0):
            return "holds"
        if high < 1.0 and majority(per_seed < 1.0):
            return "reversed"
    else:  # ratio_equal
        if EQUAL_BAND[0] <= low and high <= EQUAL_BAND[1]:
            return "holds"
        if high < EQUAL_BAND[0] or low > EQUAL_BAND[1]:
            return "reversed"
    return "inconclusive"
