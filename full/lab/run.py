"""The lab, stage by stage: pretrain (cached), preference data, every method, evaluation, results.json + figure.

    out/model/          the pretrained pipeline (save_pretrained) + pretrain.json     } cached: reused while
    out/clip/           the tiny CLIP (Diff-contrast's f, SPO's preference model init) } the config is unchanged
    out/data/           pairs.parquet, pairs_swapped.parquet, feedback.parquet, data.json
    out/train/NAME/     each method's LoRA (pytorch_lora_weights.safetensors), logs/ for TensorBoard
    out/logs/NAME.log   the command line and output of each subprocess
    out/eval/           full.evaluate's manifest, images, scores, its own results.json / results.md
    out/results.json    per method: win rate over the base model with CI and Wilcoxon p, caption fidelity, ...
    out/lab.png         sample grid per method (same prompts and seeds) and the win-rate bars

Evaluation is `full.evaluate` on the 18 held-out captions (`shapes.HELD_OUT_CAPTIONS`), seeds 0.. (the preference
data used seeds from 10000 on), every LoRA loaded with `pipe.load_lora_weights` by full.evaluate itself.
The two lab scorers are `full.lab.rater:Rater` and `full.lab.rater:Fidelity`.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from full.lab import methods as methods_lib
from full.lab import preferences, rater
from full.lab.presets import FAMILIES, LabConfig
from full.lab.shapes import HELD_OUT_CAPTIONS

# The lab's two scorers, as full.evaluate names them: `--scorers module.path:ClassName` is its extension point for
# any reward a user writes (full/eval/scorers.py, `scorer_factory`).
SCORERS = {"rater": "full.lab.rater:Rater", "fidelity": "full.lab.rater:Fidelity"}


class Progress:
    """One line per finished stage, with its wall time and the lab's running total."""

    def __init__(self, quiet: bool = False):
        self.start, self.quiet, self.times = time.perf_counter(), quiet, {}

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[lab {time.perf_counter() - self.start:7.1f}s] {message}", flush=True)

    def timed(self, name: str, seconds: float) -> None:
        self.times[name] = round(seconds, 1)
        self(f"{name}: done in {seconds:.1f}s")


# ---------------------------------------------------------------------------------------------------------------
# 1. Pretraining, cached
# ---------------------------------------------------------------------------------------------------------------


def cached(path: Path, marker: str, config: dict) -> bool:
    """True when `path/marker` exists and was written with the same config."""
    file = path / marker
    return file.is_file() and json.loads(file.read_text()).get("config") == json.loads(json.dumps(config))


def ensure_pretrained(out: Path, lab: LabConfig, progress: Progress) -> tuple[Path, Path]:
    from full.lab.clip import pretrain_clip

    cache_key, pretrain = family_pretraining(lab)
    config = cache_key(lab.pretrain)
    model, clip = out / "model", out / "clip"
    bar = StepLog(progress)
    if cached(model, "pretrain.json", config):
        progress(f"pretrained model: cached in {model}")
    else:
        shutil.rmtree(model, ignore_errors=True)
        report = pretrain(model, lab.pretrain, bar)
        progress.timed("pretrain", report["seconds"])
    if cached(clip, "clip.json", config):
        progress(f"CLIP: cached in {clip}")
    else:
        shutil.rmtree(clip, ignore_errors=True)
        report = pretrain_clip(clip, lab.pretrain, bar)
        report["config"] = config
        (clip / "clip.json").write_text(json.dumps(report, indent=1))
        progress.timed("clip", report["clip_seconds"])
    return model, clip


# How each model family's lab model is pretrained: the UNet, or the SD3-shaped transformer trained with flow matching
# (docs/lab_flow.md). Everything after the pretraining is the same for both.
PRETRAINING = {"sd15": "full.lab.pretrain", "sd3": "full.lab.pretrain_flow"}


def family_pretraining(lab: LabConfig):
    """`(cache_key, pretrain)` of the lab's model family (`PRETRAINING`)."""
    import importlib

    if lab.family not in PRETRAINING:
        raise ValueError(f"unknown lab family {lab.family!r}; choose one of {', '.join(PRETRAINING)}")
    module = importlib.import_module(PRETRAINING[lab.family])
    return module.cache_key, module.pretrain


class StepLog:
    """The pretraining's progress: a line every 10% of a stage."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __call__(self, stage: str, step: int, total: int, **metrics) -> None:
        if step == total or step % max(1, total // 10) == 0:
            values = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.progress(f"{stage} {step}/{total}: {values}")


# ---------------------------------------------------------------------------------------------------------------
# 2-3. Data and training
# ---------------------------------------------------------------------------------------------------------------


def ensure_preference_data(out: Path, lab: LabConfig, model: Path, progress: Progress) -> dict:
    """The base model's rated samples (cached while the model and the data settings are unchanged)."""
    cache_key, _ = family_pretraining(lab)
    settings = ("images_per_caption", "sample_steps", "guidance", "tie_rate", "label_noise", "desirable_quantile")
    config = {"model": cache_key(lab.pretrain), **{name: getattr(lab, name) for name in settings}}
    if lab.rater != "size":  # (the size rater's data keep the key they were cached under)
        config["rater"] = lab.rater
    if cached(out / "data", "data.json", config):
        progress(f"preference data: cached in {out / 'data'}")
        return json.loads((out / "data" / "data.json").read_text())
    for stale in ("data", "train"):  # LoRAs trained on other data are stale too
        shutil.rmtree(out / stale, ignore_errors=True)
    start = time.perf_counter()
    data = preferences.make_preference_data(model, out / "data", images_per_caption=lab.images_per_caption,
                                            steps=lab.sample_steps, guidance=lab.guidance, tie_rate=lab.tie_rate,
                                            label_noise=lab.label_noise, desirable_quantile=lab.desirable_quantile,
                                            rater=lab.rater, log=progress)
    data["config"] = config
    (out / "data" / "data.json").write_text(json.dumps(data, indent=1))
    progress.timed("preference data", time.perf_counter() - start)
    return data


def in_parallel(jobs: list, run, workers: int) -> list:
    """`run(job)` for every job, `workers` at a time (threads that wait on subprocesses), results in job order."""
    if workers <= 1:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, jobs))


def train_all(out: Path, lab: LabConfig, model: Path, clip: Path, data: dict, *, launcher: str,
              progress: Progress, selected: list | None = None, on_done=None, need_cpu: frozenset = frozenset()
              ) -> dict[str, dict]:
    """Train every selected method (`selected`: Method objects; default `lab.methods` by name); returns
    {name: {"lora": dir, "seconds": s, "cpu_seconds": s or None, "command": ...}}. `on_done(name)` hears each
    finished (or cached) method. A cached LoRA of a method in `need_cpu` that has no CPU time on record (cached
    before CPU times were kept) is trained again (so is SPO's preference model, for an SPO arm in it)."""
    if selected is None:
        names = lab.methods or [m.name for m in methods_lib.all_methods()]
        selected = [methods_lib.method_named(name) for name in names]  # in the order asked for
    spm = out / "train" / "spm"
    # Subprocesses run `lab.workers` at once with one thread each; in this process, one at a time.
    workers, threads = (lab.workers, 1) if launcher != "inprocess" else (1, None)

    # SPO's preference model, shared by every SPO arm, is decided and trained before any arm starts (an arm that
    # needs SPO's CPU time needs the model's too); the SPO arms of a model trained now are trained again
    spo_names = {m.name for m in selected if m.entry == "full.spo"}
    record = spm / "lab_spm.json"
    timed = record.is_file() and json.loads(record.read_text()).get("cpu_seconds") is not None
    retrain: set = set()
    if spo_names and (not (spm / "spm_config.json").is_file() or (spo_names & need_cpu and not timed)):
        shutil.rmtree(spm, ignore_errors=True)
        argv = methods_lib.spm_argv(lab, model, clip, Path(data["pairs"]), spm)
        seconds, cpu = methods_lib.run_entry("full.train_spm", argv, launcher=launcher, threads=threads,
                                             log_file=out / "logs" / "spm.log")
        progress.timed("train_spm", seconds)
        record.write_text(json.dumps({"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}))
        retrain = spo_names

    def train(method) -> dict:
        target = out / "train" / method.name
        argv = methods_lib.trainer_argv(method, lab, model, clip, spm, data, target)
        argv += methods_lib.flag_list(dict(lab.trainer_flags))  # the lab family's own flags (sd3: T5 length)
        entry = {"lora": str(target), "family": method.family, "prompt_prefix": method.prompt_prefix,
                 "command": f"{method.entry} " + " ".join(argv),
                 "weights": "--full_model" if method.flags.get("train_mode") == "full" else "--lora"}
        # A LoRA trained by this very command on this data is reused (the data's cache clears train/ when it changes)
        if cached(target, "lab_train.json", entry["command"]):
            done = json.loads((target / "lab_train.json").read_text())
            if method.name not in retrain and (method.name not in need_cpu or done.get("cpu_seconds") is not None):
                progress(f"train {method.name}: cached in {target}")
                if on_done is not None:
                    on_done(method.name)
                return {**entry, "seconds": done["seconds"], "cpu_seconds": done.get("cpu_seconds")}
        shutil.rmtree(target, ignore_errors=True)
        seconds, cpu = methods_lib.run_entry(method.entry, argv, launcher=launcher, threads=threads,
                                             log_file=out / "logs" / f"{method.name}.log")
        progress.timed(f"train {method.name}", seconds)
        entry["seconds"], entry["cpu_seconds"] = round(seconds, 1), round(cpu, 1)
        (target / "lab_train.json").write_text(json.dumps({"config": entry["command"], "seconds": entry["seconds"],
                                                           "cpu_seconds": entry["cpu_seconds"]}))
        if on_done is not None:
            on_done(method.name)
        return entry

    return {m.name: entry for m, entry in zip(selected, in_parallel(selected, train, workers))}


# ---------------------------------------------------------------------------------------------------------------
# 4. Evaluation through full.evaluate
# ---------------------------------------------------------------------------------------------------------------


def evaluation_runs(trained: dict, workers: int, with_base: bool = True) -> list[dict]:
    """How the models are split over full.evaluate runs: the base model (unless `with_base` is False) and the
    LoRAs sampled with the plain caption dealt over `workers` runs, and one run per prompt prefix (CSFT samples
    "good image, <caption>")."""
    plain = ["base"] * with_base + [name for name, entry in trained.items() if not entry["prompt_prefix"]]
    runs = [{"name": f"part{i}", "prefix": "", "models": plain[i::workers]} for i in range(workers)]
    for prefix in dict.fromkeys(entry["prompt_prefix"] for entry in trained.values() if entry["prompt_prefix"]):
        models = [name for name, entry in trained.items() if entry["prompt_prefix"] == prefix]
        runs.append({"name": "prefix_" + "_".join(models), "prefix": prefix, "models": models})
    return [r for r in runs if r["models"]]


def evaluate(out: Path, lab: LabConfig, model: Path, trained: dict, *, launcher: str,
             scorers=tuple(SCORERS.values()), eval_dir: Path | None = None, report: bool = True,
             with_base: bool = True) -> dict | None:
    """full.evaluate on the held-out captions: generate (every LoRA loaded by it) and score in one or more runs,
    then one report over all of them (the runs' manifests and scores merged: a comparison pairs images by prompt
    id and seed, so CSFT's prefixed prompts are compared with the base model's plain ones). `with_base` False: the
    LoRAs only (the caller has the base model's scores)."""
    from full import evaluate as evaluate_entry

    eval_dir = eval_dir or out / "eval"
    shutil.rmtree(eval_dir, ignore_errors=True)  # a stale image of a retrained LoRA must not be reused
    eval_dir.mkdir(parents=True)
    workers, threads = (lab.workers, 1) if launcher != "inprocess" else (1, None)
    runs = evaluation_runs(trained, workers, with_base)

    def generate_and_score(run: dict) -> None:
        run_dir = eval_dir / run["name"]
        run_dir.mkdir()
        prompts = run_dir / "held_out_prompts.txt"
        prompts.write_text("".join(f"p{i:02d}\t{run['prefix']}{c}\n" for i, c in enumerate(HELD_OUT_CAPTIONS)))
        argv = ["--out", str(run_dir), "--base_model", str(model), "--prompts", str(prompts),
                "--seeds", str(lab.eval_seeds), "--steps", str(lab.sample_steps), "--guidance", str(lab.guidance),
                "--batch_size", "64", "--device", "cpu", "--stages", "generate,score",
                "--scorers", ",".join(scorers)]
        argv += [] if "base" in run["models"] else ["--no_base"]
        argv += [arg for name in run["models"] if name != "base"  # a LoRA, or a whole UNet (--train_mode full)
                 for arg in (trained[name].get("weights", "--lora"), f"{name}={trained[name]['lora']}")]
        methods_lib.run_entry("full.evaluate", argv, launcher=launcher, threads=threads,
                              log_file=out / "logs" / f"eval_{run['name']}.log")

    in_parallel(runs, generate_and_score, workers)
    for kind in ("manifest", "scores"):  # one manifest and one score file; image paths relative to eval_dir
        with (eval_dir / f"{kind}.jsonl").open("w") as merged:
            for run in runs:
                for line in (eval_dir / run["name"] / f"{kind}.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    if kind == "manifest":
                        row["path"] = f"{run['name']}/{row['path']}"
                    merged.write(json.dumps(row) + "\n")
    if not report:  # the caller computes its own statistics from scores.jsonl
        return None
    return evaluate_entry.main(["--out", str(eval_dir), "--stages", "report", "--grid_prompts", "0"])


def lab_results(summary: dict, trained: dict, base_name: str = "base") -> dict:
    """results.json's shape: {"methods": {NAME: {win_rate, ci, wilcoxon_p, fidelity, ...}}, "base": {...}}."""
    reward, fidelity = SCORERS["rater"], SCORERS["fidelity"]
    means = summary["means"]
    versus_base = {c["model"]: c for c in summary["win_rates"][reward] if c["baseline"] == base_name}
    fidelity_versus_base = {c["model"]: c for c in summary["win_rates"][fidelity] if c["baseline"] == base_name}
    methods = {}
    for name, entry in trained.items():
        comparison = versus_base[name]
        methods[name] = {
            "win_rate": comparison["win_rate"], "ci": [comparison["ci_low"], comparison["ci_high"]],
            "wilcoxon_p": comparison["wilcoxon"]["p_value"],
            "fidelity": means[fidelity][name]["mean"],
            "fidelity_win_rate": fidelity_versus_base[name]["win_rate"],
            "mean_score": means[reward][name]["mean"], "score_std": means[reward][name]["std"],
            "train_seconds": entry["seconds"], "family": entry["family"],
            "preset": FAMILIES[entry["family"]]["reason"], "command": entry["command"],
        }
    base = {"fidelity": means[fidelity][base_name]["mean"], "mean_score": means[reward][base_name]["mean"],
            "score_std": means[reward][base_name]["std"], "n_images": means[reward][base_name]["n_images"],
            "n_prompts": means[reward][base_name]["n_prompts"]}
    return {"methods": methods, "base": base}


def attribute_accuracy(eval_dir: Path, model_name: str = "base") -> dict:
    """Per attribute, how often the reader finds the caption's colour, shape and background (base samples)."""
    from PIL import Image

    rows = [json.loads(line) for line in (eval_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["model"] == model_name]
    return rater.attribute_rates([Image.open(eval_dir / r["path"]) for r in rows], [r["prompt"] for r in rows])


# ---------------------------------------------------------------------------------------------------------------
# Everything
# ---------------------------------------------------------------------------------------------------------------


def run_lab(out, lab: LabConfig, *, launcher: str = "accelerate", quiet: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(quiet)
    progress(f"lab '{lab.name}' in {out} (launcher: {launcher})")
    model, clip = ensure_pretrained(out, lab, progress)
    data = ensure_preference_data(out, lab, model, progress)
    trained = train_all(out, lab, model, clip, data, launcher=launcher, progress=progress)
    start = time.perf_counter()
    summary = evaluate(out, lab, model, trained, launcher=launcher)
    progress.timed("evaluate", time.perf_counter() - start)
    results = lab_results(summary, trained)
    results["base"]["attributes"] = attribute_accuracy(out / "eval")
    results["base"]["pretrain"] = json.loads((model / "pretrain.json").read_text())
    results["base"]["clip"] = json.loads((clip / "clip.json").read_text())
    results["data"] = data
    results["lab"] = {k: v for k, v in asdict(lab).items() if k != "pretrain"}
    results["stage_seconds"] = progress.times
    results["wall_s"] = round(time.perf_counter() - progress.start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from full.lab.figure import lab_figure

    lab_figure(out / "eval", results, out / "lab.png")
    progress(f"wrote {out / 'results.json'} and {out / 'lab.png'} ({results['wall_s']:.0f}s)")
    return results
