"""
# Statistics for comparing aligned models: mean +- std, win rates with bootstrap CIs, Wilcoxon tests

Pure numpy / scipy (no torch), so the numbers of a finished run can be recomputed anywhere from
`scores.jsonl` alone.

The protocol follows the papers this repository reproduces:

* **Mean +- std per model and score** over every generated image, as in Table 1 of
  *Aligning Text-to-Image Diffusion Models using RL from Human Utility* (paper 000).
  We report the sample standard deviation (`ddof=1`); the paper does not say which it used.
* **Win rate per prompt on the median of the seeds**, as in Appendix 0.A of *Aligning Diffusion Models
  by Optimizing Human Utility* (Diffusion-KTO, paper 001): "we generate 5 images per method and report the
  win-rate using the median scoring images". For models A and B and prompts `i = 1..P`,

      win_rate(A, B) = (1/P) sum_i ( [med_A(i) > med_B(i)] + 0.5 [med_A(i) == med_B(i)] )

  so ties count half and `win_rate(A, B) + win_rate(B, A) == 1` exactly.
* **95% confidence interval** of the win rate by the percentile bootstrap over *prompts* (the unit that
  was sampled; seeds are already folded into the median). Fixed seed, 10k resamples by default, so the
  interval is reproducible bit for bit.
* **Wilcoxon signed-rank test** on the per-prompt median differences, the test paper 000 (Sec. 7)
  planned for its comparisons. `scipy.stats.wilcoxon` with `zero_method="wilcox"` by default: prompts whose
  medians are exactly equal are dropped before ranking (Wilcoxon's original treatment; `"pratt"` and
  `"zsplit"` are the alternatives scipy offers). Two-sided, scipy's `method="auto"`: in scipy 1.17 the exact
  null distribution for n <= 50 without ties or zeros, an exhaustive (so deterministic) permutation test for
  n <= 13 with them, the normal approximation otherwise. Older scipy releases decide differently, so the
  scipy version goes into the results.

* **Across training seeds** (the replication table, full/lab/replicate.py): win indicators of S seeds x P
  prompts, a two-stage bootstrap (seeds, then prompts) so the CI carries the spread between training runs, and
  the exact Clopper-Pearson interval where a bootstrap collapses to a point (18 of 18 prompts won).

Data layout used throughout: `scores[model][prompt_id] -> list of floats` (one float per seed), for one
scorer at a time.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import scipy
from scipy import stats as scipy_stats

# One scorer's results: model name -> prompt id -> one score per seed.
ModelScores = Mapping[str, Mapping[str, Sequence[float]]]

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP_SEED = 0
ZERO_METHODS = ("wilcox", "pratt", "zsplit")


# ----------------------------------------------------------------------------------------------
# Validation: a comparison is only meaningful on the same prompts, and a NaN would poison every mean.


def _check_finite(values: np.ndarray, what: str) -> None:
    if values.size == 0:
        raise ValueError(f"{what}: no scores")
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} score(s) are NaN or infinite; rescore those images")


def _check_resampling(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def per_prompt_medians(scores: Mapping[str, Sequence[float]], model: str = "model") -> dict[str, float]:
    """Median over the seeds of each prompt (the 'median scoring image' of Diffusion-KTO App. 0.A)."""
    if len(scores) == 0:
        raise ValueError(f"{model}: no prompts")
    medians = {}
    for prompt_id, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        _check_finite(values, f"{model}, prompt {prompt_id!r}")
        medians[prompt_id] = float(np.median(values))
    return medians


def paired_medians(scores_a: Mapping[str, Sequence[float]], scores_b: Mapping[str, Sequence[float]],
                   name_a: str = "A", name_b: str = "B") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-prompt medians of two models on the same prompts, aligned by prompt id.

    Raises ValueError naming both models and some of the prompts that only one of them has: a paired
    test on different prompt sets would silently compare apples with oranges."""
    only_a = sorted(set(scores_a) - set(scores_b))
    only_b = sorted(set(scores_b) - set(scores_a))
    if only_a or only_b:
        raise ValueError(
            f"models {name_a!r} and {name_b!r} were scored on different prompts: "
            f"only {name_a!r} has {only_a[:5]}{'...' if len(only_a) > 5 else ''} ({len(only_a)}), "
            f"only {name_b!r} has {only_b[:5]}{'...' if len(only_b) > 5 else ''} ({len(only_b)})")
    prompt_ids = sorted(scores_a)
    med_a = per_prompt_medians(scores_a, name_a)
    med_b = per_prompt_medians(scores_b, name_b)
    return (prompt_ids,
            np.array([med_a[p] for p in prompt_ids]),  # (P,)
            np.array([med_b[p] for p in prompt_ids]))  # (P,)


# ----------------------------------------------------------------------------------------------
# The numbers.


def mean_std(values: Sequence[float], what: str = "scores") -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    _check_finite(values, what)
    std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    return float(np.mean(values)), std


def win_indicators(med_a: np.ndarray, med_b: np.ndarray) -> np.ndarray:
    """1 where A's median beats B's, 0.5 on a tie, 0 where it loses. Shape (P,)."""
    med_a, med_b = np.asarray(med_a, dtype=np.float64), np.asarray(med_b, dtype=np.float64)
    if med_a.shape != med_b.shape or med_a.ndim != 1:
        raise ValueError(f"med_a and med_b must be 1-D arrays of equal length, got {med_a.shape} and {med_b.shape}")
    _check_finite(med_a, "med_a")
    _check_finite(med_b, "med_b")
    return (med_a > med_b) + 0.5 * (med_a == med_b)


def win_rate(med_a: np.ndarray, med_b: np.ndarray) -> float:
    """Fraction of prompts on which A's median beats B's; ties count half."""
    return float(win_indicators(med_a, med_b).mean())


def bootstrap_ci(indicators: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES,
                 confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_BOOTSTRAP_SEED,
                 chunk: int = 1_000) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `indicators`, resampling prompts with replacement.

    Written out (rather than `scipy.stats.bootstrap`) so that the resampling stream depends only on
    numpy's PCG64 and `seed`, not on scipy's internals; the tests check it agrees with scipy's
    percentile bootstrap. Resamples are drawn in chunks so 10k x 3200 prompts stays small in memory."""
    indicators = np.asarray(indicators, dtype=np.float64).ravel()
    _check_finite(indicators, "win indicators")
    _check_resampling(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    n = indicators.size
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, P) prompt indices
        means[start:stop] = indicators[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# Across training seeds: the replication table (full/lab/replicate.py, docs/replication.md).


def two_stage_bootstrap_ci(indicators: np.ndarray, *, n_resamples: int = DEFAULT_RESAMPLES,
                           confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_BOOTSTRAP_SEED
                           ) -> tuple[float, float]:
    """Percentile CI of the mean of `indicators` (S training seeds x P prompts) by a two-stage bootstrap: draw S
    seeds with replacement, then P prompts with replacement, one draw shared by the drawn seeds (every seed was
    evaluated on the same prompts: resampling them per seed would count a prompt's own difficulty S times as
    independent); the statistic is the mean over the drawn cells,

        W* = (1/S) sum_{s*} (1/P) sum_{p*} I[s*, p*]

    so the interval carries the spread between training seeds as well as between prompts. With S = 1 it is
    `bootstrap_ci` over prompts (a different random stream)."""
    indicators = np.asarray(indicators, dtype=np.float64)
    if indicators.ndim != 2 or 0 in indicators.shape:
        raise ValueError(f"indicators must be a (seeds, prompts) array with both > 0, got shape {indicators.shape}")
    _check_finite(indicators, "win indicators")
    _check_resampling(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = indicators.shape
    seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))  # stage 1: (R, S) seed indices
    prompts = rng.integers(0, n_prompts, size=(n_resamples, n_prompts))  # stage 2: (R, P), shared by the seeds
    means = indicators[seeds[:, :, None], prompts[:, None, :]].mean(axis=(1, 2))  # (R,)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def clopper_pearson(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) CI of a binomial proportion, k successes in n trials:

        low = Beta^-1(alpha/2; k, n - k + 1),  high = Beta^-1(1 - alpha/2; k + 1, n - k),  alpha = 1 - confidence

    (low = 0 at k = 0, high = 1 at k = n). 18 of 18: [0.815, 1]: where a percentile bootstrap collapses to [1, 1]."""
    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer)) and 0 <= k <= n and n >= 1):
        raise ValueError(f"need integers 0 <= k <= n, n >= 1; got k={k!r}, n={n!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(scipy_stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(scipy_stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def wilcoxon_signed_rank(med_a: np.ndarray, med_b: np.ndarray, zero_method: str = "wilcox") -> dict:
    """Two-sided Wilcoxon signed-rank test of the per-prompt median differences `med_a - med_b`.

    Returns {"statistic", "p_value", "n_prompts", "n_nonzero", "zero_method"}. When every difference is
    zero there is nothing to rank; we return p = 1.0 (what scipy returns, minus its warning) and say so."""
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    diff = np.asarray(med_a, dtype=np.float64) - np.asarray(med_b, dtype=np.float64)  # (P,)
    _check_finite(diff, "median differences")
    n_nonzero = int(np.count_nonzero(diff))
    out = {"n_prompts": int(diff.size), "n_nonzero": n_nonzero, "zero_method": zero_method}
    if n_nonzero == 0:
        return {**out, "statistic": 0.0, "p_value": 1.0, "note": "all per-prompt medians are equal"}
    result = scipy_stats.wilcoxon(diff, zero_method=zero_method, alternative="two-sided")
    return {**out, "statistic": float(result.statistic), "p_value": float(result.pvalue)}


def compare(scores_a: Mapping[str, Sequence[float]], scores_b: Mapping[str, Sequence[float]],
            name_a: str = "A", name_b: str = "B", *, n_resamples: int = DEFAULT_RESAMPLES,
            confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_BOOTSTRAP_SEED,
            zero_method: str = "wilcox") -> dict:
    """Everything about 'A vs. B' for one scorer: win rate of A, its CI, and the Wilcoxon test."""
    prompt_ids, med_a, med_b = paired_medians(scores_a, scores_b, name_a, name_b)
    indicators = win_indicators(med_a, med_b)
    low, high = bootstrap_ci(indicators, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "model": name_a, "baseline": name_b, "n_prompts": len(prompt_ids),
        "win_rate": float(indicators.mean()), "ci_low": low, "ci_high": high, "confidence": confidence,
        "wins": int((indicators == 1.0).sum()), "ties": int((indicators == 0.5).sum()),
        "losses": int((indicators == 0.0).sum()),
        "wilcoxon": wilcoxon_signed_rank(med_a, med_b, zero_method),
    }


def default_pairs(models: Sequence[str], focus: str | None = None) -> list[tuple[str, str]]:
    """Which comparisons to report. With `focus`, that model against every other one (the rows of
    Diffusion-KTO Table 1: "vs. SD v1.5", "vs. SFT", ...); otherwise every later model against every
    earlier one (the base model is listed first, so each LoRA is compared with the base)."""
    if focus is not None:
        if focus not in models:
            raise ValueError(f"focus model {focus!r} is not one of the evaluated models {list(models)}")
        return [(focus, other) for other in models if other != focus]
    return [(models[j], models[i]) for j in range(len(models)) for i in range(j)]


def summarize(all_scores: Mapping[str, ModelScores], *, pairs: Sequence[tuple[str, str]] | None = None,
              focus: str | None = None, n_resamples: int = DEFAULT_RESAMPLES,
              confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_BOOTSTRAP_SEED,
              zero_method: str = "wilcox") -> dict:
    """All statistics for `all_scores[scorer][model][prompt_id] -> [score per seed]`, JSON-ready."""
    if not all_scores:
        raise ValueError("no scores to summarize")
    summary = {"settings": {"n_resamples": n_resamples, "confidence": confidence, "bootstrap_seed": seed,
                            "zero_method": zero_method, "std_ddof": 1,
                            "win_rate": "per-prompt median over seeds; ties count half",
                            # scipy's method="auto" for wilcoxon has changed between releases
                            "numpy_version": np.__version__, "scipy_version": scipy.__version__},
               "means": {}, "win_rates": {}}
    for scorer, by_model in all_scores.items():
        models = list(by_model)
        summary["means"][scorer] = {}
        for model in models:
            flat = [v for values in by_model[model].values() for v in values]
            mean, std = mean_std(flat, f"{scorer}, {model}")
            summary["means"][scorer][model] = {"mean": mean, "std": std, "n_images": len(flat),
                                               "n_prompts": len(by_model[model])}
        scorer_pairs = pairs if pairs is not None else default_pairs(models, focus)
        summary["win_rates"][scorer] = [
            compare(by_model[a], by_model[b], a, b, n_resamples=n_resamples, confidence=confidence,
                    seed=seed, zero_method=zero_method)
            for a, b in scorer_pairs]
    return summary


# ----------------------------------------------------------------------------------------------
# Markdown tables in the papers' formats.


def _p_value_text(p: float) -> str:
    return "<1e-4" if p < 1e-4 else (f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}")


def markdown_tables(summary: dict) -> str:
    """Three tables: means (paper 000 Table 1: "21.25 (± 0.88)"), win rates in percent with the CI
    (paper 001 Table 1: rows "A vs. B", one column per scorer), and the Wilcoxon p-values."""
    scorers = list(summary["means"])
    models = list(dict.fromkeys(m for s in scorers for m in summary["means"][s]))
    lines = ["| Model | " + " | ".join(scorers) + " |", "|---|" + "---|" * len(scorers)]
    for model in models:
        cells = []
        for s in scorers:
            entry = summary["means"][s].get(model)
            cells.append("-" if entry is None else f"{entry['mean']:.2f} (± {entry['std']:.2f})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    out = ["Mean (± std) over all images:", "", *lines, ""]

    rows = list(dict.fromkeys((c["model"], c["baseline"]) for s in scorers for c in summary["win_rates"][s]))
    if rows:
        conf = round(100 * summary["settings"]["confidence"])
        by_pair = {s: {(c["model"], c["baseline"]): c for c in summary["win_rates"][s]} for s in scorers}
        win_lines = ["| Comparison | " + " | ".join(scorers) + " |", "|---|" + "---|" * len(scorers)]
        p_lines = list(win_lines)
        for a, b in rows:
            wins, ps = [], []
            for s in scorers:
                c = by_pair[s].get((a, b))
                if c is None:
                    wins.append("-")
                    ps.append("-")
                    continue
                wins.append(f"{100 * c['win_rate']:.1f} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]")
                ps.append(_p_value_text(c["wilcoxon"]["p_value"]))
            win_lines.append(f"| {a} vs. {b} | " + " | ".join(wins) + " |")
            p_lines.append(f"| {a} vs. {b} | " + " | ".join(ps) + " |")
        out += [f"Win rate (%) of the first model, per-prompt median of the seeds, ties half, "
                f"[{conf}% bootstrap CI over prompts]:", "", *win_lines, "",
                f"Wilcoxon signed-rank p-values (two-sided, per-prompt medians, "
                f"zero_method={summary['settings']['zero_method']}):", "", *p_lines, ""]
    return "\n".join(out)

