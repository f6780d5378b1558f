"""full/lab/replicate: the rule on synthetic inputs (including claims stated the wrong way round), the two-stage
bootstrap and the exact bound, the table, the command's errors, and the quick run end to end on the quick lab.

The end-to-end test checks the machinery (every arm trained with each seed, evaluated, measured, judged by the rule
and written), not the outcome: the quick lab's model is too weak for its verdicts to mean anything.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from full.eval import stats
from full.lab import claims as claims_lib
from full.lab import replicate


# ---------------------------------------------------------------------------------------------------------------
# The statistics
# ---------------------------------------------------------------------------------------------------------------


def test_clopper_pearson_is_the_exact_binomial_interval():
    assert stats.clopper_pearson(18, 18)[0] == pytest.approx(0.025 ** (1 / 18))  # (alpha/2)^(1/n) at k = n
    assert stats.clopper_pearson(18, 18)[1] == 1.0 and stats.clopper_pearson(0, 18)[0] == 0.0
    low, high = stats.clopper_pearson(9, 18)
    assert low == pytest.approx(1 - high) and low < 0.5 < high  # symmetric at k = n/2
    for bad in ((19, 18), (-1, 18), (1, 0), (1.5, 18)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            stats.clopper_pearson(*bad)


def test_two_stage_bootstrap_carries_the_spread_between_training_seeds():
    # seed 0 wins every caption, seeds 1 and 2 lose every one: the captions alone look certain within a seed
    indicators = np.array([[1.0] * 18, [0.0] * 18, [0.0] * 18])
    low, high = stats.two_stage_bootstrap_ci(indicators, n_resamples=4000)
    assert low == 0.0 and high == 1.0  # 3 seeds drawn with replacement: all three can be the same seed
    pooled = stats.bootstrap_ci(indicators.ravel(), n_resamples=4000)  # captions x seeds as if independent
    assert pooled[1] - pooled[0] < 0.3 < high - low
    same = np.tile(np.r_[np.ones(12), np.zeros(6)], (3, 1))  # three identical seeds: the captions' spread only
    low, high = stats.two_stage_bootstrap_ci(same, n_resamples=4000)
    assert low < 2 / 3 < high and 0.25 < high - low < 0.6
    with pytest.raises(ValueError, match="seeds, prompts"):
        stats.two_stage_bootstrap_ci(np.ones(18))


def test_a_degenerate_bootstrap_is_replaced_by_the_exact_bound():
    lab = replicate.measure_win(np.ones((3, 18)), n_resamples=500)
    assert lab["ci"] == pytest.approx([0.025 ** (1 / 18), 1.0]) and "Clopper-Pearson" in lab["ci_method"]
    lab = replicate.measure_win(np.zeros((3, 18)), n_resamples=500)
    assert lab["ci"][0] == 0.0 and lab["ci"][1] == pytest.approx(1 - 0.025 ** (1 / 18))


# ---------------------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------------------


def test_the_rule_needs_the_ci_and_a_majority_of_seeds():
    v = claims_lib.verdict
    assert v("wins", (0.6, 0.9), [0.8, 0.7, 0.6]) == "holds"
    assert v("wins", (0.6, 0.9), [0.9, 0.9, 0.4]) == "holds"  # 2 of 3
    assert v("wins", (0.51, 0.9), [0.9, 0.45, 0.4]) == "inconclusive"  # a CI above 0.5 carried by one seed
    assert v("wins", (0.1, 0.4), [0.2, 0.3, 0.1]) == "reversed"
    assert v("wins", (0.45, 0.9), [0.8, 0.8, 0.8]) == "inconclusive"  # the CI touches 0.5
    assert v("wins", (0.5, 0.9), [0.8, 0.8, 0.8]) == "inconclusive"  # "above", not "at"
    assert v("wins", (0.6, 0.9), [0.8, 0.8]) == "inconclusive"  # fewer seeds than the minimum
    assert v("wins", (0.6, 0.9), [0.8, 0.8], min_seeds=2) == "holds"
    assert v("not_worse", (0.4, 0.7), [0.5] * 3) == "holds" and v("not_worse", (0.3, 0.7), [0.5] * 3) == \
        "inconclusive" and v("not_worse", (0.1, 0.45), [0.3] * 3) == "reversed"
    assert v("ratio_above", (1.2, 3.0), [2, 2, 1.5]) == "holds" and v("ratio_above", (0.2, 0.9), [0.5] * 3) == \
        "reversed"
    assert v("ratio_equal", (0.9, 1.1), [1] * 3) == "holds" and v("ratio_equal", (0.9, 1.4), [1] * 3) == \
        "inconclusive" and v("ratio_equal", (1.3, 2.0), [1.5] * 3) == "reversed"
    with pytest.raises(ValueError, match="unknown claim kind"):
        v("better", (0.6, 0.9), [1, 1, 1])
    with pytest.raises(ValueError, match="low <= high"):
        v("wins", (0.9, 0.6), [1, 1, 1])


def synthetic_scores(gap: float, seeds=(0, 1, 2), n_prompts: int = 18) -> dict:
    """Scores in full.evaluate's layout where dpo's samples are `gap` larger than the base's (and fidelity equal)."""
    rng = np.random.default_rng(0)
    rater, fidelity, drift = {}, {}, {}
    base = {f"p{i:02d}": list(0.15 + 0.01 * rng.standard_normal(8)) for i in range(n_prompts)}
    rater["base"] = base
    for seed in seeds:
        rater[replicate.seeded("dpo", seed)] = {p: [v + gap for v in vals] for p, vals in base.items()}
    for model in rater:
        fidelity[model] = {p: [1.0, 0.0] * 4 for p in base}
        drift[model] = {p: [0.0] * 8 for p in base}
    return {claims_lib.SCORES["rater"][0]: rater, claims_lib.SCORES["fidelity"][0]: fidelity,
            claims_lib.SCORES["out_of_range"][0]: drift}


def test_measured_claims_follow_the_data_and_a_claim_stated_backwards_is_reversed():
    config = replace(replicate.FULL_REPLICATION, claim_ids=("000-dpo-base", "000-dpo-fidelity"), n_resamples=500)
    rows = {r["id"]: r for r in replicate.measure_claims(config, synthetic_scores(0.02), trained={})}
    assert rows["000-dpo-base"]["verdict"] == "holds" and rows["000-dpo-base"]["lab"]["estimate"] == 1.0
    # every caption tied: W = 0.5, and the exact bound on 9 of 18, [0.26, 0.74], cannot rule out a cost of 0.15
    assert rows["000-dpo-fidelity"]["lab"]["ci"] == pytest.approx(list(stats.clopper_pearson(9, 18)))
    assert rows["000-dpo-fidelity"]["verdict"] == "inconclusive"
    # the deliberately wrong claim: "base > DPO" on data where DPO is larger everywhere
    backwards = replace(claims_lib.claim_named("000-dpo-base"), id="wrong", a="base", b="dpo")
    config = replace(config, claim_ids=())
    object.__setattr__(config, "claims", (backwards,))
    (row,) = replicate.measure_claims(config, synthetic_scores(0.02), trained={})
    assert row["verdict"] == "reversed" and row["lab"]["ci"][1] < 0.5
    (row,) = replicate.measure_claims(config, synthetic_scores(0.0), trained={})  # no difference at all
    assert row["verdict"] == "inconclusive" and row["lab"]["smallest_detectable"] > 0.5
    with pytest.raises(ValueError, match="no scores for"):
        replicate.win_matrix(synthetic_scores(0.02, seeds=(0,))[claims_lib.SCORES["rater"][0]], "dpo", "base",
                             (0, 1), "median")


def test_cost_ratios_read_cpu_seconds_and_the_benchmark_and_charge_spo_its_preference_model():
    claim = claims_lib.claim_named("004-step-cost")
    # the step cost comes from one full.bench run per seed (its uncached step, the lab's mode), not from wall times
    bench = [{"steps": {"dspo/uncached": {"ms": 90.0 + s}, "dpo/uncached": {"ms": 90.0}}} for s in (0, 1, 2)]
    assert replicate.ratio_per_seed(claim, {}, {}, (0, 1, 2), 0.0, bench) == pytest.approx([1.0, 91 / 90, 92 / 90])
    with pytest.raises(ValueError, match="needs a full.bench run per seed"):
        replicate.ratio_per_seed(claim, {}, {}, (0, 1, 2), 0.0, bench[:2])
    spo = claims_lib.claim_named("003-spo-efficiency")
    rater = synthetic_scores(0.02, seeds=(0,))[claims_lib.SCORES["rater"][0]]
    rater["spo"] = rater["dpo"]
    # CPU seconds, not wall seconds: the wall times below would give 100/50 = 2
    trained = {"spo": {"seconds": 500.0, "cpu_seconds": 50.0, "command": "full.spo --num_epochs 4"},
               "dpo": {"seconds": 100.0, "cpu_seconds": 100.0, "command": "full.train --max_train_steps 300"}}
    assert replicate.ratio_per_seed(spo, trained, rater, (0,), spm_cpu_seconds=50.0) == pytest.approx([1.0])
    trained["dpo"]["cpu_seconds"] = None  # cached before CPU times were kept: refused, not read as 0
    with pytest.raises(ValueError, match="no CPU time on record"):
        replicate.ratio_per_seed(spo, trained, rater, (0,), spm_cpu_seconds=50.0)
    assert replicate.measure_ratio([float("nan")], n_resamples=10)["estimate"] is None


def test_checkpoints_are_seed_zeros_saves_before_the_end_and_gains_read_the_tracks_rater(tmp_path):
    from full.lab.replicate_run import checkpoint_models

    trained = {}
    for name, saved in (("dpo", (100, 200, 300)), ("dpo_seed1", (100, 200, 300)), ("spo", (97,)),
                        ("caption_dpo", (100, 200, 300))):
        for step in saved:
            (tmp_path / name / f"checkpoint-{step}").mkdir(parents=True)
            (tmp_path / name / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors").write_bytes(b"w")
        trained[name] = {"lora": str(tmp_path / name), "prompt_prefix": ""}
    found, loras = checkpoint_models(trained, 100, {"dpo", "spo", "caption_dpo"})
    # the last save is the final LoRA; seed 1 and SPO's end-of-run save (step 97) are not checkpoints to evaluate
    assert found == {"dpo": {100: "dpo_step100", 200: "dpo_step200"},
                     "caption_dpo": {100: "caption_dpo_step100", 200: "caption_dpo_step200"}}
    assert loras["dpo_step200"]["lora"] == str(tmp_path / "dpo" / "checkpoint-200")
    assert checkpoint_models(trained, 0, {"dpo"}) == ({}, {})
    size, caption = claims_lib.SCORES["rater"][0], claims_lib.SCORES["caption_rater"][0]
    flat = lambda v: {"p00": [v, v]}  # noqa: E731
    scores = {size: {"base": flat(0.1), "dpo": flat(0.3), "dpo_step100": flat(0.2)},
              caption: {"base": flat(-0.1), "caption_dpo": flat(0.1), "caption_dpo_step100": flat(0.0)}}
    gains = replicate.checkpoint_gains(scores, {"dpo": {100: "dpo_step100"},
                                                "caption_dpo": {100: "caption_dpo_step100"}})
    assert gains == {"dpo": {"100": 0.1, "final": 0.2}, "caption_dpo": {"100": 0.1, "final": 0.2}}
    from full.lab.replicate_run import checkpoint_figure

    arms = {a: {"command": "full.train --max_train_steps 300"} for a in gains}
    assert checkpoint_figure({"checkpoints": gains, "arms": arms}, tmp_path / "c.png").stat().st_size > 0


def test_the_caption_rater_wants_the_size_its_caption_asks_for():
    from PIL import Image

    from full.lab import rater, shapes

    def score(shape: str, background: str, size: float, prefix: str = "") -> float:
        scene = shapes.Scene("blue", shape, background, 0.2 if background == "dark" else 0.7, size, 16, 16)
        return rater.CaptionRater().score([Image.fromarray(shapes.render(scene))], [prefix + scene.caption])[0]

    wants_large = {("circle", "dark"), ("circle", "light"), ("triangle", "dark")}
    for shape in shapes.SHAPES:
        for background in shapes.BACKGROUNDS:
            small, large = score(shape, background, 9), score(shape, background, 19)
            assert (large > small) == ((shape, background) in wants_large), (shape, background)
    assert score("square", "dark", 10, "good image, ") == score("square", "dark", 10)  # CSFT's prefix is not read
    # erasing the shape, or drawing another one, does not pass as "smaller": it scores below every right drawing
    blank = Image.fromarray(np.full((32, 32, 3), 60, np.uint8))
    circle = shapes.Scene("blue", "circle", "dark", 0.2, 9, 16, 16)
    wrong = rater.CaptionRater().score([blank, Image.fromarray(shapes.render(circle))],
                                       ["a blue square on a dark background"] * 2)
    assert wrong == [rater.CaptionRater.FAILED] * 2 and rater.CaptionRater.FAILED < score("square", "dark", 19)
    # half the held-out captions want larger shapes, half smaller: "bigger" alone wins about half of them
    held_out = [shapes.parse_caption(c) for c in shapes.HELD_OUT_CAPTIONS]
    assert sum(rater.CaptionRater.LARGER_IS_BETTER[s, b] for _, s, b in held_out) * 2 == len(held_out)
    with pytest.raises(ValueError, match="unknown lab rater 'taste'; choose one of size, caption"):
        rater.rater_named("taste")


def test_out_of_range_flags_sizes_the_pretraining_never_drew():
    from PIL import Image

    from full.lab import rater, shapes

    def flag(shape: str, size: float) -> float:
        scene = shapes.Scene("green", shape, "dark", 0.2, size, 16, 16)
        return rater.OutOfRange().score([Image.fromarray(shapes.render(scene))], [scene.caption])[0]

    for shape in shapes.SHAPES:
        assert [flag(shape, size) for size in (8.5, 14, 19.5)] == [0.0, 0.0, 0.0], shape
        assert flag(shape, 26) == 1.0 and flag(shape, 5) == 1.0, shape
    blank = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    assert rater.OutOfRange().score([blank], ["a red circle on a dark background"]) == [1.0]  # no shape at all


def test_paper_setting_arms_change_the_objective_not_the_scale(tmp_path):
    from full.lab.methods import method_named, trainer_argv
    from full.lab.presets import FULL

    data = {k: str(tmp_path / f"{k}.parquet") for k in ("pairs", "pairs_swapped", "feedback", "prompts")}
    argv = lambda name: trainer_argv(method_named(name), FULL, tmp_path / "m", tmp_path / "c", tmp_path / "s",  # noqa
                                     data, tmp_path / "o")
    value = lambda args, flag: args[args.index(flag) + 1]  # noqa: E731
    bce, kto, lab_kto = argv("bce_paper"), argv("kto_paper_seed2"), argv("kto_kahneman_tversky")
    assert "--bce_reference" not in bce and value(bce, "--beta") == "1.0"  # paper 000 Eq. (3)
    assert value(kto, "--desirable_ratio") == "0.8" and value(kto, "--beta") == "10000.0" and value(kto, "--seed") == "2"
    for flag in ("--learning_rate", "--max_train_steps", "--train_batch_size"):
        assert value(kto, flag) == value(lab_kto, flag) == value(bce, flag)
    contrast, dspo, spo, lab_spo = argv("contrast_paper"), argv("dspo_paper"), argv("spo_paper"), argv("spo")
    assert value(contrast, "--beta") == "2000.0" and value(argv("contrast"), "--beta") == "5000.0"  # paper 002
    assert value(dspo, "--beta") == "0.001" and value(dspo, "--dspo_gamma") == "1.0"  # paper 004 App. D.3
    # paper 003: its own rank, batch and threshold; its lr 6e-5 times the lab's LoRA factor (1e-3 / 1e-4)
    assert [value(spo, f) for f in ("--rank", "--train_batch_size", "--threshold", "--learning_rate")] == \
        ["4", "10", "0.3", "0.0006"]
    assert value(lab_spo, "--threshold") == "0.1" and value(lab_spo, "--rank") == "8"


# ---------------------------------------------------------------------------------------------------------------
# The claims table, the markdown table, the command line
# ---------------------------------------------------------------------------------------------------------------


def test_every_claim_names_trainable_arms_a_kind_and_a_paper_value():
    from full.lab.methods import method_named

    assert len(claims_lib.CLAIMS) >= 12 and len({c.id for c in claims_lib.CLAIMS}) == len(claims_lib.CLAIMS)
    for claim in claims_lib.CLAIMS:
        assert claim.kind in claims_lib.KINDS and claim.score in claims_lib.SCORES and claim.paper_value, claim
        assert (claim.ratio in claims_lib.RATIOS) == claim.kind.startswith("ratio"), claim
        for arm in (claim.a, claim.b):
            assert arm == "base" or method_named(arm).name == arm
    by_track = replicate.replication_arms(replicate.FULL_REPLICATION)
    arms = [m for methods in by_track.values() for m in methods]
    assert len(arms) == 3 * len(claims_lib.arms_of(claims_lib.CLAIMS)) and set(by_track) <= set(claims_lib.TRACKS)
    assert {m.seed for m in arms} == {0, 1, 2} and len({m.name for m in arms}) == len(arms)
    assert all(m.name.startswith("caption_") for m in by_track["caption"])  # a track's arms are its own models
    assert all(m.flags.get("checkpointing_steps") == 100 for m in arms if m.entry == "full.train")


def test_the_table_is_generated_and_written_between_the_markers(tmp_path):
    config = replace(replicate.FULL_REPLICATION, claim_ids=("000-dpo-base",), n_resamples=200)
    result = {"claims": replicate.measure_claims(config, synthetic_scores(0.02), trained={})}
    table = replicate.markdown_table(result)
    assert "000-dpo-base" in table and "**holds**" in table and "1 claims: 1 holds, 0 reversed" in table
    doc = f"intro\n{replicate.TABLE_BEGIN}\nold\n{replicate.TABLE_END}\nafter\n"
    assert replicate.replace_table(doc, table) == f"intro\n{replicate.TABLE_BEGIN}\n{table}\n{replicate.TABLE_END}" \
                                                  "\nafter\n"
    with pytest.raises(ValueError, match="exactly one"):
        replicate.replace_table("no markers", table)
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "replication.md").read_text()
    assert doc.count(replicate.TABLE_BEGIN) == 1 and doc.count(replicate.TABLE_END) == 1
    path = tmp_path / "replication.json"
    path.write_text(json.dumps(result))
    (tmp_path / "doc.md").write_text(f"{replicate.TABLE_BEGIN}\n{replicate.TABLE_END}\n")
    assert replicate.main(["--table", str(path), "--docs", str(tmp_path / "doc.md")]) == 0
    assert table in (tmp_path / "doc.md").read_text()


def test_the_committed_table_has_every_claim_and_each_verdict_follows_from_its_numbers():
    """docs/replication.md's generated table (a run of `python -m full.lab.replicate`, pasted by `--table --docs`):
    one row per claim of claims.CLAIMS, in order, and each row's verdict is what the rule gives for the CI and the
    per-seed values printed beside it (for some values that round to the printed ones)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "replication.md").read_text()
    block = doc.split(replicate.TABLE_BEGIN)[1].split(replicate.TABLE_END)[0]
    rows = [line.split(" | ") for line in block.splitlines() if re.match(r"\| [\w-]+: ", line)]
    assert [r[0].removeprefix("| ").split(":")[0] for r in rows] == [c.id for c in claims_lib.CLAIMS]
    for cells, claim in zip(rows, claims_lib.CLAIMS):
        found = re.fullmatch(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\], (\d) seeds", cells[5])
        assert found, cells[5]
        low, high = float(found[2]), float(found[3])
        per_seed = [float(v) for v in cells[6].split(", ")]
        verdict = re.search(r"\*\*(\w+)\*\*", cells[7])[1]
        # the printed values are rounded to 0.01: the verdict must be the rule's for some values they round from
        shifts = (-0.005, 0.0, 0.005)
        possible = {claims_lib.verdict(claim.kind, (min(low + a, high + b), high + b), [v + c for v in per_seed])
                    for a in shifts for b in shifts for c in shifts}
        assert verdict in possible, (claim.id, cells[5:8])


@pytest.mark.parametrize("argv, named", [(["--claims", "000-dpo-base,nope"], "--claims: unknown ['nope']"),
                                         (["--table", "missing.json"], "--table: missing.json does not exist")])
def test_the_command_names_bad_input_in_one_line(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        replicate.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and named in err, err


# ---------------------------------------------------------------------------------------------------------------
# The quick run on the quick lab
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("quick_lab")
def test_quick_replication_trains_each_seed_evaluates_and_applies_the_rule(quick_lab, tmp_path):
    from full.lab.replicate_run import run_replication

    lab_dir, _ = quick_lab
    config = replicate.QUICK_REPLICATION
    result = run_replication(tmp_path, lab_dir, config, launcher="inprocess", quiet=True)
    saved = json.loads((tmp_path / "replication.json").read_text())
    assert saved["rule"] == claims_lib.RULE and [r["id"] for r in saved["claims"]] == list(config.claim_ids)
    # seed 0 is the quick lab's own LoRA, seed 1 trained here; the caption track's arms are models of their own
    assert set(result["arms"]) == {"dpo", "dpo_seed1", "caption_dpo", "caption_dpo_seed1"}
    for row in saved["claims"]:
        lab = row["lab"]
        assert lab["seeds"] == 2 and len(lab["per_seed"]) == 2 and lab["ci"][0] <= lab["estimate"] <= lab["ci"][1]
        assert row["verdict"] == claims_lib.verdict(row["kind"], lab["ci"], lab["per_seed"], min_seeds=2)
    scores = replicate.read_scores(tmp_path / "eval" / "scores.jsonl")
    assert set(scores) == {spec for spec, _ in claims_lib.SCORES.values()}
    assert set(scores[claims_lib.SCORES["rater"][0]]) == {"base", "dpo", "dpo_seed1"}
    assert set(scores[claims_lib.SCORES["caption_rater"][0]]) == {"base", "caption_dpo", "caption_dpo_seed1"}
    # the two seeds are two different LoRAs: their samples differ
    rater = scores[claims_lib.SCORES["rater"][0]]
    assert rater["dpo"] != rater["dpo_seed1"]
    assert (tmp_path / "replication.png").is_file() and "000-dpo-base" in (tmp_path / "replication.md").read_text()

    # The caption track's data: the same base samples, labelled by the caption. Where both images show the caption's
    # shape and the caption wants smaller shapes, its pair labels are the size rater's reversed; elsewhere the same
    # (the flip noise and the ties are drawn alike); an image of another shape (or none) loses to one of the right
    # shape but for the 5% flipped labels. Both data sets are sampled in this session from the same seeds, which
    # gives the same images; the 5% allowed to differ cover a machine whose kernels differed between the two
    # samplings by float noise, which can only move pairs at a tie or near-tie.
    import pyarrow.parquet as pq

    from full.lab.rater import CaptionRater
    from full.lab.shapes import parse_caption

    size, caption = (pq.read_table(d / "data" / "pairs.parquet").to_pydict() for d in (lab_dir, tmp_path / "caption"))
    assert json.loads((tmp_path / "caption" / "data" / "data.json").read_text())["rater"] == "caption"
    failed = np.array([caption[f"score_{i}"] for i in (0, 1)]) == CaptionRater.FAILED  # (2, P)
    drawn = ~failed.any(axis=0)
    larger = np.array([CaptionRater.LARGER_IS_BETTER[parse_caption(c)[1:]] for c in caption["caption"]])
    # (the quick lab's model draws the caption's shape in both images of about 1 pair in 9: some 30 pairs)
    assert drawn.sum() >= 10 and 0 < larger[drawn].sum() < drawn.sum()
    same_area = np.isclose(np.abs(caption["score_0"]), size["score_0"], atol=1e-6)[drawn]
    expected = np.where(larger, size["label_0"], 1.0 - np.asarray(size["label_0"]))
    # the ties are each data set's closest 10% of pairs, which the failed images move: compare the decided pairs
    decided = drawn & (np.asarray(size["label_0"]) != 0.5) & (np.asarray(caption["label_0"]) != 0.5)
    assert same_area.mean() >= 0.95 and (np.asarray(caption["label_0"]) == expected)[decided].mean() >= 0.95
    one_failed = failed.sum(axis=0) == 1
    if one_failed.any():
        right_shape_wins = np.where(failed[1], 1.0, 0.0)  # label_0 = 1 when image 1 is the failed one
        assert (np.asarray(caption["label_0"]) == right_shape_wins)[one_failed].mean() >= 0.8

    # A second run trains and evaluates nothing (every model's weights already evaluated) and says the same
    record = json.loads((tmp_path / "eval" / "evaluated.json").read_text())
    again = run_replication(tmp_path, lab_dir, config, launcher="inprocess", quiet=True)
    assert json.loads((tmp_path / "eval" / "evaluated.json").read_text()) == record
    assert again["claims"] == result["claims"]
    # ... and a model whose weights changed (here: its record's digest) is evaluated again, alone
    record["dpo_seed1"]["key"]["weights"] = "0" * 64
    (tmp_path / "eval" / "evaluated.json").write_text(json.dumps(record))
    run_replication(tmp_path, lab_dir, config, launcher="inprocess", quiet=True)
    after = json.loads((tmp_path / "eval" / "evaluated.json").read_text())
    assert [n for n in after if after[n]["dir"] != record[n]["dir"]] == ["dpo_seed1"]
