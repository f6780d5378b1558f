# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (minipref)
#     language: python
#     name: minipref
# ---

# %% [markdown]
# # Lesson 7: scaling up, the same functions with the full-scale machinery
#
# **Assumes** lessons 2 and 3 and, from [00_prerequisites.md](00_prerequisites.md), section 6 (LoRA) and section 7
# (how `accelerate` runs a script).
#
# The toy and the full-scale scripts call the **same** minipref functions; what changes is where the errors come
# from (a UNet on VAE latents instead of an MLP on points), the data (Pick-a-Pic pairs, per-image feedback), and
# the machinery (diffusers pipelines, peft LoRA, accelerate). This lesson trains with that machinery on the **CPU
# image lab** (docs/lab.md): a real, tiny Stable-Diffusion-shaped pipeline pretrained on coloured shapes ("a red
# circle on a dark background", 32 px), a synthetic rater whose taste is *bigger shapes are better* (no caption asks
# for size, so the pretrained model is indifferent to it), and Pick-a-Pic-schema pairs of the model's own samples
# labelled by that rater. So the run below has something to learn, and we can measure whether it learned it.
# Nothing here trains Stable Diffusion itself: SD1.5 and SDXL appear as presets and as the commands
# `full/launch/train.sh` builds (printed, not run), and every command takes a hub id in place of the lab's folders
# for a real run. What such a run costs, as the papers report it, is in the box near the end.
#
# | here | for real |
# |---|---|
# | `runs/lab/model` (the lab's pretrained pipeline, `make lab`) | `stable-diffusion-v1-5/stable-diffusion-v1-5` or `stabilityai/stable-diffusion-xl-base-1.0` |
# | `runs/lab/data/pairs.parquet` (the model's samples, rated) | `yuvalkirstain/pickapic_v2` (or its parquet files) |
# | `--scorers full.lab.rater:Rater` (the shape's area) | `pickscore`, `clip`, `hpsv2`, ... (`full/eval/scorers.py`) |
# | 32 px, batch 16, a few hundred steps, CPU | `--preset sd15-dpo` (512 px, 10k steps), `full/launch/train.sh` on A100s |
#
# **Which lab.** The lesson uses the lab folder in `MINIPREF_LAB` if set, else `runs/lab` (`make lab`: the full
# pretraining and every method; docs/lab.md states what it costs), else `runs/lab-quick`. If there is none it stops
# and says what to run; the quickest is `python -m full.lab --out runs/lab-quick --quick --methods dpo` from the
# repository root (a weaker model pretrained in a few minutes, its preference data, one DPO run and its evaluation;
# tutorials/README.md has the measured time).

# %%
import inspect
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lesson
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

QUICK = lesson.QUICK
STEPS = 120 if QUICK else 300  # the full lab's DPO run is 300 steps; on the quick lab's weaker model 60 lift the curves too little
WORK = lesson.OUT / "07_work"
started = time.perf_counter()


def find_lab() -> Path:
    """The first lab folder with a pretrained pipeline and its pairs: $MINIPREF_LAB, runs/lab, runs/lab-quick."""
    candidates = [Path(os.environ["MINIPREF_LAB"])] if os.environ.get("MINIPREF_LAB") else [
        lesson.ROOT / "runs/lab", lesson.ROOT / "runs/lab-quick"]
    for folder in candidates:
        if (folder / "model" / "model_index.json").is_file() and (folder / "data" / "pairs.parquet").is_file():
            return folder
    sys.exit(f"lesson 7 trains on the CPU image lab, and there is none in {', '.join(map(str, candidates))}: run "
             "`python -m full.lab --out runs/lab-quick --quick --methods dpo` from the repository root (a few minutes) or "
             "`make lab` (the full lab), or set MINIPREF_LAB to a lab's --out folder")


LAB = find_lab()
model_dir, pairs_path = str(LAB / "model"), str(LAB / "data" / "pairs.parquet")
print(f"the lab: {LAB}")

# %% [markdown]
# ## 1. The same function, three call sites
#
# minipref's method table (`minipref/methods.py`, `minipref.get_method`) has one row per method; a row's adapter
# turns one step's per-sample errors into the minipref loss call. `full/trainers/offline.py`'s `compute_loss` asks
# the row of `--method` for its loss, and so does the toy's step function (`toy/methods.py`, `row_loss`): both end
# in the same `dpo_loss` that lessons 2-6 called directly.

# %%
import minipref  # noqa: E402
import minipref.methods as method_table  # noqa: E402
from full.trainers import offline as full_train  # noqa: E402
from toy import methods as toy_methods  # noqa: E402

dpo_row = minipref.get_method("dpo")
for function in (full_train.compute_loss, toy_methods.row_loss, dpo_row.loss):
    print(inspect.getsource(function))
lesson.check("full.train and the toy both go through the method table's dpo row, whose adapter calls minipref.dpo_loss",
             "objective_for(" in inspect.getsource(full_train.compute_loss)
             and "row.loss(" in inspect.getsource(toy_methods.row_loss)
             and "dpo_loss(" in inspect.getsource(dpo_row.loss) and dpo_row.objective == "dpo"
             and toy_methods.METHODS["dpo"].row is dpo_row and method_table.METHODS["dpo"] is dpo_row)


# %% [markdown]
# ## 2. A pipeline and a dataset
#
# The lab's model is a real `StableDiffusionPipeline` directory (UNet, VAE, CLIP text encoder, tokenizer,
# scheduler) written with `save_pretrained`, so the scripts load it the way they load a hub id; only the sizes
# differ from SD1.5's (docs/lab.md has the table).

# %%
from diffusers import StableDiffusionPipeline  # noqa: E402

pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
unet_parameters = sum(p.numel() for p in pipe.unet.parameters())
print({name: type(part).__name__ for name, part in pipe.components.items() if part is not None})
print(f"UNet: {unet_parameters / 1e6:.2f} M parameters (SD1.5's: 860 M); images {pipe.vae.config.sample_size} px")
lesson.check("the lab's model loads as a StableDiffusionPipeline with a UNet of about a million parameters",
             0.5e6 < unet_parameters < 2e6, f"{unet_parameters:,}")

# %% [markdown]
# The pairs have Pick-a-Pic v2's schema: `jpg_0`, `jpg_1` (JPEG bytes), `label_0` (1: `jpg_0` won, 0: `jpg_1` won,
# 0.5: a tie), `caption`; the lab adds the rater's `score_0`, `score_1` (the fraction of the image the shape
# covers). Each pair is two samples of the pretrained model for one *training* caption; the larger shape wins,
# except for the 5% of labels the lab flips on purpose (a crowd of raters is not an oracle), and the 10% closest
# pairs are ties. Ties carry no preference: the loader drops them and says how many (`--keep_ties` keeps them).

# %%
from full import data as full_data  # noqa: E402
from full import data_commands  # noqa: E402  (python -m full.data: check, convert)

table = pq.read_table(pairs_path)
print(table.schema)
label_0, score_0, score_1 = (np.array(table.column(c).to_pylist()) for c in ("label_0", "score_0", "score_1"))
decided = label_0 != 0.5
disagree = np.mean((label_0[decided] == 1) != (score_0[decided] > score_1[decided]))
print(f"{table.num_rows} pairs, {np.sum(~decided)} ties, {len(set(table.column('caption').to_pylist()))} captions")
data_commands.main(["check", pairs_path])
lab_data = json.loads((LAB / "data" / "data.json").read_text())  # what the lab wrote about its data
GUIDANCE = lab_data["config"]["guidance"]  # the lab's classifier-free guidance scale: we sample as its data was
lesson.check("the lab flipped 5% of the labels and tied the 10% closest pairs", lab_data["label_noise"] == 0.05
             and lab_data["tie_rate"] == 0.1 and np.sum(~decided) == round(0.1 * table.num_rows),
             f"{np.sum(~decided)} ties of {table.num_rows}")
lesson.check("the loader keeps the decided pairs and drops the ties",
             len(full_data.load_pair_rows(pairs_path)) == int(decided.sum()), f"{decided.sum()} of {table.num_rows}")
lesson.check_range("the label disagrees with the rater's score on about 5% of the decided pairs (the flipped ones)",
                   disagree, 0.0, 0.12)

fig, axes = plt.subplots(2, 6, figsize=(9, 3.4))
for column, row in enumerate(np.flatnonzero(decided)[::decided.sum() // 6][:6]):  # six pairs spread over the captions
    winner_first = label_0[row] == 1
    for ax, side in zip(axes[:, column], (0, 1) if winner_first else (1, 0)):
        ax.imshow(Image.open(io.BytesIO(table.column(f"jpg_{side}")[row].as_py())))
        ax.set_title(f"{'won' if ax is axes[0, column] else 'lost'}: {[score_0, score_1][side][row]:.2f}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    axes[1, column].set_xlabel(table.column("caption")[row].as_py().replace(" on a ", "\non a "), fontsize=7)
fig.suptitle("the lab's pairs: winner (top) and loser (bottom), the rater's score (shape area)", fontsize=9)
lesson.save_figure(fig, "07_lab_pairs")

# %% [markdown]
# **Per-image feedback** (KTO, BCE, CSFT, SFT) has the schema `image, caption, label`. The trainer converts pairs on
# the fly (`--feedback_policy`), or you convert once with `python -m full.data convert`:
#
# * `pairs-to-feedback --policy winner_once`: desirable = won at least once (Diffusion-KTO, arXiv:2404.04465,
#   App. C.1); `--policy always_win`: desirable = never lost (the "exclusive win" of the LoRA study, Yin and Zhang,
#   *Aligning Text-to-Image Diffusion Models using Reinforcement Learning from Human Utility*; the BCE preset);
# * `scores-to-pairs` / `scores-to-feedback`: from a scalar score column (a reward model's; the lab's
#   `feedback.parquet` is its top 30% by area);
# * `red-filter`: the synthetic user of Diffusion-KTO's Sec. 6, who likes red-tinted images.

# %%
# The lesson's work folder starts empty on every run: a run on another lab would leave images and checkpoints that
# this run's full.train and full.evaluate rightly refuse to mix with their own.
shutil.rmtree(WORK, ignore_errors=True)
WORK.mkdir(parents=True)
feedback_path = WORK / "feedback.parquet"
data_commands.main(["convert", "pairs-to-feedback", "--input", pairs_path, "--output", str(feedback_path)])
feedback = pq.read_table(feedback_path)
print(feedback.schema)
lesson.check("winner_once: two images per decided pair, one of them desirable",
             feedback.num_rows == 2 * decided.sum() and sum(feedback.column("label").to_pylist()) == decided.sum(),
             f"{feedback.num_rows} rows, {sum(feedback.column('label').to_pylist())} desirable")
# %% [markdown]
# ## 3. Presets: the papers' settings, each with its source
#
# `python -m full.presets` prints every preset; a preset sets the trainer's defaults and any flag on the command
# line wins. The SD1.5 presets use the LoRA study's recipe (rank 8, AdamW 1e-4, 500 warm-up, 10k steps; its Sec. 4.2) with each
# method's own hyperparameters; values no paper gives say "NOT in the paper" and why they were chosen.

# %%
from full.presets import format_table, load_preset  # noqa: E402

print(format_table(["sd15-dpo"]))
print()
print(f"{'preset':16} {'beta':>8} {'lr':>8} {'batch x accum':>14} {'rank':>5} {'res':>5}  method-specific")
for method in ("sft", "csft", "bce", "dpo", "kto", "spin", "contrast", "dspo", "spo"):
    for family in ("sd15", "sdxl"):
        p = load_preset(family, method)
        extra = {k: p[k] for k in ("utility", "desirable_ratio", "feedback_policy", "tau", "dspo_variant") if k in p}
        print(f"{family + '-' + method:16} {p.get('beta', '-'):>8} {p['learning_rate']:>8g} "
              f"{str(p['train_batch_size']) + ' x ' + str(p.get('gradient_accumulation_steps', 1)):>14} "
              f"{p['rank']:>5} {p['resolution']:>5}  {extra}")

# %% [markdown]
# ## 4. The launch commands for 1 and 8 A100s (printed, not run)
#
# `full/launch/train.sh METHOD MODEL CONFIG` builds the launch command (`python -m accelerate.commands.launch`, which
# is `accelerate launch` run by a chosen interpreter, `PYTHON`) from the preset and an
# accelerate config in `full/launch/accelerate/` (`1gpu`, `8gpu_ddp`, `8gpu_zero2`). The presets are written for one
# A100-80GB (per-device batch x accumulation; their memory use has not been measured here); on 8 GPUs the script divides the accumulation by 8 so the effective
# batch stays the preset's where it can, and says so when it cannot. `DRY_RUN=1` prints the command:

# %%
launch_output = {}
for model, config in (("sd15", "1gpu"), ("sd15", "8gpu_ddp"), ("sdxl", "1gpu"), ("sdxl", "8gpu_ddp")):
    result = subprocess.run(["bash", str(lesson.ROOT / "full/launch/train.sh"), "dpo", model, config],
                            env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable},
                            cwd=lesson.ROOT, capture_output=True, text=True, timeout=120)
    launch_output[(model, config)] = result.stdout
    print(f"$ DRY_RUN=1 full/launch/train.sh dpo {model} {config}\n{result.stderr.strip()}\n{result.stdout.strip()}\n")
    lesson.check(f"train.sh dpo {model} {config} builds an accelerate command", result.returncode == 0
                 and "-m accelerate.commands.launch" in result.stdout and f"--preset {model}-dpo" in result.stdout)

# %% [markdown]
# The online methods sample during training and have their own entry points (same flags, same presets;
# `full/launch/train.sh spin sd15 8gpu_ddp` builds the first command below for you):
#
# ```bash
# accelerate launch --config_file full/launch/accelerate/8gpu_ddp.yaml -m full.spin --preset sd15-spin \
#     --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
#     --dataset_name yuvalkirstain/pickapic_v2 --max_train_samples 4000 --num_iterations 2 --output_dir runs/spin-sd15
# python -m full.train_spm --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
#     --dataset_name yuvalkirstain/pickapic_v1 --learning_rate 3e-6 --output_dir runs/spm-sd15   # SPO's preference model
# accelerate launch -m full.spo --preset sd15-spo --spm_model_name_or_path runs/spm-sd15 \
#     --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
#     --prompts_file prompts.json --output_dir runs/spo-sd15
# ```
#
# For SDXL the trainer keeps the VAE in float32 (it overflows in fp16) unless you pass a fixed one with
# `--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix`; the SDXL presets use bf16 and
# `--gradient_checkpointing`. `python -m full.cache` precomputes latents and prompt embeddings once
# (`--cached_dir` then trains without the VAE and text encoders); `python -m full.bench` measures the per-step
# cost of each method against SFT. docs/faq.md collects the problems people run into.


# %% [markdown]
# ## 5. Training
#
# `full.train.main(argv)` is the entry point `accelerate launch -m full.train` runs, callable in-process. Here: DPO
# on the lab's pairs with the lab's preset for the reference-based methods (`full/lab/presets.py`): rank-8 LoRA,
# 32 px, batch 16 pairs, lr 1e-3 constant, Diffusion-DPO's beta 5000, `--report_to tensorboard`; 300 steps as the
# full lab trains, 120 in quick mode (twice the quick lab's 60: its model, pretrained for minutes, learns slowly). It returns a summary and writes the LoRA in
# diffusers format (`pytorch_lora_weights.safetensors`) plus LoRA-only checkpoints. Its progress bar honours
# `TQDM_DISABLE`, which `lesson.py` sets (`TQDM_DISABLE=0` shows it).

# %%
from full.lab.methods import flag_list  # noqa: E402  ({"rank": 8, ...} -> ["--rank", "8", ...])
from full.lab.presets import COMMON_FLAGS, FAMILIES  # noqa: E402

preset = {**COMMON_FLAGS, **FAMILIES["reference"]["flags"], "max_train_steps": STEPS}
lesson.check("the lab's preset is the one this text describes", preset["rank"] == 8 and preset["resolution"] == 32
             and preset["train_batch_size"] == 16 and preset["learning_rate"] == 1e-3 and preset["beta"] == 5000
             and preset["lr_scheduler"] == "constant" and preset["lr_warmup_steps"] == 0, str(preset))
BETA = preset["beta"]


def train(name: str, method: str, dataset: str, **overrides) -> tuple[Path, dict]:
    """``full.train.main`` in-process with the lab's preset (``overrides`` replace its values); (output dir, summary)."""
    flags = {**preset, **overrides}
    out_dir = WORK / name
    argv = ["--pretrained_model_name_or_path", model_dir, "--method", method, "--dataset_name", dataset,
            "--output_dir", str(out_dir), "--report_to", "tensorboard",
            "--checkpointing_steps", str(flags["max_train_steps"]), *flag_list(flags)]
    print("accelerate launch -m full.train " + " ".join(argv))
    return out_dir, full_train.main(argv)


run_dir, summary = train("dpo-run", "dpo", pairs_path)
print({k: round(v, 4) for k, v in summary["metrics"].items()})
lesson.check("the run finished and saved a diffusers-format LoRA",
             summary["global_step"] == STEPS and (run_dir / "pytorch_lora_weights.safetensors").is_file())

# %% [markdown]
# ## 6. Reading the logs
#
# Every metric the loss reports goes to TensorBoard under `train/` (`tensorboard --logdir <output_dir>/logs`),
# averaged over gradient-accumulation micro-batches and processes. For DPO: `loss`, `implicit_acc`, `margin`,
# `reward_w`, `reward_l`, `mse_w`, `mse_l`, `ref_mse_w`, `ref_mse_l`, `lr`. Each point is one batch of 16 pairs,
# so the curves are noisy: the figure draws every step faintly and a running mean over a sixth of the run on top.

# %%
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

def read_scalars(out_dir: Path) -> dict[str, np.ndarray]:
    """Every scalar a run logged to TensorBoard: tag -> values, one per step."""
    found = {}
    for path in sorted((out_dir / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found[tag] = np.array([e.value for e in accumulator.Scalars(tag)])
    return found


scalars = read_scalars(run_dir)
print(sorted(scalars))
lesson.check("every step logged loss, implicit_acc and margin",
             all(len(scalars.get(f"train/{tag}", [])) == STEPS for tag in ("loss", "implicit_acc", "margin")))
loss, accuracy, margin = scalars["train/loss"], scalars["train/implicit_acc"], scalars["train/margin"]
third = STEPS // 3
first, last = slice(0, third), slice(STEPS - third, STEPS)

# %% [markdown]
# **A healthy start.** The LoRA starts as a no-op (its B matrices are zero), so at step 1 the policy *is* the
# reference: every implicit reward is 0, the loss is exactly `log 2`, the accuracy exactly 0.5 (a zero margin counts
# half) and the margin 0. Then `implicit_acc` and `margin` rise: the model's denoising error drops on the larger shape
# of a pair relative to the reference's, more than on the smaller one.

# %%
lesson.check_close("the first logged loss is log 2 (the LoRA starts as a no-op: B = 0)", loss[0], np.log(2),
                   abs_tol=1e-4)
lesson.check_close("the first implicit accuracy is 0.5 and the first margin 0", abs(accuracy[0] - 0.5) + abs(margin[0]),
                   0.0, abs_tol=1e-4)
# implicit_acc of a batch counts the pairs with a positive margin: a coin would average 0.5 with a standard error of
# sqrt(0.25 / n) over the n pairs of the run after step 1
pairs_seen = 16 * (STEPS - 1)
accuracy_z = (accuracy[1:].mean() - 0.5) / np.sqrt(0.25 / pairs_seen)
lesson.check_range("implicit_acc after step 1 averages above 0.5 by more than 4 standard errors of a coin",
                   accuracy_z, 4.0, detail=f"mean {accuracy[1:].mean():.3f} over {pairs_seen} pairs")
lesson.check_range("implicit_acc: the last third of the run is above the first third",
                   accuracy[last].mean() - accuracy[first].mean(), 0.0,
                   detail=f"{accuracy[first].mean():.3f} -> {accuracy[last].mean():.3f}")
lesson.check_range("margin: positive on average after step 1, and in the last third", min(margin[1:].mean(), margin[last].mean()),
                   0.0, detail=f"run {margin[1:].mean():.2f}, last third {margin[last].mean():.2f}")

# %% [markdown]
# **Why the loss is the noisiest curve, and starts by rising.** The logged loss is the batch mean of
# `softplus(-m)` over the pairs' margins `m`, and the logged margin their mean; `softplus` is convex, so by Jensen the
# loss is at least `softplus(-mean margin)` at every step, by as much as the margins are spread. At beta 5000 a tiny
# change of the denoising error is a large reward: `r = -(beta/2)(mse - ref_mse)`, so the logged margin is
# `-(beta/2)((mse_w - ref_mse_w) - (mse_l - ref_mse_l))` at every step (both checked below from the logged means)
# while the policy's error stays within a few percent of the reference's. The first updates spread the margins
# before they sort them, and a pair the model gets badly wrong (a margin of -5 costs 5 nats) outweighs several right
# ones: over the first third of the run the mean batch loss is *above* `log 2` although the accuracy is not below
# 0.5, and more than 90% of that excess is the Jensen gap, i.e. the spread. That is lesson 2's large-beta regime,
# not a failure. Judge a run by `implicit_acc` and `margin` first;
# `mse_w` drifting far from `ref_mse_w` is the sign of a policy leaving the reference fast (lower the lr or raise
# beta).

# %%
# r = -(beta/2)(err - err_ref) per image, margin = r_w - r_l: linear, so it holds for the batch means TensorBoard logs
margin_from_errors = -(BETA / 2) * ((scalars["train/mse_w"] - scalars["train/ref_mse_w"])
                                    - (scalars["train/mse_l"] - scalars["train/ref_mse_l"]))
lesson.check_close("margin = -(beta/2)((mse_w - ref_mse_w) - (mse_l - ref_mse_l)) at every step",
                   float(np.abs(margin_from_errors - margin).max()), 0.0, abs_tol=5e-3)
# Jensen: mean(softplus(-m_i)) >= softplus(-mean(m_i)), with equality only when every margin is the same
jensen_gap = loss - np.logaddexp(0.0, -margin)
lesson.check_range("loss >= softplus(-margin) at every step (Jensen)", float(jensen_gap.min()), -1e-5,
                   detail=f"largest gap {jensen_gap.max():.3f}")
relative_drift = float(np.max(np.abs(scalars["train/mse_w"] / scalars["train/ref_mse_w"] - 1)))
lesson.check_range("the policy's error on the winners stays within 5% of the reference's", relative_drift, high=0.05)
lesson.check_range("over the first third the mean batch loss is above log 2", loss[first].mean(), np.log(2),
                   detail=f"accuracy {accuracy[first].mean():.3f}")
lesson.check_range("while the accuracy over the first third is not below 0.5", accuracy[first].mean(), 0.5 - 1e-9)
spread_share = float(jensen_gap[first].mean() / (loss[first].mean() - np.log(2)))
lesson.check_range("more than 90% of the first third's excess over log 2 is the Jensen gap (the margins' spread)",
                   spread_share, 0.9)

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
window = max(2, STEPS // 6)
for ax, (tag, values, baseline) in zip(axes, (("loss", loss, np.log(2)), ("implicit_acc", accuracy, 0.5),
                                              ("margin", margin, 0.0))):
    steps = np.arange(1, STEPS + 1)
    ax.plot(steps, values, color="C0", alpha=0.3, lw=0.8, label="per batch")
    running = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], running, color="C0", lw=2, label=f"mean of {window} steps")
    ax.axhline(baseline, color="0.5", ls=":", label="at the reference" if tag == "loss" else None)
    ax.set_title(f"train/{tag}")
    ax.set_xlabel("step")
axes[0].legend(fontsize=7)
fig.suptitle(f"DPO on the lab's pairs (beta {BETA:g}, lr 1e-3, batch 16): TensorBoard's scalars", fontsize=10, y=1.03)
lesson.save_figure(fig, "07_tensorboard_scalars")

# %% [markdown]
# ## 7. Loading the LoRA and evaluating
#
# The saved LoRA loads into the pipeline with `pipe.load_lora_weights(dir)`, as users will load it. Then the
# question the training curves cannot answer: did the *samples* change the way the rater wants, on captions the
# model never trained on? (Exercise 1 asks what the curves of a run on swapped labels would look like.)
# `python -m full.evaluate` generates with fixed seeds (the same seeds for every model: a paired
# comparison), scores with reward models and reports mean +- std, win rates with bootstrap CIs over prompts, and
# Wilcoxon p-values (docs/evaluation.md). The lab's rater and its caption check (`Fidelity`: 1 when the reader finds
# the caption's colour, shape and background) plug in through `--scorers module.path:ClassName`, the extension point
# for your own reward. The caption check is there because alignment must not buy reward by forgetting the prompt.

# %%
from full.lab.shapes import HELD_OUT_CAPTIONS  # noqa: E402


def draw(caption):
    return pipe([caption], num_inference_steps=10, guidance_scale=GUIDANCE, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


before = draw(HELD_OUT_CAPTIONS[0])
pipe.load_lora_weights(str(run_dir))
after = draw(HELD_OUT_CAPTIONS[0])
print(f"largest pixel change from the LoRA: {np.abs(after - before).max():.4f}")
lesson.check("the LoRA loads with load_lora_weights and changes the samples", np.abs(after - before).max() > 0)

from full import evaluate  # noqa: E402  (python -m full.evaluate)

eval_dir = WORK / "eval"
prompts_file = WORK / "held_out_prompts.txt"  # the 18 captions no pair was made for
prompts_file.write_text("".join(f"p{i:02d}\t{caption}\n" for i, caption in enumerate(HELD_OUT_CAPTIONS)))
RATER, FIDELITY = "full.lab.rater:Rater", "full.lab.rater:Fidelity"
report = evaluate.main([
    "--out", str(eval_dir), "--base_model", model_dir, "--lora", f"dpo={run_dir}", "--prompts", str(prompts_file),
    "--seeds", "2" if QUICK else "4", "--steps", "10" if QUICK else "20", "--guidance", str(GUIDANCE), "--batch_size", "64",
    "--device", "cpu", "--scorers", f"{RATER},{FIDELITY}", "--bootstrap", "1000", "--grid_prompts", "0",
])
lesson.check("evaluate wrote results.json, results.md and the plots",
             all((eval_dir / f).exists() for f in ("results.json", "results.md", "plots/means.png", "plots/win_rates.png")))
area = {model: report["means"][RATER][model]["mean"] for model in ("base", "dpo")}
versus_base = next(c for c in report["win_rates"][RATER] if c["model"] == "dpo" and c["baseline"] == "base")
fidelity = {model: report["means"][FIDELITY][model]["mean"] for model in ("base", "dpo")}
print(f"held-out mean area: base {area['base']:.4f}, dpo {area['dpo']:.4f}; DPO's win rate over base "
      f"{versus_base['win_rate']:.2f} [{versus_base['ci_low']:.2f}, {versus_base['ci_high']:.2f}], "
      f"Wilcoxon p {versus_base['wilcoxon']['p_value']:.2g}; caption fidelity {fidelity['base']:.2f} -> "
      f"{fidelity['dpo']:.2f}")
lesson.check_range("on held-out captions DPO's shapes are larger on average than the base model's",
                   area["dpo"] - area["base"], 0.0, detail=f"{area['base']:.4f} -> {area['dpo']:.4f}")
lesson.check_range("and DPO wins on more than half of the held-out captions", versus_base["win_rate"], 0.5)
lesson.check_range("without buying it by forgetting the captions: DPO's caption fidelity is within 0.1 of the base's",
                   fidelity["dpo"] - fidelity["base"], -0.1)

# %% [markdown]
# The same seeds through both models, side by side (the images full.evaluate drew):

# %%
manifest = [json.loads(line) for line in (eval_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
scores = [json.loads(line) for line in (eval_dir / "scores.jsonl").read_text().splitlines() if line.strip()]
rated = {(r["model"], r["prompt_id"], r["seed"]): r["score"] for r in scores if r["scorer"] == RATER}
shown = [row for row in manifest if row["seed"] == 0 and row["model"] == "base"][::2]  # 9 of the 18 captions
fig, axes = plt.subplots(2, len(shown), figsize=(1.3 * len(shown), 3.6))
for column, base_row in enumerate(shown):
    for ax, model in zip(axes[:, column], ("base", "dpo")):
        row = next(r for r in manifest if r["model"] == model and r["prompt_id"] == base_row["prompt_id"] and r["seed"] == 0)
        ax.imshow(plt.imread(eval_dir / row["path"]))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(f"area {rated[(model, row['prompt_id'], 0)]:.2f}", fontsize=7)
    axes[0, column].set_title(base_row["prompt"].replace("a ", "", 1).split(" on ")[0], fontsize=7)
axes[0, 0].set_ylabel("base", fontsize=8)
axes[1, 0].set_ylabel("DPO LoRA", fontsize=8)
fig.suptitle("held-out captions, seed 0: the pretrained model and the DPO LoRA", fontsize=9)
lesson.save_figure(fig, "07_lab_samples")

# %% [markdown]
# ## What the real run costs
#
# > **As the papers report it** (SD1.5 unless noted; none of these runs is reproduced here):
# >
# > | paper | data | hardware and schedule | time, memory |
# > |---|---|---|---|
# > | Diffusion-KTO (arXiv:2404.04465) | Pick-a-Pic v2 split into 237,530 desirable and 690,538 undesirable images (Sec. 5.1.1) | 16 A100s, batch 2 per GPU, Adam lr 1e-7, 10,000 iterations, all UNet weights (App. A.1) | not reported |
# > | DSPO (Zhu, Xiao, Honavar) | Pick-a-Pic v2, "over 500,000 examples and 35,000 distinct prompts" (App. D.2) | 4 V100s, 4 pairs per GPU x 128 accumulation = 2048 pairs per step, lr 2.048e-8, all weights (App. D.3) | one optimisation step (batch 16 x 128 accumulation) on one A100: 4.15 min for Diffusion-DPO, 4.18 min for DSPO; peak GPU memory without the model 60.2 and 60.5 (Table 3; the table gives no unit) |
# > | Diff-contrast (*Diffusion Preference Alignment via Relative Text-Image Contrast*) | Pick-a-Pic v2 (Sec. 4.1) | 8 A100s; 16 per GPU x 4 accumulation (SD1.5), 8 x 8 (SDXL) (App. D) | not reported |
# > | SPO (arXiv:2406.04314) | preference model trained on Pick-a-Pic v1 (over 580k pairs); fine-tuning on 4k prompts, pairs made online (Sec. 5.1) | A100s (Sec. 5.4); LoRA rank 4 (SD-1.5) / 64 (SDXL) (Sec. 5.1) | the hours did not survive in our copy of the text; what did: SPO's total training GPU hours are about 20.8% (SD-1.5) and 4.9% (SDXL) of Diffusion-DPO's (Sec. 5.4) |
# > | the LoRA study (Yin and Zhang) | a filtered subset of LAION Art at 512 px (Sec. 4.1) | one A100-80GB, 4 to 8 samples per device, rank-8 LoRA, AdamW 1e-4, 10,000 steps (Sec. 4.2) | not reported |
# >
# > **Data size.** `full/launch/train.sh` defaults to the whole of Pick-a-Pic v2 (`DATASET` unset:
# > `yuvalkirstain/pickapic_v2`, about a million pairs, hundreds of GB of JPEGs; docs/scaling.md), downloaded into
# > the `datasets` cache (and converted to one Arrow file about as large) before the first step. For a first run,
# > stream it instead (`--streaming --max_train_steps N`: the parquet files are read from the Hub as the run goes,
# > no full download; docs/scaling.md, "Streaming training"), or put a small local parquet file in `DATASET`.
# >
# > **Measured here**: nothing on a GPU. Every time in this repository is CPU time on a 2-core machine: this lesson's
# > run on the lab (tutorials/README.md has the table), the lab itself (docs/lab.md), the data loaders at up to 16k
# > rows (docs/scaling.md). The presets' GPU memory and step times, the multi-GPU launches and SDXL are **not**
# > measured; docs/scaling.md lists what a GPU owner should run to measure them.
#
# ## Where to go from here
#
# * docs/lab.md: every objective on the lab (`python -m full.lab`), their win rates and what the deliberately broken
#   run (`dpo_swapped`) shows.
# * docs/methods.md: one row per objective (paper, equation, file, data, the papers' hyperparameters, our preset).
# * docs/conventions.md §2: the one beta and its table across implementations.
# * docs/faq.md: the flat 0.693 loss, beta 2500 vs 5000, NaN with SDXL's VAE, LoRA keys, out of memory.
#
# A real run, end to end:
#
# ```bash
# full/launch/train.sh dpo sd15 1gpu --streaming --max_train_steps 200   # a first try: streamed, no full download
# full/launch/train.sh dpo sd15 8gpu_ddp                 # 10k steps of the sd15-dpo preset on 8 A100s, all of Pick-a-Pic v2
# tensorboard --logdir runs/sd15-dpo-8gpu_ddp/logs
# python -m full.evaluate --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
#     --lora dpo=runs/sd15-dpo-8gpu_ddp --prompts paper000 --scorers pickscore,clip --out eval/sd15
# ```

# %% [markdown]
# ## Takeaways
#
# * The trainers call the same minipref functions as the toy; what changes is where the errors come from (a UNet on
#   latents), the data loaders and converters, and the machinery (LoRA, accelerate, presets, launch scripts).
# * A LoRA run starts exactly at `log 2`, accuracy 0.5, margin 0 (B = 0); a healthy run's `implicit_acc` and
#   `margin` then rise. At beta 5000 the batch loss is the noisiest curve and may sit above `log 2` while the
#   accuracy rises: read accuracy and margin first.
# * Training curves measure how well the model fits its labels, whatever they say; only an evaluation on held-out
#   prompts with a reward (here the rater, through `full.evaluate --scorers module:Class`) says whether the samples
#   moved the way the rater wants. Exercise 1 puts this to the test.
#
# ## Exercises
#
# 1. Train on `LAB/data/pairs_swapped.parquet` (every winner and loser exchanged) and predict, before you run it,
#    the `train/implicit_acc` curve and DPO's held-out win rate over the base model. (docs/lab.md, `dpo_swapped`.)
# 2. Rerun with `--beta 500`: predict how the loss curve sits against `log 2` and how large the margins get. (Lesson 2.)
# 3. Train `--method kto` on `LAB/data/feedback.parquet` (per-image labels, top 30% by area) and predict which
#    TensorBoard scalars it logs that DPO did not, and its first logged loss. (Lesson 3.)

# %%
elapsed = time.perf_counter() - started
print(f"lesson 7 took {elapsed:.1f} s")
lesson.save_results("07_scaling_up", {
    "quick": QUICK, "lab": str(LAB), "steps": STEPS, "metrics": summary["metrics"], "logged_tags": sorted(scalars),
    "first_loss": float(loss[0]), "accuracy_z": float(accuracy_z), "accuracy_thirds": [float(accuracy[first].mean()), float(accuracy[last].mean())],
    "margin_thirds": [float(margin[first].mean()), float(margin[last].mean())],
    "margin_identity_gap": float(np.abs(margin_from_errors - margin).max()), "jensen_min_gap": float(jensen_gap.min()),
    "loss_first_third": float(loss[first].mean()), "spread_share": spread_share,
    "held_out_area": area, "win_rate": versus_base["win_rate"], "fidelity": fidelity,
    "lora_pixel_change": float(np.abs(after - before).max()), "seconds": elapsed,
})

# %% [markdown]
# ## Solutions
#
# Run with `python tutorials/07_scaling_up.py --solutions` (or set `lesson.SOLUTIONS = True` in a notebook); each
# solution checks its prediction.
#
# **1.** The loss only sees the labels, so on swapped pairs DPO fits the swapped preference exactly as well:
# `train/implicit_acc` rises above 0.5 as in the lesson's run (the accuracy is measured against the labels it was
# given). The samples move the other way: smaller shapes, so the held-out win rate over the base model is below one
# half. A training curve cannot tell the two runs apart; the evaluation can. The solution reads the lab's own
# `dpo_swapped` run where the lab has one (`make lab` and the test's quick lab train it), else trains it here.
#
# **2.** With the same learning rate the LoRA's first steps change the denoising errors by a similar amount as at
# beta 5000 (Adam, lesson 2), so the margins, $\beta$ times those changes, start several times smaller: not quite
# ten, because the errors move somewhat more at the smaller $\beta$ (lesson 2 again); measured over the first steps,
# about a fifth. The loss's excess over $\mathrm{softplus}(-\text{mean margin})$ is the margins' spread (lesson 2's
# Taylor expansion: about $\mathrm{Var}(m)/8$), which shrinks with the square: the loss stays within 0.01 of
# $\log 2$ instead of rising well above it at the start. (Over a long run the margins grow towards what the data
# support, lesson 2's exercise 1.)
#
# **3.** KTO reports its reference point (`kl`), the mean rewards of the desirable and undesirable images
# (`reward_desirable`, `reward_undesirable`), the share of desirable images in the batch (`frac_desirable`) and the
# errors of single images (`mse`, `ref_mse`) instead of pairs. At the first step the LoRA is a no-op, every $u$ is 0,
# and each image's loss is $\lambda_y (1 - \sigma(0))$: with $\lambda_d = \lambda_u = 1$ the first logged loss is
# exactly 0.5.

# %%
def solution_1() -> dict:
    lab_results = json.loads((LAB / "results.json").read_text()) if (LAB / "results.json").is_file() else {}
    swapped_dir = LAB / "train" / "dpo_swapped"
    if "dpo_swapped" in lab_results.get("methods", {}) and (swapped_dir / "logs").is_dir():
        swapped_scalars, win_rate = read_scalars(swapped_dir), lab_results["methods"]["dpo_swapped"]["win_rate"]
        source = f"the lab's own run, {swapped_dir}"
    else:  # a lab built with --methods dpo: train and evaluate the swapped run here
        swapped_dir, _ = train("dpo-swapped", "dpo", str(LAB / "data" / "pairs_swapped.parquet"))
        swapped_scalars = read_scalars(swapped_dir)
        swapped_report = evaluate.main([
            "--out", str(WORK / "eval-swapped"), "--base_model", model_dir, "--lora", f"dpo_swapped={swapped_dir}",
            "--prompts", str(prompts_file), "--seeds", "2" if QUICK else "4", "--steps", "10" if QUICK else "20",
            "--guidance", str(GUIDANCE), "--batch_size", "64", "--device", "cpu", "--scorers", RATER,
            "--bootstrap", "1000", "--grid_prompts", "0"])
        win_rate = next(c["win_rate"] for c in swapped_report["win_rates"][RATER]
                        if c["model"] == "dpo_swapped" and c["baseline"] == "base")
        source = "trained here"
    acc = swapped_scalars["train/implicit_acc"]
    z = (acc[1:].mean() - 0.5) / np.sqrt(0.25 / (16 * (len(acc) - 1)))
    print(f"1. swapped labels ({source}): implicit_acc after step 1 {acc[1:].mean():.3f} ({z:.1f} coin SEs above 0.5); "
          f"held-out win rate over base {win_rate:.2f}")
    lesson.check_range("1. on swapped labels implicit_acc still rises above 0.5 (more than 2 coin standard errors)", z, 2.0)
    lesson.check_range("1. ... while the held-out win rate over the base model is below one half", win_rate, high=0.5)
    return {"implicit_acc": float(acc[1:].mean()), "accuracy_z": float(z), "win_rate": win_rate, "source": source}


def solution_2() -> dict:
    steps = 20 if QUICK else 60
    small_dir, _ = train("dpo-beta500", "dpo", pairs_path, beta=500.0, max_train_steps=steps)
    small = read_scalars(small_dir)
    ratio = np.abs(small["train/margin"][1:]).mean() / np.abs(margin[1:steps]).mean()
    excess = {"500": float((small["train/loss"] - np.logaddexp(0.0, -small["train/margin"])).mean()),
              "5000": float(jensen_gap[:steps].mean())}
    print(f"2. first {steps} steps: mean |margin| at beta 500 is {ratio:.3f} x beta 5000's; loss beyond "
          f"softplus(-margin): {excess['500']:.5f} vs {excess['5000']:.4f}; mean loss {small['train/loss'].mean():.4f}")
    lesson.check_range("2. beta 500: the margins start several times smaller (between 1/30 and 1/3 of beta 5000's)", ratio, 1 / 30, 1 / 3)
    lesson.check_range("2. ... the spread's excess is far smaller (below a tenth of beta 5000's)",
                       excess["500"] / excess["5000"], high=0.1)
    lesson.check_close("2. ... and the loss stays within 0.01 of log 2", float(small["train/loss"].mean()), math.log(2),
                       abs_tol=0.01)
    return {"margin_ratio": float(ratio), "excess": excess, "mean_loss": float(small["train/loss"].mean())}


def solution_3() -> dict:
    kto_dir, _ = train("kto-run", "kto", str(LAB / "data" / "feedback.parquet"), max_train_steps=3)
    kto = read_scalars(kto_dir)
    new_tags = sorted(set(kto) - set(scalars))
    print(f"3. KTO logs, beyond DPO's: {new_tags}; first loss {kto['train/loss'][0]:.6f}")
    lesson.check("3. KTO logs its reference point and the two classes' rewards, which DPO does not",
                 {"train/kl", "train/reward_desirable", "train/reward_undesirable", "train/frac_desirable"} <= set(new_tags),
                 str(new_tags))
    lesson.check_close("3. its first logged loss is 1 - sigmoid(0) = 0.5", float(kto["train/loss"][0]), 0.5, abs_tol=1e-4)
    return {"new_tags": new_tags, "first_loss": float(kto["train/loss"][0])}


lesson.run_solutions("07_scaling_up", solution_1, solution_2, solution_3)
