"""`python -m full.lab.replicate --out runs/replication` (`make replicate`): each paper's headline comparison, head
to head in the CPU image lab, judged by a rule fixed in advance (full/lab/claims.py, docs/replication.md).

    python -m full.lab.replicate --out runs/replication                 # needs the lab's model: `make lab` first
    python -m full.lab.replicate --out runs/replication-quick --quick   # the test: 3 claims, 2 seeds
    python -m full.lab.replicate --table runs/replication/replication.json --docs docs/replication.md

It reuses the lab's pretrained model, CLIP and preference data (`--lab`, default runs/lab; pretrained there when
missing), labels the same base samples again with the harder caption rater for the claims on that track
(OUT/caption), trains every arm the claims need with each training seed through the same entry points as the lab
(`full/lab/methods.py`; LoRAs cached in OUT/train by their command), times the step-cost claim's objectives with
`python -m full.bench`, evaluates every model with `full.evaluate` (18 held-out captions x 8 sample seeds, the
raters, the caption check and the size-range check; a model whose weights were evaluated before is not evaluated
again), and writes OUT/replication.json, OUT/replication.md (the table) and OUT/replication.png. `--table` prints the table of a
finished run (and with `--docs FILE` writes it between the markers there): the docs' table is generated, not typed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from full.cli import Parser
from full.eval import stats
from full.lab import claims as claims_lib
from full.lab import methods as methods_lib
from full.lab.presets import FULL, QUICK, LabConfig


@dataclass(frozen=True)
class ReplicationConfig:
    name: str
    lab: LabConfig
    seeds: tuple = (0, 1, 2)  # training seeds; A and B of a comparison share each
    claim_ids: tuple = ()  # empty: every claim
    min_seeds: int = 3  # the rule's minimum for a verdict other than inconclusive
    # full.train arms also save their LoRA every N steps; seed 0's saved before the end are evaluated (the reward gain
    # along the run, so a saturated final does not hide an order); 0: none
    checkpoint_every: int = 100
    # quick: train in the lab's own train/ so that the quick lab's seed-0 LoRAs (same commands) are reused
    train_in_lab: bool = False
    n_resamples: int = stats.DEFAULT_RESAMPLES
    calibrate: bool = True  # time `python -m toy.calib` after the run: the cost in calibration units
    claims: tuple = field(default=(), init=False)

    def __post_init__(self):
        ids = self.claim_ids or tuple(c.id for c in claims_lib.CLAIMS)
        object.__setattr__(self, "claims", tuple(claims_lib.claim_named(i) for i in ids))


FULL_REPLICATION = ReplicationConfig("full", FULL)
# The quick lab trains sft / dpo / dpo_swapped 60 steps (the rest 4): its DPO with a second seed is also "measured";
# the caption rater's DPO arms run 4 steps (the track's machinery: its data, its names, its scorer)
QUICK_REPLICATION = ReplicationConfig(
    "quick", replace(QUICK, measured=QUICK.measured + ("dpo_seed1",)), seeds=(0, 1),
    claim_ids=("000-dpo-base", "000-dpo-fidelity", "000-dpo-base-caption"), min_seeds=2, checkpoint_every=0,
    train_in_lab=True, n_resamples=2000, calibrate=False)


def seeded(arm: str, seed: int, track: str = "size") -> str:
    """The evaluated model of `arm` trained with `seed` (`methods.method_named`'s NAME_seed<N>) on `track`'s data
    (claims.TRACKS; other than "size", the name starts with the track's: caption_dpo_seed1); base is one model."""
    if arm == "base":
        return arm
    name = arm if seed == 0 else f"{arm}_seed{seed}"
    return name if track == "size" else f"{track}_{name}"


def replication_arms(config: ReplicationConfig) -> dict[str, list]:
    """Every (arm, seed) the claims need, as `methods.Method`s named by `seeded`, by track; full.train arms save
    checkpoints when asked."""
    arms: dict[str, list] = {}
    for track, arm in claims_lib.arms_of(config.claims):
        for seed in config.seeds:
            method = replace(methods_lib.method_named(seeded(arm, seed)), name=seeded(arm, seed, track))
            if config.checkpoint_every and method.entry == "full.train":
                method = replace(method, flags={**method.flags, "checkpointing_steps": config.checkpoint_every})
            arms.setdefault(track, []).append(method)
    return arms


# ---------------------------------------------------------------------------------------------------------------
# Measuring a claim from scores.jsonl: {scorer: {model: {prompt_id: [score per sample seed]}}}
# ---------------------------------------------------------------------------------------------------------------


def read_scores(path: Path) -> dict:
    scores: dict = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            scores.setdefault(row["scorer"], {}).setdefault(row["model"], {}).setdefault(row["prompt_id"], []).append(
                row["score"])
    return scores


def per_caption(scores: dict, aggregate: str) -> tuple[list[str], np.ndarray]:
    """One model's captions (sorted ids) and each caption's median or mean over its sample seeds."""
    ids = sorted(scores)
    reduce = {"median": np.median, "mean": np.mean}[aggregate]
    return ids, np.array([reduce(np.asarray(scores[i], dtype=np.float64)) for i in ids])


def win_matrix(by_model: dict, a: str, b: str, seeds, aggregate: str, track: str = "size") -> np.ndarray:
    """(S, P) win indicators of A_s over B_s per caption (1, 0.5 on a tie, 0), s over the training seeds."""
    rows = []
    for seed in seeds:
        name_a, name_b = seeded(a, seed, track), seeded(b, seed, track)
        missing = [n for n in (name_a, name_b) if n not in by_model]
        if missing:
            raise ValueError(f"no scores for {missing}: evaluate every arm of the claim first")
        ids_a, med_a = per_caption(by_model[name_a], aggregate)
        ids_b, med_b = per_caption(by_model[name_b], aggregate)
        if ids_a != ids_b:
            raise ValueError(f"{name_a} and {name_b} were scored on different captions")
        rows.append(stats.win_indicators(med_a, med_b))
    return np.array(rows)


def measure_win(indicators: np.ndarray, *, n_resamples: int, confidence: float = claims_lib.CONFIDENCE) -> dict:
    """W = mean of the (S, P) indicators; CI by the two-stage bootstrap, or Clopper-Pearson on the P captions where
    the bootstrap is degenerate (every cell equal: 18/18 gives [0.815, 1], not [1, 1])."""
    n_seeds, n_prompts = indicators.shape
    estimate = float(indicators.mean())
    low, high = stats.two_stage_bootstrap_ci(indicators, n_resamples=n_resamples, confidence=confidence)
    method = "two-stage bootstrap (seeds, then captions)"
    if low == high:
        low, high = stats.clopper_pearson(int(round(estimate * n_prompts)), n_prompts, confidence)
        method = "Clopper-Pearson on the captions (the bootstrap is degenerate)"
    return {"estimate": estimate, "ci": [low, high], "ci_method": method, "seeds": n_seeds,
            "per_seed": [float(v) for v in indicators.mean(axis=1)],
            # a true W below this could not have cleared 0.5 with this CI's width
            "smallest_detectable": min(1.0, 0.5 + (high - low) / 2)}


def measure_ratio(per_seed: list[float], *, n_resamples: int, confidence: float = claims_lib.CONFIDENCE) -> dict:
    """Mean of the per-seed ratios A/B, with a percentile bootstrap over the seeds (nan ratios: no estimate)."""
    values = np.asarray(per_seed, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return {"estimate": None, "ci": [float("-inf"), float("inf")], "ci_method": "undefined (B gained nothing)",
                "seeds": len(values), "per_seed": [None if not np.isfinite(v) else float(v) for v in values]}
    rng = np.random.default_rng(stats.DEFAULT_BOOTSTRAP_SEED)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"estimate": float(values.mean()), "ci": [float(low), float(high)],
            "ci_method": "percentile bootstrap over seeds", "seeds": len(values), "per_seed": values.tolist()}


def mean_score(by_model: dict, model: str) -> float:
    """A model's mean score over every caption and sample seed ({model: {prompt_id: [score per seed]}})."""
    return float(np.mean([v for values in by_model[model].values() for v in values]))


def ratio_per_seed(claim, trained: dict, rater_scores: dict, seeds, spm_cpu_seconds: float,
                   bench: list | None = None) -> list[float]:
    """Per seed, A's quantity over B's. "step_seconds": CPU seconds of one training step of A's and B's objective
    in `bench` (one `python -m full.bench` run per seed: the trainer's step, one method after the other in one
    process, one thread's CPU time), so a busy neighbour does not decide the row. "gain_per_second": the mean area
    gain over base per CPU second of training (the arm's process, `run_entry`), SPO's including its preference
    model's (trained once, charged to every seed: the paper counts it)."""
    if claim.track != "size":  # the cost arms, SPO's preference model and the rater read here are the size track's
        raise ValueError(f"{claim.id}: cost claims are measured on the size rater's track, not {claim.track!r}")

    def quantity(arm: str, index: int, seed: int) -> float:
        if claim.ratio == "step_seconds":
            if bench is None or index >= len(bench):
                raise ValueError(f"{claim.id}: needs a full.bench run per seed; got {0 if bench is None else len(bench)}")
            return bench[index]["steps"][f"{methods_lib.method_named(arm).row}/uncached"]["ms"] / 1e3
        entry = trained[seeded(arm, seed)]
        if entry.get("cpu_seconds") is None:
            raise ValueError(f"{claim.id}: {seeded(arm, seed)} has no CPU time on record; train it again")
        seconds = entry["cpu_seconds"] + (spm_cpu_seconds if entry["command"].startswith("full.spo") else 0.0)
        return (mean_score(rater_scores, seeded(arm, seed)) - mean_score(rater_scores, "base")) / seconds

    out = []
    for index, seed in enumerate(seeds):
        a, b = quantity(claim.a, index, seed), quantity(claim.b, index, seed)
        out.append(a / b if b > 0 else float("nan"))
    return out


def measure_claims(config: ReplicationConfig, scores: dict, trained: dict, spm_cpu_seconds: float = 0.0,
                   bench: list | None = None) -> list[dict]:
    rows = []
    for claim in config.claims:
        if claim.kind in ("wins", "not_worse"):
            scorer, aggregate = claims_lib.SCORES[claim.score]
            indicators = win_matrix(scores[scorer], claim.a, claim.b, config.seeds, aggregate, claim.track)
            lab = measure_win(indicators, n_resamples=config.n_resamples)
        else:
            per_seed = ratio_per_seed(claim, trained, scores[claims_lib.SCORES["rater"][0]], config.seeds,
                                      spm_cpu_seconds, bench)
            lab = measure_ratio(per_seed, n_resamples=config.n_resamples)
        per_seed = [np.nan if v is None else v for v in lab["per_seed"]]
        verdict = claims_lib.verdict(claim.kind, lab["ci"], per_seed, min_seeds=config.min_seeds)
        rows.append({"id": claim.id, "paper": claim.paper, "claim": claim.claim, "paper_value": claim.paper_value,
                     "metric": claim.metric, "kind": claim.kind, "a": claim.a, "b": claim.b, "track": claim.track,
                     "lab": lab, "verdict": verdict})
    return rows


def track_of(model: str) -> str:
    """The track (claims.TRACKS) whose data a model of `seeded`'s naming was trained on."""
    return next((t for t in claims_lib.TRACKS if t != "size" and model.startswith(t + "_")), "size")


def checkpoint_gains(scores: dict, checkpoints: dict) -> dict:
    """Seed 0's mean gain over the base model in its track's rater score (the size rater's area, the caption
    rater's signed area) at each saved step and at the end: {arm: {step: gain, "final": gain}}."""
    def gain(model: str, arm: str) -> float:
        rater = scores[claims_lib.SCORES[claims_lib.TRACKS[track_of(arm)][0]][0]]
        return round(mean_score(rater, model) - mean_score(rater, "base"), 4)

    return {arm: {**{str(step): gain(name, arm) for step, name in steps.items()}, "final": gain(arm, arm)}
            for arm, steps in checkpoints.items()}


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------

TABLE_BEGIN, TABLE_END = "<!-- replication table: generated -->", "<!-- end of the generated table -->"


def lab_cell(row: dict) -> str:
    lab = row["lab"]
    if lab["estimate"] is None:
        return f"undefined ({lab['ci_method']})"
    return f"{lab['estimate']:.2f} [{lab['ci'][0]:.2f}, {lab['ci'][1]:.2f}], {lab['seeds']} seeds"


def verdict_cell(row: dict) -> str:
    """The verdict; an inconclusive win-rate row also says the smallest W its CI's width could have shown > 0.5."""
    detectable = row["lab"].get("smallest_detectable")
    if row["verdict"] == "inconclusive" and detectable is not None:
        return f"**inconclusive** (detectable: W >= {detectable:.2f})"
    return f"**{row['verdict']}**"


def markdown_table(result: dict) -> str:
    lines = ["| claim | paper | A vs B | paper's number | metric | lab: estimate [95% CI] | per seed | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["claims"]:
        per_seed = ", ".join("-" if v is None else f"{v:.2f}" for v in row["lab"]["per_seed"])
        lines.append(f"| {row['id']}: {row['claim']} | {row['paper']} | `{row['a']}` vs `{row['b']}` | "
                     f"{row['paper_value']} | {row['metric']} | {lab_cell(row)} | {per_seed} | {verdict_cell(row)} |")
    counts = {v: sum(r["verdict"] == v for r in result["claims"]) for v in ("holds", "reversed", "inconclusive")}
    lines += ["", f"{len(result['claims'])} claims: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "."]
    return "\n".join(lines)


def replace_table(doc: str, table: str) -> str:
    """`doc` with the text between TABLE_BEGIN and TABLE_END replaced by `table`."""
    if doc.count(TABLE_BEGIN) != 1 or doc.count(TABLE_END) != 1:
        raise ValueError(f"the document needs exactly one {TABLE_BEGIN!r} and one {TABLE_END!r}")
    head, rest = doc.split(TABLE_BEGIN)
    return head + TABLE_BEGIN + "\n" + table + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1]


def main(argv=None) -> int:
    parser = Parser(prog="python -m full.lab.replicate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/replication", help="output directory (arms' LoRAs cached there)")
    parser.add_argument("--lab", default=None, help="the lab whose model and data to reuse (default: runs/lab; "
                        "--quick: runs/lab-quick); pretrained there if missing")
    parser.add_argument("--quick", action="store_true", help="the test-sized run (3 claims, 2 seeds, the quick lab)")
    parser.add_argument("--claims", default=None, help="comma-separated claim ids (default: the config's)")
    parser.add_argument("--launcher", choices=("accelerate", "inprocess"), default="accelerate")
    parser.add_argument("--table", default=None, metavar="JSON", help="print the table of a finished run and stop")
    parser.add_argument("--docs", default=None, metavar="FILE", help="with --table: write it into FILE's markers")
    args = parser.parse_args(argv)
    if args.table:
        path = Path(args.table)
        if not path.is_file():
            parser.error(f"--table: {path} does not exist; run python -m full.lab.replicate --out DIR first")
        table = markdown_table(json.loads(path.read_text()))
        if args.docs:
            try:
                Path(args.docs).write_text(replace_table(Path(args.docs).read_text(), table))
            except (OSError, ValueError) as error:
                parser.error(f"--docs: {error}")
        print(table)
        return 0
    config = QUICK_REPLICATION if args.quick else FULL_REPLICATION
    if args.claims:
        ids = tuple(i.strip() for i in args.claims.split(",") if i.strip())
        unknown = [i for i in ids if i not in {c.id for c in claims_lib.CLAIMS}]
        if unknown:
            parser.error(f"--claims: unknown {unknown}; choose from {','.join(c.id for c in claims_lib.CLAIMS)}")
        config = replace(config, claim_ids=ids)
    lab_dir = args.lab or ("runs/lab-quick" if args.quick else "runs/lab")
    from full.lab.replicate_run import run_replication

    result = run_replication(Path(args.out), Path(lab_dir), config, launcher=args.launcher)
    print("\n" + markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
