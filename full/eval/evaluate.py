"""
# Evaluate aligned models: generate with fixed seeds, score with reward models, compare with statistics

    python -m full.evaluate --base_model runwayml/stable-diffusion-v1-5 \\
        --lora dpo=runs/dpo/final --lora kto=runs/kto/final \\
        --prompts paper000 --scorers pickscore,clip --out eval/sd15

On several GPUs, `accelerate launch -m full.evaluate ...` (same flags): process p of P generates every P-th image
of each model, with the same seed per (prompt, seed) as one process would, so the images are the same; the
processes' manifest parts are merged, then process p scores every P-th image of the merged manifest and the main
process merges the scores and writes the report. The scorers are loaded once before anything is generated: one
that cannot load stops the run at once.

Three stages, each reading what the previous one wrote under `--out`, so any of them can be re-run alone
(`--stages score,report` rescores without regenerating):

1. **generate**: every model (the base, then each LoRA loaded with `pipe.load_lora_weights`) draws
   `--seeds` images per prompt (5 by default, as Diffusion-KTO App. 0.A). Image `(prompt, seed)` starts from
   its own CPU `torch.Generator(seed)`, so it is the same whatever the batch size or device, and every model
   gets the same seeds (a paired comparison). Each image is written to `images/<model>/` and appended to
   `manifest.jsonl` with its prompt, seed, model and sampler settings; a re-run skips what is there, unless other
   weights drew it (each row records the LoRA file's sha256 and the base model's identity, `full/eval/loras.py`:
   a LoRA retrained in place gets new images).
2. **score** (`full/eval/scoring.py`): the scorers of `full/eval/scorers.py` score every image of the manifest
   into `scores.jsonl`; with `--fid_reference DIR`, the FID of each model's images against that folder (paper
   002's style alignment) goes to `fid.json`.
3. **report**: `full/eval/stats.py` turns the scores into `results.json` and `results.md` (mean +- std as paper
   000 Table 1, win rates with bootstrap CIs as Diffusion-KTO Table 1, Wilcoxon p-values) and
   `full/eval/plots.py` draws `plots/` and one image grid per prompt in `grids/`.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from full.eval.checks import check_focus, check_paths
from full.eval import plots as eval_plots
from full.eval import scorers, stats
from full.eval.generate import (IDENTITY_KEYS, SETTING_KEYS, default_resolution, file_stem, generate,  # noqa: F401
                                load_pipeline, load_prompts, merge_manifest_parts, parse_models,
                                read_jsonl, read_manifest, resolve_loras)
from full.paths import model_fingerprint
from full.eval.scoring import fid_per_model, score_across_processes, score_manifest  # noqa: F401  (the API)

from full.eval.config import DEFAULT_GUIDANCE, DEFAULT_SEEDS, DEFAULT_STEPS, EvalConfig  # noqa: F401  (the API)

# ----------------------------------------------------------------------------------------------
# Stage 3: statistics, tables and plots.


def report(out: Path, *, focus: str | None = None, n_resamples: int = stats.DEFAULT_RESAMPLES,
           confidence: float = stats.DEFAULT_CONFIDENCE, bootstrap_seed: int = stats.DEFAULT_BOOTSTRAP_SEED,
           zero_method: str = "wilcox", grid_prompts: int = 4) -> dict:
    manifest = read_manifest(out)
    scores = read_jsonl(out / "scores.jsonl")
    if not scores:
        raise ValueError(f"{out / 'scores.jsonl'} is empty or missing: run the score stage first")
    images = {(r["model"], r["prompt_id"], r["seed"]) for r in manifest}
    for scorer in dict.fromkeys(r["scorer"] for r in scores):  # every image scored, or the medians mislead
        missing = images - {(r["model"], r["prompt_id"], r["seed"]) for r in scores if r["scorer"] == scorer}
        if missing:
            raise ValueError(f"scorer {scorer} has no score for {len(missing)} image(s), e.g. {sorted(missing)[0]}; "
                             f"re-run --stages score --scorers {scorer}")
    models = list(dict.fromkeys([r["model"] for r in manifest] + [r["model"] for r in scores]))
    all_scores: dict = {}  # scorer -> model -> prompt_id -> [score per seed, in seed order]
    for r in sorted(scores, key=lambda r: (r["prompt_id"], r["seed"])):
        by_model = all_scores.setdefault(r["scorer"], {})
        by_model.setdefault(r["model"], {}).setdefault(r["prompt_id"], []).append(r["score"])
    # Models in manifest order (base first), so "later vs. earlier" means "LoRA vs. base".
    all_scores = {s: {m: by_model[m] for m in models if m in by_model} for s, by_model in all_scores.items()}
    summary = stats.summarize(all_scores, focus=focus, n_resamples=n_resamples, confidence=confidence,
                              seed=bootstrap_seed, zero_method=zero_method)
    settings = {}
    for r in manifest:
        settings.setdefault(r["model"], {k: r.get(k) for k in SETTING_KEYS + IDENTITY_KEYS})
    summary["generation"] = {"models": settings,
                             "seeds": sorted({r["seed"] for r in manifest}),
                             "n_prompts": len({r["prompt_id"] for r in manifest})}
    for name in ("skipped_scorers", "fid"):
        path = out / f"{name}.json"
        summary[name] = json.loads(path.read_text()) if path.is_file() else {}
    (out / "results.json").write_text(json.dumps(summary, indent=1))

    lines = [f"# Evaluation of {', '.join(models)}", ""]
    any_settings = next(iter(settings.values()), {})
    lines += [f"{summary['generation']['n_prompts']} prompts x {len(summary['generation']['seeds'])} seeds "
              f"{summary['generation']['seeds']}; scheduler {any_settings.get('scheduler')}, "
              f"{any_settings.get('steps')} steps, guidance {any_settings.get('guidance')}, "
              f"{any_settings.get('width')}x{any_settings.get('height')} px.", "", stats.markdown_tables(summary)]
    for name, reason in summary["skipped_scorers"].items():
        lines.append(f"Skipped scorer {name}: {reason}")
    if summary["fid"]:
        lines += ["", f"FID against {summary['fid']['reference']}:", ""]
        for model, entry in summary["fid"]["models"].items():
            value = f"{entry['fid']:.2f}" if entry["fid"] is not None else f"unavailable ({entry['unavailable']})"
            lines.append(f"- {model}: {value} ({entry['n_generated']} generated, {entry['n_reference']} reference images)")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    eval_plots.plot_means(summary, out / "plots" / "means.png")
    eval_plots.plot_distributions(all_scores, out / "plots" / "distributions.png")
    if any(summary["win_rates"].values()):
        eval_plots.plot_win_rates(summary, out / "plots" / "win_rates.png")
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in manifest))[:grid_prompts]
    for pid in prompt_ids:
        rows = sorted((r for r in manifest if r["prompt_id"] == pid), key=lambda r: r["seed"])
        images = {m: [str(out / r["path"]) for r in rows if r["model"] == m] for m in models}
        eval_plots.plot_image_grid(rows[0]["prompt"], {m: p for m, p in images.items() if p},
                                   out / "grids" / f"{file_stem(pid)}.png", seeds=sorted({r["seed"] for r in rows}))
    return summary


# ----------------------------------------------------------------------------------------------
# Command line.


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(stages) - {"generate", "score", "report"}
    if unknown or not stages:
        raise ValueError(f"--stages: unknown {sorted(unknown)}; choose from generate, score, report")
    return stages


def scorer_options(config: EvalConfig, device: str) -> tuple[list[str], dict]:
    """The --scorers names (checked) and each scorer's build options."""
    names = [n.strip() for n in config.scorers.split(",") if n.strip()]
    for name in names:
        scorers.scorer_factory(name)  # a typo or an unimportable module:Class stops here, before any generation
    common = {"device": device}
    options = {"pickscore": {"model": config.pickscore_model, "processor": config.pickscore_processor, **common},
               "clip": {"model": config.clip_model, **common},
               "aesthetic": {"head": config.aesthetic_head, "clip_model": config.aesthetic_clip_model, **common},
               "hpsv2": {"version": config.hpsv2_version},
               "imagereward": {"model": config.imagereward_model, **common}}
    return names, options


def check_scorers(names: list[str], options: dict) -> None:
    """Load each scorer once and drop it, before any image is generated: a model that is not on disk and not
    reachable (offline, a typo) stops the run here with one line. Optional scorers that are not installed are
    announced now and skipped later, as the score stage does."""
    for name in names:
        try:
            scorer = scorers.build_scorer(name, **options.get(name, {}))
        except scorers.ScorerUnavailable as error:
            print(f"scorer {name} will be skipped: {error}", file=sys.stderr)
            continue
        except Exception as error:  # OSError from the Hub, a bad checkpoint, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"scorer {name} cannot be loaded ({type(error).__name__}: {first}); nothing was "
                             f"generated. Give its model as a local path (--{name}_model ...) or leave it out of "
                             "--scorers") from error
        del scorer
    gc.collect()


def run(config: EvalConfig) -> dict | None:
    stages = parse_stages(config.stages)
    check_focus(config, stages)
    check_paths(config)  # last: it creates --out
    out = Path(config.out).expanduser()  # created and checked writable by check_paths
    import torch

    from full.processes import process_state

    state = process_state()  # one process, or those of `accelerate launch -m full.evaluate`
    device = config.device or (str(state.device) if state.num_processes > 1 else scorers.default_device())
    names, options = scorer_options(config, device) if "score" in stages else ([], {})
    if "generate" in stages:
        if not config.base_model:
            raise ValueError("the generate stage needs --base-model / --base_model (a diffusers pipeline dir or hub id)")
        models = parse_models(config.lora, config.base_name, not config.no_base, full_models=config.full_model)
        prompts = load_prompts(config.prompts, config.prompt_column, config.max_prompts)
        models = resolve_loras(models, config.base_model)  # a bad --lora stops here, before any model loads
        seeds = list(range(config.seed_start, config.seed_start + config.seeds))
        dtype = config.dtype if config.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
        pipe = load_pipeline(config.base_model, scheduler=config.scheduler, dtype=dtype, device=device,
                             safety_checker=not config.no_safety_checker)
        if names:  # a scorer that cannot load fails now, not after hours of generation
            check_scorers(names, options)
        settings = {"base_model": config.base_model, "scheduler": type(pipe.scheduler).__name__, "steps": config.steps,
                    "guidance": config.guidance, "height": config.height or default_resolution(pipe),
                    "width": config.width or default_resolution(pipe), "negative_prompt": config.negative_prompt,
                    "dtype": dtype, "base_model_identity": model_fingerprint(config.base_model)}
        print(f"generating {len(models)} model(s) x {len(prompts)} prompts x {len(seeds)} seeds {seeds}: "
              f"scheduler={settings['scheduler']}{'' if config.scheduler else ' (pipeline default)'}, "
              f"steps={config.steps}, guidance={config.guidance}, {settings['width']}x{settings['height']} px, {dtype}")
        made = generate(pipe, models, prompts, seeds, out, settings=settings, batch_size=config.batch_size,
                        lora_scale=config.lora_scale, process_index=state.process_index,
                        num_processes=state.num_processes)
        print(f"process {state.process_index}: generated {made} new image(s)" if state.num_processes > 1 else
              f"generated {made} new image(s); manifest: {out / 'manifest.jsonl'}")
        del pipe
        gc.collect()
        state.wait_for_everyone()
        if state.is_main_process:
            merge_manifest_parts(out)
        state.wait_for_everyone()  # every process reads the merged manifest
    if "score" in stages:
        with torch.no_grad():
            if state.num_processes > 1:
                score_across_processes(out, state, names, options, config.score_batch_size)
            else:
                score_manifest(out, names, options, config.score_batch_size)
            if config.fid_reference and state.is_main_process:
                fid_per_model(out, config.fid_reference, weights_path=config.fid_inception_weights, device=device)
    if not state.is_main_process:  # the report is written once, by the main process
        return None
    if "report" in stages:
        summary = report(out, focus=config.focus, n_resamples=config.bootstrap, confidence=config.confidence,
                         bootstrap_seed=config.bootstrap_seed, zero_method=config.zero_method, grid_prompts=config.grid_prompts)
        print((out / "results.md").read_text())
        return summary
    return None
