"""What a run leaves in `--output_dir` next to the LoRA: `args.json` (every flag, as parsed), `README.md` (a
diffusers-style model card: base model, method, hyperparameters, dataset, final metrics, minipref version) and,
with `--push_to_hub`, the same folder on the Hub (checkpoints and caches left out)."""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

logger = logging.getLogger(__name__)

ARGS_NAME = "args.json"
HYPERPARAMETERS = ("beta", "learning_rate", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                   "rank", "lora_alpha", "resolution", "mixed_precision", "lr_scheduler", "lr_warmup_steps", "seed",
                   "utility", "dpo_loss_type", "dspo_variant", "tau", "num_iterations", "threshold",
                   "num_candidates", "num_inner_steps", "preset")
NOT_UPLOADED = ["checkpoint-*", ".checkpoint-*", "spin_cache/*", "logs/*", "*.tmp"]


def minipref_version() -> str:
    try:
        return version("minipref")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None), list)) else str(value)


def save_args(args, output_dir) -> Path:
    path = Path(output_dir) / ARGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: _plain(v) for k, v in sorted(vars(args).items())}, indent=1) + "\n")
    return path


def lora_usage(base: str, where: str) -> list[str]:
    return ["from diffusers import DiffusionPipeline", "", f'pipe = DiffusionPipeline.from_pretrained("{base}")',
            f'pipe.load_lora_weights("{where}")']


def model_card(args, family: str | None, global_step: int, metrics: dict, *, base: str | None = None,
               what: str = "LoRA", usage: list[str] | None = None) -> str:
    """A README.md in the format of the diffusers training scripts' model cards (YAML front matter + text)."""
    base = base or args.pretrained_model_name_or_path
    where = getattr(args, "hub_model_id", None) or args.output_dir
    dataset = getattr(args, "dataset_name", None) or getattr(args, "prompts_file", None) or "-"
    hyper = [f"| `{k}` | {getattr(args, k)} |" for k in HYPERPARAMETERS if getattr(args, k, None) is not None]
    final = [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    tags = {"sd15": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"]}.get(family, []) + [
        "text-to-image", "diffusers", "lora" if what == "LoRA" else "reward-model", "minipref", args.method]
    return "\n".join([
        "---", f"base_model: {base}", "library_name: diffusers", "license: other", "tags:",
        *(f"- {tag}" for tag in tags), "---", "",
        f"# {args.method} {what} for {base}", "",
        f"{what} weights fine-tuned from `{base}` with the `{args.method}` objective of minipref "
        f"{minipref_version()}, for {global_step} optimizer steps on `{dataset}`.", "",
        "```python", *(usage or lora_usage(base, where)), "```", "",
        "## Hyperparameters", "", "| flag | value |", "|---|---|", *hyper, "",
        f"Every flag of the run is in `{ARGS_NAME}`.", "",
        "## Final training metrics", "", "| metric | value |", "|---|---|", *(final or ["| - | - |"]), "",
    ])


def write_run_outputs(args, family: str | None, global_step: int, metrics: dict, **card_fields) -> Path:
    """args.json and README.md in --output_dir (main process), then the optional push to the Hub."""
    output_dir = Path(args.output_dir)
    save_args(args, output_dir)
    card = output_dir / "README.md"
    card.write_text(model_card(args, family, global_step, metrics, **card_fields))
    if getattr(args, "push_to_hub", False):
        push_to_hub(output_dir, args.hub_model_id or output_dir.resolve().name, getattr(args, "hub_token", None))
    return card


def push_to_hub(output_dir: Path, repo_id: str, token: str | None = None) -> str:
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="minipref: end of training",
                  ignore_patterns=NOT_UPLOADED, token=token)
    logger.info("pushed %s to https://huggingface.co/%s", output_dir, repo_id)
    return repo_id
