"""full/stats.py against hand-computed values: win rates on per-prompt medians, the bootstrap CI,
the Wilcoxon signed-rank test, mean +- std, input validation and the markdown tables."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from full.eval import stats

# Three prompts, five seeds. Medians: A = (3, 2, 1), B = (1, 1, 1): A wins prompts 0 and 1 and ties
# prompt 2, so win_rate(A, B) = (1 + 1 + 0.5) / 3 = 5/6. The outlier seeds make the *means* favour B on
# prompt 0, so a win rate computed on means (not medians) would come out as (0 + 1 + 0.5) / 3.
A = {"p0": [3, 3, 3, -100, -100], "p1": [2, 2, 2, 0, 5], "p2": [1, 1, 1, 1, 1]}
B = {"p0": [1, 1, 1, 100, 100], "p1": [1, 1, 1, 1, 1], "p2": [0, 1, 1, 1, 9]}


def test_win_rate_uses_medians_and_counts_ties_half():
    _, med_a, med_b = stats.paired_medians(A, B, "A", "B")
    assert med_a.tolist() == [3, 2, 1] and med_b.tolist() == [1, 1, 1]
    assert stats.win_rate(med_a, med_b) == pytest.approx(5 / 6)
    assert stats.win_rate(med_b, med_a) == pytest.approx(1 / 6)
    result = stats.compare(A, B, "A", "B", n_resamples=2000)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 0)
    assert result["win_rate"] == pytest.approx(5 / 6)


def test_win_rates_of_a_pair_sum_to_one_and_cis_mirror():
    rng = np.random.default_rng(3)
    a = {f"p{i}": rng.normal(size=5).round(1).tolist() for i in range(40)}  # rounding makes some ties
    b = {f"p{i}": rng.normal(size=5).round(1).tolist() for i in range(40)}
    ab = stats.compare(a, b, "a", "b", n_resamples=3000, seed=7)
    ba = stats.compare(b, a, "b", "a", n_resamples=3000, seed=7)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    # Same seed -> same resampled prompts, so the bootstrap distribution of B is 1 - that of A.
    assert ab["ci_low"] == pytest.approx(1 - ba["ci_high"])
    assert ab["ci_high"] == pytest.approx(1 - ba["ci_low"])
    assert ab["wilcoxon"]["p_value"] == pytest.approx(ba["wilcoxon"]["p_value"])


def test_wilcoxon_exact_p_value_by_hand():
    # Differences 1, 2, 3, 4, 5, -6: W- = 6, W+ = 15. Under H0 each of the 2^6 = 64 sign patterns is equally
    # likely; the rank subsets with sum <= 6 are {}, {1}..{6}, {1,2}, {1,3}, {1,4}, {1,5}, {2,3}, {2,4},
    # {1,2,3}: 14 of them. Two-sided exact p = 2 * 14/64 = 0.4375.
    med_a = np.array([1.0, 2, 3, 4, 5, 0])
    med_b = np.array([0.0, 0, 0, 0, 0, 6])
    result = stats.wilcoxon_signed_rank(med_a, med_b)
    assert result["p_value"] == pytest.approx(0.4375)
    assert result["statistic"] == pytest.approx(6.0)
    assert result["n_nonzero"] == 6
    # All six positive: only the empty subset (and its mirror) is as extreme, p = 2/64.
    assert stats.wilcoxon_signed_rank(np.arange(1.0, 7), np.zeros(6))["p_value"] == pytest.approx(2 / 64)


def test_wilcoxon_zero_method_matches_scipy_and_drops_ties():
    med_a = np.array([1.0, 2.0, 3.5, 0.0, 4.0, 1.0, 7.0, 2.2])
    med_b = np.array([0.5, 2.0, 1.0, 1.0, 4.0, 0.2, 1.0, 2.0])  # two exact ties
    for zero_method in stats.ZERO_METHODS:
        ours = stats.wilcoxon_signed_rank(med_a, med_b, zero_method)
        theirs = scipy_stats.wilcoxon(med_a - med_b, zero_method=zero_method)
        assert ours["p_value"] == pytest.approx(theirs.pvalue)
    assert stats.wilcoxon_signed_rank(med_a, med_b)["n_nonzero"] == 6
    with pytest.raises(ValueError, match="zero_method"):
        stats.wilcoxon_signed_rank(med_a, med_b, "drop")


def test_wilcoxon_identical_models_is_p_one():
    result = stats.wilcoxon_signed_rank(np.ones(5), np.ones(5))
    assert result["p_value"] == 1.0 and result["n_nonzero"] == 0


def test_bootstrap_ci_is_reproducible_and_agrees_with_scipy():
    rng = np.random.default_rng(0)
    indicators = rng.choice([0.0, 0.5, 1.0], size=200, p=[0.3, 0.1, 0.6])
    ours = stats.bootstrap_ci(indicators, n_resamples=10_000, seed=0)
    assert ours == stats.bootstrap_ci(indicators, n_resamples=10_000, seed=0)  # bit for bit
    theirs = scipy_stats.bootstrap((indicators,), np.mean, n_resamples=10_000, method="percentile",
                                   rng=np.random.default_rng(1)).confidence_interval
    # Two independent Monte-Carlo estimates of the same percentiles: within ~0.01 of each other.
    assert ours[0] == pytest.approx(theirs.low, abs=0.01)
    assert ours[1] == pytest.approx(theirs.high, abs=0.01)
    # And both are near the normal-theory interval mean +- 1.96 sd / sqrt(n).
    half = 1.96 * indicators.std(ddof=1) / np.sqrt(indicators.size)
    assert ours[0] == pytest.approx(indicators.mean() - half, abs=0.01)
    assert ours[1] == pytest.approx(indicators.mean() + half, abs=0.01)


def test_bootstrap_ci_of_a_sweep_is_a_point():
    assert stats.bootstrap_ci(np.ones(10), n_resamples=500) == (1.0, 1.0)


def test_mean_std_is_sample_std():
    assert stats.mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, np.sqrt(5 / 3)))
    assert stats.mean_std([7.0]) == (7.0, 0.0)


def test_mismatched_prompt_sets_name_the_models():
    b = dict(B)
    del b["p2"]
    b["p9"] = [1.0]
    with pytest.raises(ValueError, match=r"'kto' and 'base'.*p2.*p9"):
        stats.compare(A, b, "kto", "base")


def test_nan_scores_are_rejected():
    bad = {**A, "p1": [1.0, float("nan"), 2.0]}
    with pytest.raises(ValueError, match="NaN"):
        stats.compare(bad, B, "A", "B")
    with pytest.raises(ValueError, match="NaN"):
        stats.mean_std([1.0, float("inf")])


def test_default_pairs_and_focus():
    assert stats.default_pairs(["base", "dpo", "kto"]) == [("dpo", "base"), ("kto", "base"), ("kto", "dpo")]
    assert stats.default_pairs(["base", "dpo", "kto"], focus="kto") == [("kto", "base"), ("kto", "dpo")]
    with pytest.raises(ValueError, match="focus model 'spin'"):
        stats.default_pairs(["base", "dpo"], focus="spin")


def test_summarize_and_markdown_tables():
    all_scores = {"pickscore": {"base": B, "kto": A}, "clip": {"base": B, "kto": B}}
    summary = stats.summarize(all_scores, n_resamples=1000)
    (kto_vs_base,) = summary["win_rates"]["pickscore"]
    assert (kto_vs_base["model"], kto_vs_base["baseline"]) == ("kto", "base")
    assert kto_vs_base["win_rate"] == pytest.approx(5 / 6)
    assert summary["win_rates"]["clip"][0]["win_rate"] == 0.5  # a model against itself: all ties
    base_mean = np.mean([v for seeds in B.values() for v in seeds])
    assert summary["means"]["pickscore"]["base"]["mean"] == pytest.approx(base_mean)
    table = stats.markdown_tables(summary)
    assert "| Model | pickscore | clip |" in table
    assert f"| base | {base_mean:.2f} (± " in table
    assert "| kto vs. base | 83.3 [" in table
    assert "zero_method=wilcox" in table
