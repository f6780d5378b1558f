"""What a run leaves in `--output_dir` next to the LoRA: `args.json` (every flag, as parsed), `README.md` (a
diffusers-style model card: base model, method, hyperparameters, dataset, final metrics, minipref version) and,
with `--push_to_hub`, the same folder on the Hub (checkpoints and caches left out)."""

from __future__ import annotations

import json
import logging
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from full.run.config import RunConfig

logger = logging.getLogger(__name__)

ARGS_NAME = "args.json"
HYPERPARAMETERS = ("train_mode", "optimizer", "use_ema", "ema_decay", "beta", "learning_rate", "train_batch_size",
                   "gradient_accumulation_steps", "max_train_steps", "rank", "lora_alpha", "resolution", "mixed_precision", "lr_scheduler", "lr_warmup_steps", "seed",
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


def save_args(flags: dict, output_dir) -> Path:
    """Every flag of the run, as resolved, in ``output_dir/args.json``."""
    path = Path(output_dir) / ARGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: _plain(v) for k, v in sorted(flags.items())}, indent=1) + "\n")
    return path


def lora_usage(base: str, where: str) -> list[str]:
    return ["from diffusers import DiffusionPipeline", "", f'pipe = DiffusionPipeline.from_pretrained("{base}")',
            f'pipe.load_lora_weights("{where}")']


def unet_usage(base: str, where: str, denoiser: str = "unet", denoiser_class: str = "UNet2DConditionModel"
               ) -> list[str]:
    return [f"from diffusers import DiffusionPipeline, {denoiser_class}", "",
            f'{denoiser} = {denoiser_class}.from_pretrained("{where}", subfolder="{denoiser}")',
            f'pipe = DiffusionPipeline.from_pretrained("{base}", {denoiser}={denoiser})']


TAGS = {"LoRA": "lora", "UNet": "full-fine-tune", "transformer": "full-fine-tune"}  # what was trained -> its Hub tag

FINAL_STEPS = 20  # the card's "final metrics" average this many last optimizer steps: one step is one noisy batch


def final_metrics(history: list[dict]) -> tuple[dict, int]:
    """Each metric's mean over the last FINAL_STEPS optimizer steps, leaving out NaN steps (a KTO batch with no
    desirable image has no desirable reward); returns the means and the number of steps averaged."""
    last = history[-FINAL_STEPS:]
    means = {}
    for key in dict.fromkeys(k for step in last for k in step):
        values = [v for step in last if isinstance(v := step.get(key), (int, float)) and not math.isnan(v)]
        if values:
            means[key] = sum(values) / len(values)
    return means, len(last)


def model_card(config: RunConfig, family: str | None, global_step: int, history: list[dict], *, base: str | None = None,
               what: str = "LoRA", usage: list[str] | None = None, layout: dict | None = None,
               denoiser_class: str | None = None) -> str:
    """A README.md in the format of the diffusers training scripts' model cards (YAML front matter + text).
    ``layout``: processes, micro-batch and accumulation, which give the global batch."""
    from full.run.output_dir import resolved

    base = resolved(base or config.model.pretrained_model_name_or_path)
    where = config.hub_model_id or config.output_dir
    dataset = next((resolved(config.flag(k)) for k in ("dataset_name", "cached_dir", "prompts_file")
                    if config.flag(k)), "-")
    hyper = [f"| `{k}` | {config.flag(k)} |" for k in HYPERPARAMETERS if config.flag(k) is not None]
    if layout:
        hyper.append(f"| processes x micro-batch x accumulation | {layout['num_processes']} x "
                     f"{layout['train_batch_size']} x {layout['gradient_accumulation_steps']} = global batch "
                     f"{layout['num_processes'] * layout['train_batch_size'] * layout['gradient_accumulation_steps']} |")
    metrics, steps = final_metrics(history)
    final = [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    tags = list(family_tags(family)) + [
        "text-to-image", "diffusers", TAGS.get(what, "reward-model"), "minipref", config.method]
    return "\n".join([
        "---", f"base_model: {base}", "library_name: diffusers", "license: other", "tags:",
        *(f"- {tag}" for tag in tags), "---", "",
        f"# {config.method} {what} for {base}", "",
        f"{what} weights fine-tuned from `{base}` with the `{config.method}` objective of minipref "
        f"{minipref_version()}, for {global_step} optimizer steps on `{dataset}`.", "",
        "```python", *(usage or (lora_usage(base, where) if what == "LoRA" else
                              unet_usage(base, where, *((what, denoiser_class) if denoiser_class else ())))),
        "```", "",
        "## Hyperparameters", "", "| flag | value |", "|---|---|", *hyper, "",
        f"Every flag of the run is in `{ARGS_NAME}`.", "",
        "## Final training metrics", "", f"Means over the last {steps} optimizer step(s), NaN steps left out.", "",
        "| metric | value |", "|---|---|", *(final or ["| - | - |"]), "",
    ])


def family_tags(family: str | None) -> tuple[str, ...]:
    """The Hub tags of a model family (none for a run without a pipeline, e.g. the SPM)."""
    from full.models.families import get_family

    return () if family is None else get_family(family).card_tags


def write_run_outputs(config: RunConfig, family: str | None, global_step: int, history: list[dict],
                      **card_fields) -> Path:
    """args.json and README.md in --output_dir (main process), then the optional push to the Hub."""
    output_dir = Path(config.output_dir)
    save_args(config.flags, output_dir)
    card = output_dir / "README.md"
    card.write_text(model_card(config, family, global_step, history, **card_fields))
    if config.push_to_hub:
        push_to_hub(output_dir, hub_repo_id(config), config.hub_token)
    return card


def hub_repo_id(config: RunConfig) -> str:
    return config.hub_model_id or Path(config.output_dir).resolve().name


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def check_hub_push(config: RunConfig) -> None:
    """With --push_to_hub, create the Hub repo before training, as the diffusers scripts do: no network, no token or
    no permission is one line now, not two tracebacks after hours of training."""
    if not config.push_to_hub:
        return
    from huggingface_hub import constants, create_repo

    repo_id = hub_repo_id(config)
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or "
                         "drop --push_to_hub and upload --output_dir later")
    try:
        create_repo(repo_id, exist_ok=True, token=config.hub_token)
    except Exception as error:  # noqa: BLE001 - network, auth and HTTP errors of every kind: all mean "cannot push"
        raise ValueError(f"--push_to_hub: cannot create the Hub repo {repo_id}: {first_line(error)}") from error


def push_to_hub(output_dir: Path, repo_id: str, token: str | None = None) -> str:
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
        upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="minipref: end of training",
                      ignore_patterns=NOT_UPLOADED, token=token)
    except Exception as error:  # noqa: BLE001 - whatever the Hub says, the trained weights are safe on disk
        raise ValueError(f"training finished and {output_dir} holds its weights and card, but --push_to_hub to "
                         f"{repo_id} failed: {first_line(error)}; upload later with `huggingface-cli upload {repo_id} "
                         f"{output_dir}`") from error
    logger.info("pushed %s to https://huggingface.co/%s", output_dir, repo_id)
    return repo_id
