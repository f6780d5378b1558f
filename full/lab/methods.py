"""Every objective of the repository, as the command line that trains it on the lab's model and data.

The lab never calls a trainer's internals: each method is an argv for one of the entry points users launch,

    accelerate launch -m full.train     --method sft | csft | bce | dpo | kto | contrast | dspo
    accelerate launch -m full.spin      (SPIN-Diffusion)
    python -m full.train_spm            (SPO's step-aware preference model), then
    accelerate launch -m full.spo       (SPO)

run either as that subprocess (`make lab`) or as `module.main(argv)` in this process (the test, which saves the
interpreter start-ups). A method's NAME is what it was trained as: `dpo`, `kto_kahneman_tversky`, `dspo_e`, ...
and `dpo_swapped`, Diffusion-DPO on the pairs with winner and loser exchanged: the deliberately broken run,
which must move the rater's score the other way. `NAME_seed<N>` (`sft_seed1`) is NAME trained with `--seed N`
instead of the presets' 0: a second training seed, the same data and evaluation (`method_named`).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from minipref.dspo import VARIANTS as DSPO_VARIANTS
from minipref.methods import get_method
from minipref.kto import UTILITY_NAMES
from minipref.sft import GOOD_PREFIX

from full.cli import ENTRY_OF_KIND
from full.lab.presets import COMMON_FLAGS, FAMILIES, LabConfig


# Which of the lab's data files a row reads by default, by its data kind.
DATA_FILE_OF_KIND = {"paired": "pairs", "binary": "feedback", "self_play": "pairs", "online": "prompts"}


@dataclass(frozen=True)
class Method:
    """A lab arm: a row of the method table (minipref.METHODS) with the lab's preset and flags. The entry point, the
    data file and the sampling prefix follow from the row, so an arm cannot disagree with how its method trains."""

    name: str
    row: str  # the method table's row: its entry point, data kind, label-in-prompt
    family: str  # which preset of presets.FAMILIES
    flags: dict = field(default_factory=dict)  # the row's options and other trainer flags
    data_file: str | None = None  # None: by the row's data kind; "pairs_swapped" for the broken DPO
    seed: int = 0  # the trainer's --seed (its LoRA's initial weights, its batches and noise)

    @property
    def entry(self) -> str:
        return ENTRY_OF_KIND[get_method(self.row).data]  # full.cli's

    @property
    def data(self) -> str:
        return self.data_file or DATA_FILE_OF_KIND[get_method(self.row).data]

    @property
    def prompt_prefix(self) -> str:
        """What the trained model is prompted with before each caption at sampling time (CSFT: "good image, ")."""
        return GOOD_PREFIX if get_method(self.row).label_in_prompt else ""


def all_methods() -> list[Method]:
    methods = [Method("sft", "sft", "sft"),
               # CSFT learns "good image, <caption>" and "bad image, <caption>", and is sampled with the first
               Method("csft", "csft", "sft"),
               # BCE with the implicit reward as its logit: the reference form of paper 000 Eq. (3)
               Method("bce", "bce", "reference", {"bce_reference": True}),
               Method("dpo", "dpo", "reference"),
               # Diffusion-DPO as papers 000/001/002/004 ran it: every UNet weight (--train_mode full, the reference a
               # frozen copy). lr 1e-4, 10x below the LoRA's: the ratio of diffusers' full and LoRA text-to-image
               # examples (1e-5 and 1e-4), since a full step moves every weight by ~lr (Adam), not a rank-8 delta
               Method("dpo_full", "dpo", "reference", {"train_mode": "full", "rank": None, "learning_rate": 1e-4}),
               Method("dpo_swapped", "dpo", "reference", data_file="pairs_swapped")]
    methods += [Method(f"kto_{u}", "kto", "reference", {"utility": u}) for u in UTILITY_NAMES]
    methods.append(Method("contrast", "contrast", "reference"))
    # dspo_sdxl is the authors' switch for SDXL (full/presets/sdxl-dspo.json); the lab's model is SD1.5-shaped
    methods += [Method(v, "dspo", "dspo", {"dspo_variant": v}) for v in DSPO_VARIANTS if v != "dspo_sdxl"]
    methods.append(Method("spin", "spin", "reference", {"num_iterations": 2}))
    methods.append(Method("spo", "spo", "spo"))
    return methods


def paper_setting_methods() -> list[Method]:
    """Arms at a paper's own settings where the lab's preset departs from them in the objective (not in scale: the
    papers' learning rates and batches are for full fine-tuning of SD1.5 and do not transfer to a rank-8 LoRA on the
    lab's model, docs/methods.md). Not part of `make lab`; the replication table (full/lab/claims.py) trains them."""
    # paper 000 Eq. (3): BCE on -MSE with no reference, beta 1 (the lab's `bce` adds the reference)
    return [Method("bce_paper", "bce", "reference", {"beta": 1.0}),
            # paper 001 App. A: desirable ratio 0.8 and beta 5000 in its code's scale = 10000 in ours
            Method("kto_paper", "kto", "reference", {"utility": "kahneman_tversky", "desirable_ratio": 0.8,
                                                     "beta": 10000.0}),
            # paper 002 App. D: beta 2000 for SD1.5 (the lab's preset keeps Diffusion-DPO's 5000; tau 0.01 in both)
            Method("contrast_paper", "contrast", "reference", {"beta": 2000.0}),
            # paper 004 App. D.3 and Sec. 3: lambda (= our beta) 0.001 and gamma 1, at which DSPO is SFT on the
            # winners to within ~1e-5 (docs/conventions.md I8); the preset's beta 5000 with gamma 1/(2 beta) is not
            Method("dspo_paper", "dspo", "dspo", {"dspo_variant": "dspo", "beta": 0.001, "dspo_gamma": 1.0}),
            # paper 003 Sec. 5.1 and its authors' SD1.5 config: rank 4, batch 10, threshold 0.3 and lr 6e-5, scaled
            # by the lab's LoRA factor: every lab arm trains at 10x paper 000's LoRA lr (1e-3 for 1e-4, a 1M-parameter
            # model moved in 300 steps instead of 10000), so SPO's 6e-5 becomes 6e-4
            Method("spo_paper", "spo", "spo", {"rank": 4, "train_batch_size": 10, "threshold": 0.3,
                                               "learning_rate": 6e-4})]


SEED_SUFFIX = re.compile(r"(?P<name>\w+)_seed(?P<seed>\d+)")


def method_named(name: str) -> Method:
    """The method called NAME, or for `NAME_seed<N>` that method trained with `--seed N`; KeyError if neither."""
    by_name = {m.name: m for m in all_methods() + paper_setting_methods()}
    if name in by_name:
        return by_name[name]
    match = SEED_SUFFIX.fullmatch(name)
    if match and match["name"] in by_name:
        return replace(by_name[match["name"]], name=name, seed=int(match["seed"]))
    raise KeyError(name)


def flag_list(flags: dict) -> list[str]:
    """{"learning_rate": 1e-3, "bce_reference": True} -> ["--learning_rate", "0.001", "--bce_reference"]."""
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:  # (0 == False: `not in (None, False)` would drop a 0)
            argv += [f"--{key}", str(value)]
    return argv


def trainer_argv(method: Method, lab: LabConfig, model: Path, clip: Path, spm: Path, data: dict, out: Path) -> list[str]:
    family = FAMILIES[method.family]["flags"]
    smoke = lab.smoke_steps > 0 and method.name not in lab.measured
    steps = lab.smoke_steps if smoke else max(2, round(family.get("max_train_steps", 0) * lab.train_scale))
    flags = {"pretrained_model_name_or_path": model, "output_dir": out, "report_to": "tensorboard",
             "checkpointing_steps": 100_000, **COMMON_FLAGS, "seed": method.seed, **family, "max_train_steps": steps,
             **method.flags}
    if smoke:
        flags["max_train_samples"] = lab.smoke_rows
    if method.entry == "full.train":
        flags.update(method=method.row, dataset_name=data[method.data])
        if get_method(method.row).needs_embeddings:
            flags["clip_model_name_or_path"] = clip
    elif method.entry == "full.spin":  # samples its own losers with the lab's sampler settings
        flags.update(dataset_name=data[method.data], generation_steps=lab.sample_steps,
                     generation_guidance_scale=lab.guidance, generation_batch_size=64)
    elif method.entry == "full.spo":  # samples its own pairs for the 18 training captions; steps follow from epochs
        flags.pop("max_train_steps")
        flags.update(prompts_file=data["prompts"], spm_model_name_or_path=spm, num_inference_steps=lab.sample_steps,
                     guidance_scale=lab.guidance, sample_batch_size=9, num_epochs=max(1, round(4 * lab.train_scale)),
                     threshold=method.flags.get("threshold", 0.1))
        if smoke:  # one collect phase of 9 prompts, every pair kept (a 4-step preference model is not yet sure)
            flags.update(max_train_samples=9, threshold=0.0)
    return flag_list(flags)


def spm_argv(lab: LabConfig, model: Path, clip: Path, pairs: Path, out: Path) -> list[str]:
    """SPO's step-aware preference model, from the lab's CLIP, on the lab's pairs (paper 003, Sec. 4.2)."""
    smoke = lab.smoke_steps > 0 and "spo" not in lab.measured
    return flag_list({"spm_model_name_or_path": clip, "pretrained_model_name_or_path": model, "dataset_name": pairs,
                      "output_dir": out, "guidance_scale": lab.guidance, "learning_rate": 1e-4,
                      "train_batch_size": 16, "max_train_steps": lab.smoke_steps if smoke else 300,
                      "num_validation_pairs": 8 if smoke else 64, "seed": 0})


def run_entry(entry: str, argv: list[str], *, launcher: str, log_file: Path,
              threads: int | None = None) -> tuple[float, float]:
    """Run one entry point; returns (wall seconds, CPU seconds). `launcher`: "accelerate" (a subprocess, as users
    do) or "inprocess". `threads`: the subprocess's torch threads (OMP_NUM_THREADS), for running several at once on
    a few cores. The CPU seconds (user + system of the process and its children, from `os.wait4`; in process:
    `time.process_time`) are what a cost comparison reads: a busy neighbour on a shared machine stretches the wall
    time of a one-thread run, not the CPU time it needs. They include the interpreters' start-up (a few seconds;
    the accelerate launcher's too, for a trainer)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if launcher == "inprocess":
        module = importlib.import_module(entry)
        # full.spo exposes main_requiring_pairs (an SPO run that kept no pair is an error)
        main = getattr(module, "main", None) or getattr(module, "main_requiring_pairs")
        main(argv)
        return time.perf_counter() - start, time.process_time() - cpu_start
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    # the preference model's trainer, the evaluation and the benchmark are plain scripts; the trainers are
    # accelerate programs
    plain = entry in ("full.train_spm", "full.evaluate", "full.bench")
    command = ([sys.executable, "-m", entry] if plain else [*launch, "-m", entry]) + argv
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log_file, "w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)  # the rusage of the launcher and what it waited for
        except BaseException:
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_file.read_text()[-1500:]
        raise RuntimeError(f"{entry} failed with exit status {process.returncode}; see {log_file}:\n{tail}")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime
