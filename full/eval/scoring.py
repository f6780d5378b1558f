"""The score stage of `full.eval.evaluate`: every manifest image scored by each reward model into scores.jsonl, in
one process or split over the processes of `accelerate launch` (process p scores every P-th image, the main process
merges), and the FID of each model's images against a reference folder."""

from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path

from PIL import Image

from full.eval import scorers
from full.eval.generate import write_jsonl, read_jsonl, read_manifest
from full.progress import progress_bar

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what a --fid_reference folder may hold


def score_images(out: Path, rows: list[dict], scorer_names: list[str], scorer_options: dict, batch_size: int = 16,
                 main_process: bool = True) -> tuple[list[dict], dict]:
    """Score `rows` of the manifest with each scorer: (score rows, {scorer: reason} for the optional scorers that
    were skipped). One image's score does not depend on the other rows given, so any split of the manifest over
    processes gives the scores of one process (up to the round-off of another batch composition)."""
    new_rows, skipped = [], {}
    for name in scorer_names if rows else []:
        try:
            scorer = scorers.build_scorer(name, **scorer_options.get(name, {}))
        except scorers.ScorerUnavailable as error:
            print(f"skipping scorer {name}: {error}", file=sys.stderr)
            skipped[name] = str(error)
            continue
        for start in progress_bar(range(0, len(rows), batch_size), desc=f"score {name}", unit="batch",
                                  main_process=main_process):
            batch = rows[start:start + batch_size]
            images = []
            for r in batch:
                with Image.open(out / r["path"]) as image:
                    images.append(image.convert("RGB"))
            values = scorer.score(images, [r["prompt"] for r in batch])
            for r, value in zip(batch, values):
                if not math.isfinite(value):
                    raise ValueError(f"scorer {name} returned {value} for {r['path']}")
                new_rows.append({"model": r["model"], "prompt_id": r["prompt_id"], "seed": r["seed"],
                                 "scorer": name, "score": float(value)})
        del scorer
        gc.collect()
    return new_rows, skipped


def write_scores(out: Path, new_rows: list[dict], skipped: dict) -> dict:
    """scores.jsonl with `new_rows` replacing their scorers' old rows, and skipped_scorers.json; returns the skipped."""
    scored = {r["scorer"] for r in new_rows}
    # Earlier scorers' rows stay (a skipped scorer keeps its old scores); re-run scorers are replaced.
    kept = [r for r in read_jsonl(out / "scores.jsonl") if r["scorer"] not in scored]
    write_jsonl(out / "scores.jsonl", kept + new_rows)
    skipped_path = out / "skipped_scorers.json"
    previous = json.loads(skipped_path.read_text()) if skipped_path.is_file() else {}
    skipped = {**{k: v for k, v in previous.items() if k not in scored}, **skipped}
    skipped_path.write_text(json.dumps(skipped, indent=1))
    return skipped


def manifest_to_score(out: Path) -> list[dict]:
    """The manifest's rows in a fixed order (model, prompt, seed): every process cuts the same list."""
    rows = sorted(read_manifest(out), key=lambda r: (r["model"], r["prompt_id"], r["seed"]))
    if not rows:
        raise ValueError(f"{out / 'manifest.jsonl'} is empty or missing: run the generate stage first")
    return rows


def score_manifest(out: Path, scorer_names: list[str], scorer_options: dict, batch_size: int = 16) -> dict:
    """Score every manifest image with each scorer into scores.jsonl (replacing those scorers' old rows), in this
    process. Returns {scorer: reason} for the optional scorers that were skipped."""
    new_rows, skipped = score_images(out, manifest_to_score(out), scorer_names, scorer_options, batch_size)
    return write_scores(out, new_rows, skipped)


def score_across_processes(out: Path, state, scorer_names: list[str], scorer_options: dict, batch_size: int) -> None:
    """Process p of P scores every P-th image into scores.part-<p>.jsonl; the main process merges the parts in
    process order (a score row names its image, so the order does not matter to the report)."""
    rows = manifest_to_score(out)
    new_rows, skipped = score_images(out, rows[state.process_index::state.num_processes], scorer_names,
                                     scorer_options, batch_size, main_process=state.is_main_process)
    print(f"process {state.process_index}: scored {len({(r['model'], r['prompt_id'], r['seed']) for r in new_rows})}"
          f" image(s)")
    write_jsonl(out / f"scores.part-{state.process_index}.jsonl", new_rows)
    state.wait_for_everyone()
    if state.is_main_process:
        parts = [out / f"scores.part-{p}.jsonl" for p in range(state.num_processes)]
        write_scores(out, [r for path in parts for r in read_jsonl(path)], skipped)
        for path in parts:
            path.unlink()


def fid_per_model(out: Path, reference_dir: str, *, weights_path: str | None = None, device: str | None = None) -> dict:
    """FID of each model's images against every image in `reference_dir`, written to fid.json."""
    reference = sorted(str(p) for p in Path(reference_dir).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not reference:
        raise ValueError(f"--fid_reference {reference_dir!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    rows = read_manifest(out)
    by_model: dict[str, list[str]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(str(out / r["path"]))
    results = {}
    for model, paths in by_model.items():
        results[model] = scorers.frechet_inception_distance(paths, reference, weights_path=weights_path, device=device)
        if results[model]["fid"] is None:
            print(f"FID unavailable: {results[model]['unavailable']}", file=sys.stderr)
    (out / "fid.json").write_text(json.dumps({"reference": str(reference_dir), "models": results}, indent=1))
    return results
