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
# # Lesson 5: scaling up to Stable Diffusion
#
# The toy and the full-scale scripts call the **same** minipref functions; what changes is where the errors come
# from (a UNet on VAE latents instead of an MLP on points), the data (Pick-a-Pic pairs, per-image feedback), and
# the machinery (diffusers pipelines, peft LoRA, accelerate). This lesson walks through that machinery on a *tiny*
# Stable Diffusion 1.5 pipeline built from a config (random weights, 32 px images) so it runs on a laptop CPU in
# seconds; every command takes a hub id in its place for real runs:
#
# | here | for real |
# |---|---|
# | `tests.tiny_models.build_tiny_sd15(dir)` | `stable-diffusion-v1-5/stable-diffusion-v1-5` or `stabilityai/stable-diffusion-xl-base-1.0` |
# | `tests.tiny_models.make_pickapic_parquet(...)` | `yuvalkirstain/pickapic_v2` (or its parquet files) |
# | `tests.tiny_models.build_tiny_clip(dir)` | `yuvalkirstain/PickScore_v1`, `openai/clip-vit-large-patch14` |
# | `--resolution 32`, a few steps, CPU | `--preset sd15-dpo` (512 px, 10k steps), `full/launch/train.sh` on A100s |

# %%
import contextlib
import inspect
import io
import os
import subprocess
import sys
import time

import lesson
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
import torch

QUICK = lesson.QUICK
STEPS = 8 if QUICK else 40
WORK = lesson.OUT / "05_work"
started = time.perf_counter()

# %% [markdown]
# ## 1. The same function, three call sites
#
# `full/trainers/offline.py`'s `compute_loss` is the one place the trainer dispatches on `--method`; each branch is a minipref
# call on `per_sample_mse` errors, exactly like the toy's step functions (lessons 2-4):

# %%
from full.trainers import offline as full_train  # noqa: E402
from toy import methods as toy_methods  # noqa: E402

source = inspect.getsource(full_train.compute_loss).splitlines()
print("\n".join(source[:12]))
print("    ...")
print(inspect.getsource(toy_methods.dpo_step))
lesson.check("full/trainers/offline.py and toy/methods.py both call minipref's dpo_loss",
             "minipref.dpo_loss(" in inspect.getsource(full_train.compute_loss)
             and "objective(ctx)(" in inspect.getsource(toy_methods.dpo_step)
             and toy_methods.METHODS["dpo"].objective == "dpo")

# %% [markdown]
# ## 2. A pipeline and a dataset
#
# The tiny pipeline is a real `StableDiffusionPipeline` directory (UNet, VAE, CLIP text encoder, tokenizer,
# scheduler) written with `save_pretrained`, so the scripts load it the way they load a hub id. The dataset has
# Pick-a-Pic v2's schema: `jpg_0`, `jpg_1` (JPEG bytes), `label_0` (1: `jpg_0` won, 0: `jpg_1` won, 0.5: a tie),
# `caption`. Ties carry no preference: the loader drops them and says how many (`--keep_ties` keeps them).

# %%
from tests.tiny_models import build_tiny_clip, build_tiny_sd15, make_pickapic_parquet  # noqa: E402

WORK.mkdir(parents=True, exist_ok=True)
model_dir = build_tiny_sd15(WORK / "tiny-sd15")  # for real: "stable-diffusion-v1-5/stable-diffusion-v1-5"
pairs_path = make_pickapic_parquet(WORK / "pickapic.parquet", 16 if QUICK else 64, 32, n_ties=2)
table = pq.read_table(pairs_path)
print(table.schema)
print("label_0 values:", sorted(set(table.column("label_0").to_pylist())))

from full import data as full_data  # noqa: E402

full_data.main(["check", pairs_path])
lesson.check("the loader keeps the 14 (or 62) decided pairs and drops the 2 ties",
             len(full_data.load_pair_rows(pairs_path)) == table.num_rows - 2)

# %% [markdown]
# **Per-image feedback** (KTO, BCE, CSFT, SFT) has the schema `image, caption, label`. The trainer converts pairs on
# the fly (`--feedback_policy`), or you convert once with `python -m full.data convert`:
#
# * `pairs-to-feedback --policy winner_once`: desirable = won at least once (Diffusion-KTO, paper 001 App. C.1);
#   `--policy always_win`: desirable = never lost (paper 000's "exclusive win", the BCE preset);
# * `scores-to-pairs` / `scores-to-feedback`: from a scalar score column (a reward model's);
# * `red-filter`: the synthetic user of paper 001 Sec. 6, who likes red-tinted images.

# %%
feedback_path = WORK / "feedback.parquet"
full_data.main(["convert", "pairs-to-feedback", "--input", pairs_path, "--output", str(feedback_path)])
print(pq.read_table(feedback_path).schema)

# %% [markdown]
# **Data with something to learn.** The tiny Pick-a-Pic file above has random images and random labels: nothing
# a model could learn from it. For the training run below we make the red-filter user's data (paper 001 Sec. 6)
# with the same CLI: every image of the file, red-filtered (desirable) and original (undesirable). For DPO we pair
# each red copy (winner) with its original (loser), on alternating sides, in Pick-a-Pic's schema. The only
# difference a model can learn is "redder is better".

# %%
import pyarrow as pa  # noqa: E402

red_feedback_path = WORK / "red_feedback.parquet"
subprocess.run([sys.executable, "-m", "full.data", "convert", "red-filter", "--input", pairs_path, "--input_schema",
                "pairs", "--output", str(red_feedback_path)], cwd=lesson.ROOT, check=True, capture_output=True, text=True)
red = pq.read_table(red_feedback_path).to_pylist()  # rows come as (red copy, label 1), (original, label 0)
pairs = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
for i in range(0, len(red) - 1, 2):
    winner, loser = red[i], red[i + 1]
    assert winner["label"] == 1 and loser["label"] == 0 and winner["caption"] == loser["caption"]
    first, second = (winner, loser) if (i // 2) % 2 == 0 else (loser, winner)  # the winner on alternating sides
    pairs["caption"].append(winner["caption"])
    pairs["jpg_0"].append(first["image"])
    pairs["jpg_1"].append(second["image"])
    pairs["label_0"].append(float(first is winner))
    pairs["label_1"].append(float(second is winner))
red_pairs_path = str(WORK / "red_pairs.parquet")
pq.write_table(pa.table(pairs), red_pairs_path)
lesson.check("one red-filter pair per distinct image of the file, winner on alternating sides",
             len(pairs["caption"]) == len(red) // 2 and 0 < sum(pairs["label_0"]) < len(pairs["label_0"]),
             f"{len(pairs['caption'])} pairs")

# %% [markdown]
# ## 3. Presets: the papers' settings, each with its source
#
# `python -m full.presets` prints every preset; a preset sets the trainer's defaults and any flag on the command
# line wins. The SD1.5 presets use paper 000's LoRA recipe (rank 8, AdamW 1e-4, 500 warm-up, 10k steps) with each
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
# ## 4. Launching on 1 and 8 A100s
#
# `full/launch/train.sh METHOD MODEL CONFIG` builds the launch command (`python -m accelerate.commands.launch`, which
# is `accelerate launch` run by a chosen interpreter, `PYTHON`) from the preset and an
# accelerate config in `full/launch/accelerate/` (`1gpu`, `8gpu_ddp`, `8gpu_zero2`). The presets describe one
# A100-80GB (per-device batch x accumulation); on 8 GPUs the script divides the accumulation by 8 so the effective
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
# ## 5. Training for a few steps
#
# `full.train.main(argv)` is the entry point `accelerate launch -m full.train` runs, callable in-process. Here:
# DPO on the red-filter pairs, rank-8 LoRA, 32 px, batch 4, lr 1e-4 (the SD1.5 presets'), `--report_to tensorboard`. It returns a summary and writes the LoRA in
# diffusers format (`pytorch_lora_weights.safetensors`) plus LoRA-only checkpoints.

# %%
run_dir = WORK / "dpo-run"
quiet = contextlib.redirect_stderr(io.StringIO())  # the trainer's own progress bar: useful in a terminal, noise here
with quiet:
    summary = full_train.main([
        "--pretrained_model_name_or_path", model_dir, "--method", "dpo", "--dataset_name", red_pairs_path,
        "--output_dir", str(run_dir), "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", str(STEPS),
        "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--checkpointing_steps", str(STEPS), "--seed", "0",
        "--report_to", "tensorboard",
    ])
print({k: round(v, 4) for k, v in summary["metrics"].items()})
lesson.check("the run finished and saved a diffusers-format LoRA",
             summary["global_step"] == STEPS and (run_dir / "pytorch_lora_weights.safetensors").is_file())

# %% [markdown]
# ## 6. Reading the logs
#
# Every metric the loss reports goes to TensorBoard under `train/` (`tensorboard --logdir runs/.../logs`), averaged
# over gradient-accumulation micro-batches and processes. For DPO: `loss`, `implicit_acc`, `margin`, `reward_w`,
# `reward_l`, `mse_w`, `mse_l`, `ref_mse_w`, `ref_mse_l`, `lr`. What to look at first (lesson 2): `implicit_acc` and
# `margin` rising while `loss` sits near 0.693 is a healthy start; `mse_w` and `ref_mse_w` drifting far apart means
# the policy is moving away from the reference fast (lower the lr or raise beta).
#
# **What this run can and cannot show.** The red-filter pairs have something to learn, but this UNet has random
# weights and gets a handful of CPU steps of 4 pairs. Its LoRA barely moves at lr 1e-4: the loss stays within 0.15
# of `log 2` (checked below), and the per-batch accuracy of 4 pairs wanders around 0.5 without the rise a real run
# shows; in our trials neither more steps (24) nor lr 3e-4 or 1e-3 gave a rising accuracy on this tiny model. So
# the curves below show the mechanics (what is logged, where, and the exact `log 2` start), not learning; lesson 2
# shows a healthy start on the toy.

# %%
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

event_files = sorted((run_dir / "logs").rglob("events.out.tfevents.*"))
scalars = {}
for path in event_files:
    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    for tag in accumulator.Tags()["scalars"]:
        scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
print(sorted(scalars))
lesson.check("every step logged loss and implicit_acc", len(scalars.get("train/loss", [])) == STEPS
             and len(scalars.get("train/implicit_acc", [])) == STEPS)
lesson.check("the first logged loss is log 2 (the LoRA starts as a no-op: B = 0)",
             abs(scalars["train/loss"][0][1] - np.log(2)) < 1e-4, f"{scalars['train/loss'][0][1]:.5f}")
largest_departure = max(abs(v - np.log(2)) for _, v in scalars["train/loss"])
lesson.check_range("at lr 1e-4 the loss stays within 0.15 of log 2 for the whole run", largest_departure, high=0.15)

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for ax, tag in zip(axes, ("train/loss", "train/implicit_acc", "train/margin")):
    steps, values = zip(*scalars[tag])
    ax.plot(steps, values, marker="o")
    ax.set_title(tag)
    ax.set_xlabel("step")
axes[0].axhline(np.log(2), color="0.6", ls=":")
lesson.save_figure(fig, "05_tensorboard_scalars")

# %% [markdown]
# ## 7. Loading the LoRA and evaluating
#
# The saved LoRA loads into a fresh pipeline with `pipe.load_lora_weights(dir)`, as users will load it.
# `python -m full.evaluate` generates with fixed seeds (the same seeds for every model: a paired comparison),
# scores with reward models and reports mean +- std, win rates with bootstrap CIs, and Wilcoxon p-values
# (docs/evaluation.md). The tiny CLIP here has random weights, so its scores mean nothing; the mechanics are real.

# %%
from diffusers import StableDiffusionPipeline  # noqa: E402

pipe = StableDiffusionPipeline.from_pretrained(model_dir)
pipe.set_progress_bar_config(disable=True)


def draw():
    return pipe(["a photo of a cat"], num_inference_steps=4, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


before = draw()
pipe.load_lora_weights(str(run_dir))
after = draw()
print(f"largest pixel change from the LoRA: {np.abs(after - before).max():.4f}")
lesson.check("the LoRA loads with load_lora_weights and changes the samples", np.abs(after - before).max() > 0)

clip_dir = build_tiny_clip(WORK / "tiny-clip")  # for real: the defaults, yuvalkirstain/PickScore_v1 and CLIP ViT-L/14
from full.eval import evaluate  # noqa: E402

eval_dir = WORK / "eval"
report = evaluate.main([
    "--out", str(eval_dir), "--base-model", model_dir, "--lora", f"dpo={run_dir}", "--prompts", "paper000",
    "--max-prompts", "2" if QUICK else "6", "--seeds", "2" if QUICK else "3", "--steps", "2" if QUICK else "10",
    "--device", "cpu", "--scorers", "pickscore,clip", "--pickscore-model", clip_dir, "--clip-model", clip_dir,
    "--bootstrap", "200" if QUICK else "2000",
])
lesson.check("evaluate wrote results.json, results.md and the plots",
             all((eval_dir / f).exists() for f in ("results.json", "results.md", "plots/means.png", "plots/win_rates.png")))

# %% [markdown]
# ## Where to go from here
#
# * docs/methods.md: one row per objective (paper, equation, file, data, the papers' hyperparameters, our preset).
# * docs/conventions.md: the one beta and its table across implementations.
# * docs/faq.md: the flat 0.693 loss, beta 2500 vs 5000, NaN with SDXL's VAE, LoRA keys, out of memory.
#
# A real run, end to end:
#
# ```bash
# full/launch/train.sh dpo sd15 8gpu_ddp                 # 10k steps of the sd15-dpo preset on 8 A100s
# tensorboard --logdir runs/sd15-dpo-8gpu_ddp/logs
# python -m full.evaluate --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 \
#     --lora dpo=runs/sd15-dpo-8gpu_ddp --prompts paper000 --scorers pickscore,clip --out eval/sd15
# ```

# %% [markdown]
# ## Takeaways
#
# * The trainers call the same minipref functions as the toy; what changes is where the errors come from (a UNet on
#   latents), the data loaders and converters, and the machinery (LoRA, accelerate, presets, launch scripts).
# * A LoRA run starts exactly at `log 2` (B = 0), logs every metric the loss reports, and saves a LoRA that loads
#   with `load_lora_weights`.
# * A few CPU steps of a random-weight model show the mechanics, not learning: judge a real run by
#   `train/implicit_acc` and `train/margin` over thousands of steps (lesson 2).
#
# ## Exercises
#
# 1. Train with `--method kto` on `red_feedback.parquet` (per-image labels) instead of the pairs, and predict which
#    metrics TensorBoard will show that DPO's run did not.
# 2. Predict the first logged loss of a KTO run (Kahneman-Tversky utility) before running it. (Lesson 3.)
# 3. Read `DRY_RUN=1 full/launch/train.sh dpo sdxl 8gpu_ddp`'s output and work out the effective batch size.

# %%
elapsed = time.perf_counter() - started
print(f"lesson 5 took {elapsed:.1f} s")
lesson.save_results("05_scaling_up", {
    "quick": QUICK, "steps": STEPS, "metrics": summary["metrics"], "logged_tags": sorted(scalars),
    "lora_pixel_change": float(np.abs(after - before).max()), "seconds": elapsed,
})
