"""The replication run, stage by stage (`python -m full.lab.replicate`; the CLI and the statistics are in
full/lab/replicate.py, the claims and the rule in full/lab/claims.py):

    LAB/model, LAB/clip, LAB/data   the lab's pretrained pipeline, CLIP and preference data (reused; made if missing)
    OUT/train/NAME/                 each (arm, seed)'s LoRA, cached by its command (quick: LAB/train, the lab's own)
    OUT/caption/data, train/        the caption rater's preference data (the same base samples) and its arms' LoRAs
    OUT/bench/runN.json             full.bench's step times, one run per seed (the step-cost claim)
    OUT/eval/batch-NNN/             full.evaluate's images and scores, evaluated once per model's weights
    OUT/eval/scores.jsonl           every model's current scores (merged; OUT/eval/evaluated.json says from where)
    OUT/replication.json            rule, claims with estimate, CI, per-seed values and verdict, checkpoints, cost
    OUT/replication.md, .png        the table (replicate.markdown_table) and the figure
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from full.lab import claims as claims_lib
from full.lab import methods as methods_lib
from full.lab import run as lab_run
from full.lab.presets import FAMILIES
from full.lab.replicate import (ReplicationConfig, checkpoint_gains, markdown_table, measure_claims, read_scores,
                                replication_arms, seeded, track_of)


def checkpoint_models(trained: dict, every: int, seed0_names: set) -> tuple[dict, dict]:
    """{arm: {step: model name}} and {model name: LoRA entry}: seed 0's LoRAs saved every `every` steps before the
    end (the last checkpoint is the final LoRA), for every arm that saved them."""
    found, loras = {}, {}
    for name, entry in trained.items():
        if not every or name not in seed0_names:
            continue
        saved = sorted(int(p.name.split("-")[1]) for p in Path(entry["lora"]).glob("checkpoint-*")
                       if (p / "pytorch_lora_weights.safetensors").is_file())
        for step in [s for s in saved if s % every == 0 and s < saved[-1]]:  # the last save is at the end
            found.setdefault(name, {})[step] = f"{name}_step{step}"
            loras[f"{name}_step{step}"] = {**entry, "lora": str(Path(entry["lora"]) / f"checkpoint-{step}")}
    return found, loras


def run_replication(out: Path, lab_dir: Path, config: ReplicationConfig, *, launcher: str = "accelerate",
                    quiet: bool = False) -> dict:
    from full.progress import progress_bar

    out.mkdir(parents=True, exist_ok=True)
    progress = lab_run.Progress(quiet)
    progress(f"replication '{config.name}': {len(config.claims)} claims, seeds {list(config.seeds)}, lab {lab_dir}")
    model, clip = lab_run.ensure_pretrained(lab_dir, config.lab, progress)
    lab_data = lab_run.ensure_preference_data(lab_dir, config.lab, model, progress)
    forget_other_labs(out, lab_data, progress)
    arms = replication_arms(config)
    # the arms whose CPU time a cost claim reads (a cached arm without one is trained again)
    need_cpu = frozenset(seeded(arm, seed) for c in config.claims if c.ratio == "gain_per_second"
                         for arm in (c.a, c.b) for seed in config.seeds)
    start, trained, spm_cpu = time.perf_counter(), {}, 0.0
    with progress_bar(total=sum(map(len, arms.values())), desc="train arms", unit="arm", disable=quiet) as bar:
        for track, methods in arms.items():
            root, data = track_data(track, out, lab_dir, lab_data, config, model, progress)
            trained.update(lab_run.train_all(root, replace(config.lab, rater=track), model, clip, data,
                                             launcher=launcher, progress=progress, selected=methods,
                                             on_done=lambda name: bar.update(1), need_cpu=need_cpu))
            spm_file = root / "train" / "spm" / "lab_spm.json"
            if track == "size" and spm_file.is_file():
                spm_cpu = json.loads(spm_file.read_text()).get("cpu_seconds") or 0.0
    progress.timed("train", time.perf_counter() - start)
    bench = step_benchmarks(out, config, progress)
    seed0 = {seeded(arm, 0, track) for track, arm in claims_lib.arms_of(config.claims)}
    checkpoints, checkpoint_loras = checkpoint_models(trained, config.checkpoint_every, seed0)
    start = time.perf_counter()
    evaluate_cached(out, config, model, {**trained, **checkpoint_loras}, launcher, progress)
    progress.timed("evaluate", time.perf_counter() - start)
    scores = read_scores(out / "eval" / "scores.jsonl")
    rows = measure_claims(config, scores, trained, spm_cpu, bench)
    result = {
        "rule": claims_lib.RULE, "min_seeds": config.min_seeds, "claims": rows,
        "checkpoints": checkpoint_gains(scores, checkpoints),
        "arms": {name: {"seconds": e["seconds"], "cpu_seconds": e.get("cpu_seconds"), "command": e["command"]}
                 for name, e in trained.items()},
        "spm_cpu_seconds": spm_cpu, "bench": bench,
        "config": {"name": config.name, "seeds": list(config.seeds), "checkpoint_every": config.checkpoint_every,
                   "n_resamples": config.n_resamples, "lab_dir": str(lab_dir),
                   "lab": {k: v for k, v in asdict(config.lab).items() if k != "pretrain"}},
        "stage_seconds": progress.times,
    }
    result["wall_s"] = round(time.perf_counter() - progress.start, 1)
    if config.calibrate:  # the repository's fixed CPU workload, right after the run (docs/benchmarks.md)
        from toy.calib import measure

        result["calibration_s"] = round(measure(), 2)
        result["wall_calibration_units"] = round(result["wall_s"] / result["calibration_s"], 1)
    (out / "replication.json").write_text(json.dumps(result, indent=1))
    (out / "replication.md").write_text(markdown_table(result) + "\n")
    replication_figure(result, out / "replication.png")
    if result["checkpoints"]:
        checkpoint_figure(result, out / "checkpoints.png")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("holds", "reversed", "inconclusive")}
    progress(f"wrote {out / 'replication.json'}: {counts} ({result['wall_s']:.0f}s)")
    return result


def forget_other_labs(out: Path, lab_data: dict, progress) -> None:
    """OUT's trained arms and evaluations belong to one lab model and its data (their caches are keyed by command
    and by weights, which do not name the model's contents): when the lab's data were made anew (a new model, new
    data settings) since OUT was last used, they are removed."""
    key_file, key = out / "lab_data.json", lab_data["config"]
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        progress(f"the lab's model or data changed since {out} was made: its arms and evaluations are removed")
        for stale in ("train", "caption", "eval", "bench"):
            shutil.rmtree(out / stale, ignore_errors=True)
    key_file.write_text(json.dumps(key))


def track_data(track: str, out: Path, lab_dir: Path, lab_data: dict, config: ReplicationConfig, model: Path,
               progress) -> tuple:
    """(where the track's arms train, its preference data): the lab's own data for "size" (in OUT/train, or the
    lab's train/ for the quick run); for another rater, the same base model's samples labelled by it, in OUT/TRACK."""
    if track == "size":
        return (lab_dir if config.train_in_lab else out), lab_data
    root = out / track
    return root, lab_run.ensure_preference_data(root, replace(config.lab, rater=track), model, progress)


def step_benchmarks(out: Path, config: ReplicationConfig, progress) -> list:
    """One `python -m full.bench` run per training seed for the step-cost claims: the trainer's own step of each
    claim's objectives on full.bench's tiny UNet (the lab's model's size) at the lab's batch, one thread, one after
    the other in one fresh process; its CPU time, which a busy neighbour does not stretch. The tiny UNet stands in
    for the lab's model (channels 32/64 as the lab's, but cross-attention width 32 against 64 and 16 x 16 latents
    against 8 x 8): the row compares two objectives' steps on one network, not the lab's own step time."""
    rows = sorted({methods_lib.method_named(arm).row for c in config.claims if c.ratio == "step_seconds"
                   for arm in (c.a, c.b)})
    if not rows:
        return []
    batch = str(FAMILIES["reference"]["flags"]["train_batch_size"])
    runs = []
    for index, _ in enumerate(config.seeds):
        path = out / "bench" / f"run{index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--config", "tiny", "--resolution", "32", "--batch_size", batch, "--threads", "1", "--steps", "15",
                "--warmup", "3", "--methods", *rows, "--out", str(path)]
        # always a fresh process (in this one, full.bench would set the caller's torch threads to 1)
        methods_lib.run_entry("full.bench", argv, launcher="accelerate", log_file=out / "logs" / f"bench{index}.log")
        runs.append(json.loads(path.read_text()))
    progress(f"full.bench: {len(runs)} runs of {', '.join(rows)}")
    return runs


def weights_digest(path: Path) -> str:
    """sha256 of a model's weights: a LoRA folder's pytorch_lora_weights.safetensors, else every .safetensors under
    the folder (a pipeline, a whole UNet). A model retrained to the same weights keeps its evaluation."""
    from full.eval.loras import file_sha256, files_sha256

    path = Path(path)
    lora = path / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        return file_sha256(lora)
    files = sorted(path.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files_sha256(files, path)


def evaluate_cached(out: Path, config: ReplicationConfig, model: Path, models: dict, launcher: str, progress) -> None:
    """full.evaluate on every model not yet evaluated with these weights, sampler settings and scorers; then
    OUT/eval/scores.jsonl and manifest.jsonl merged from the batches that hold each model's current evaluation.

    OUT/eval/evaluated.json records, per model, the key it was evaluated under (weights digest, prompt prefix,
    sampler settings), its scorers and the batch folder (OUT/eval/batch-NNN) holding its images and scores. A
    retrained arm with new weights, a new sampler setting or a missing scorer is evaluated again; nothing else."""
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    record_file = eval_dir / "evaluated.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    sampler = {"eval_seeds": config.lab.eval_seeds, "sample_steps": config.lab.sample_steps,
               "guidance": config.lab.guidance}
    specs = lambda names: list(dict.fromkeys(claims_lib.SCORES[s][0] for n in names  # noqa: E731
                                             for s in claims_lib.TRACKS[n]))
    tracks = {name: track_of(name) for name in models}
    wanted = {name: {"key": {"weights": weights_digest(entry["lora"]), "prefix": entry["prompt_prefix"], **sampler},
                     "scorers": specs([tracks[name]])} for name, entry in models.items()}
    wanted["base"] = {"key": {"weights": weights_digest(model), "prefix": "", **sampler},
                      "scorers": specs(sorted(set(tracks.values())))}
    stale = [name for name, want in wanted.items() if name not in record or record[name]["key"] != want["key"]
             or not set(want["scorers"]) <= set(record[name]["scorers"])]
    progress(f"evaluate {len(stale)} of {len(wanted)} models with full.evaluate ({len(wanted) - len(stale)} cached)")
    groups: dict = {}
    for name in stale:
        groups.setdefault(tuple(wanted[name]["scorers"]), []).append(name)
    for scorers, names in groups.items():
        batch = f"batch-{1 + max([int(b[6:]) for b in {r['dir'] for r in record.values()}] or [0]):03d}"
        lab_run.evaluate(out, config.lab, model, {n: models[n] for n in names if n != "base"}, launcher=launcher,
                         scorers=scorers, eval_dir=eval_dir / batch, report=False, with_base="base" in names)
        record.update({n: {**wanted[n], "dir": batch} for n in names})
        record_file.write_text(json.dumps(record, indent=1))  # a crash keeps the batches already done
    for kind in ("scores", "manifest"):
        with (eval_dir / f"{kind}.jsonl").open("w") as merged:
            for batch in sorted({record[n]["dir"] for n in wanted}):
                for line in (eval_dir / batch / f"{kind}.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    if row.get("model") in wanted and record[row["model"]]["dir"] == batch:
                        if kind == "manifest":
                            row["path"] = f"{batch}/{row['path']}"
                        merged.write(json.dumps(row) + "\n")


VERDICT_COLOURS = {"holds": "tab:green", "reversed": "tab:red", "inconclusive": "tab:gray"}


def replication_figure(result: dict, path: Path) -> Path:
    """One row per claim: the lab's estimate with its 95% CI against the no-effect line (0.5 for a win rate, 1 for
    a ratio), coloured by verdict, and the paper's number written beside it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = result["claims"]
    fig = Figure(figsize=(13, 0.42 * len(rows) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    for y, row in enumerate(rows):
        lab, ratio = row["lab"], row["kind"].startswith("ratio")
        colour = VERDICT_COLOURS[row["verdict"]]
        if lab["estimate"] is not None:  # a ratio is drawn as log2(ratio)/4 + 0.5: 1 on the 0.5 line, 2x at 0.75
            tx = (lambda v: min(1.0, max(0.0, 0.5 + math.log2(max(v, 1e-3)) / 4))) if ratio else \
                (lambda v: min(1.0, max(0.0, v)))  # noqa: E731
            ax.plot([tx(lab["ci"][0]), tx(lab["ci"][1])], [y, y], color=colour, lw=3)
            ax.plot([tx(lab["estimate"])], [y], "o", color=colour)
        ax.text(1.03, y, f"paper: {row['paper_value']}", va="center", fontsize=7, transform=ax.get_yaxis_transform())
    ax.axvline(0.5, color="black", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['id']}: {r['a']} vs {r['b']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("lab estimate, 95% CI: win rate W(A, B) (0.5 = no difference); ratio rows: 0.5 + log2(A/B)/4")
    ax.legend(handles=[Patch(color=c, label=v) for v, c in VERDICT_COLOURS.items()], loc="lower left", fontsize=7)
    fig.subplots_adjust(left=0.3, right=0.68)
    fig.savefig(path, dpi=120)
    return path


def checkpoint_figure(result: dict, path: Path) -> Path:
    """Seed 0's gain over the base model along training, one line per arm, one panel per track: an order that a
    saturated final hides shows before the end."""
    import re

    from matplotlib.figure import Figure

    by_track: dict = {}
    for arm, gains in result["checkpoints"].items():
        by_track.setdefault(track_of(arm), {})[arm] = gains
    fig = Figure(figsize=(5.5 * len(by_track), 4.2))
    for index, (track, arms) in enumerate(sorted(by_track.items(), key=lambda kv: kv[0] != "size")):
        ax = fig.add_subplot(1, len(by_track), index + 1)
        for line, (arm, gains) in enumerate(arms.items()):
            found = re.search(r"--max_train_steps (\d+)", result["arms"][arm]["command"])
            end = int(found[1]) if found else max(int(k) for k in gains if k != "final") + 1
            steps = sorted(int(k) for k in gains if k != "final")
            ax.plot([0, *steps, end], [0.0, *(gains[str(k)] for k in steps), gains["final"]], marker="o",
                    ls="-" if line < 10 else "--",  # matplotlib's 10 colours, then dashed
                    label=arm.removeprefix(track + "_") if track != "size" else arm)
        ax.axhline(0, color="black", lw=0.8)
        score = claims_lib.SCORES[claims_lib.TRACKS[track][0]][0].split(":")[1]
        ax.set_title(f"{track} rater's data: seed 0's gain over base ({score})", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
