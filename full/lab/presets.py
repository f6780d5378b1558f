"""The lab's sizes and settings: the full lab (`python -m full.lab`) and the quick one (`--quick`, the test).

Every number that decides a result is here, next to the reason it was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    vae_channels: tuple = (16, 32, 32)  # 3 blocks: 32 px -> 8 x 8 latents, a factor 4 (SD's 8 is overkill at 32 px)
    unet_channels: tuple = (32, 64)  # 8 x 8 -> 4 x 4, cross-attention in both levels and the middle
    text_width: int = 64  # = the UNet's cross-attention width
    vae_steps: int = 300  # MSE ~0.01 (the reader still reads the reconstructions)
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4  # small: bounded latents, not a prior to sample from (the UNet is the prior)
    pool_size: int = 8000  # encoded scenes the UNet trains on (~220 per caption)
    # 2000 steps at peak lr 2e-3 (warm-up 5%, cosine to 10%): caption fidelity 0.70 at guidance 3 and 0.85 at 7.5,
    # against 0.57 / 0.78 for 1500 steps at 1e-3 and 0.68 / 0.81 for 3000 at 1e-3 (`python -m full.lab.fidelity
    # --pretrain ...`, docs/lab.md)
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 2e-3
    caption_dropout: float = 0.1  # SD1.5 trained with 10% empty prompts, for classifier-free guidance
    ema_decay: float = 0.995  # averages the last ~200 steps: a horizon well inside the run
    clip_width: int = 64  # the tiny CLIP (full/lab/clip.py) for Diff-contrast's f(y, x) and SPO's preference model
    clip_steps: int = 300
    clip_lr: float = 1e-3


FULL_PRETRAIN = PretrainConfig()
# The quick model keeps the 1e-3 its test was measured and built on (docs/lab.md, the quick lab)
QUICK_PRETRAIN = replace(FULL_PRETRAIN, vae_steps=250, pool_size=1500, unet_steps=250, unet_batch=32, unet_lr=1e-3,
                         ema_decay=0.99, clip_steps=60)


# ---------------------------------------------------------------------------------------------------------------
# Preference data, sampling and evaluation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabConfig:
    name: str
    pretrain: PretrainConfig
    images_per_caption: int  # base samples per training caption; consecutive ones are paired
    tie_rate: float = 0.1  # Pick-a-Pic has ties too; the trainers drop them (as Diffusion-DPO does)
    label_noise: float = 0.05  # flipped labels: the rater is a crowd, not an oracle
    desirable_quantile: float = 0.7  # binary feedback: the top 30% of the base samples by score are desirable
    sample_steps: int = 20  # DDIM steps for every sample the lab draws (data, SPIN, SPO, evaluation)
    # CFG scale of every sample the lab draws (data, SPIN, SPO, evaluation). 3, chosen after measuring 3 and SD1.5's
    # default 7.5 on the same pretrained model, trainers and seeds (docs/lab.md, both tables): at 3 the lab tells a
    # correct trainer from a broken one best (win rate over the base model 1.00 / 0.94 for DPO and 0.00 / 0.06 for
    # DPO on swapped pairs in two training seeds; at 7.5 0.72 / 0.72 and 0.28 / 0.28). 7.5 follows the captions better
    # (base fidelity 0.84 against 0.66): `python -m full.lab --guidance 7.5` runs the lab there.
    guidance: float = 3.0
    eval_seeds: int = 8  # images per held-out caption and model (18 captions: the bootstrap runs over them)
    train_scale: float = 1.0  # multiplies every method's steps (quick: fewer)
    methods: tuple = ()  # empty: all
    # `make lab` (subprocesses): this many trainers, and evaluation runs, at once, one torch thread each. Two on two
    # cores: a small model's step is too short to split over threads well, and two runs keep both cores busy.
    workers: int = 2
    # quick only: every method except these trains `smoke_steps` steps on `smoke_rows` rows (it must run to the end
    # and write a LoRA that loads); these train `train_scale` of their preset, enough to move the reward
    measured: tuple = ("sft", "dpo", "dpo_swapped")
    smoke_steps: int = 0  # 0: off, every method trains its full preset
    smoke_rows: int = 18
    # the model family the lab pretrains: "sd15" (full/lab/pretrain.py, a UNet) or "sd3" (full/lab/pretrain_flow.py,
    # an SD3-shaped transformer trained with flow matching; docs/lab_flow.md)
    family: str = "sd15"
    # flags every trainer of this lab gets on top of the presets (the sd3 lab: the T5 length its pipeline samples with)
    trainer_flags: tuple = ()
    # who labels the preference data (full/lab/rater.py, RATERS): "size" (bigger is better, the lab's) or "caption"
    # (the replication's harder one: the caption decides whether bigger or smaller is better)
    rater: str = "size"


FULL = LabConfig("full", FULL_PRETRAIN, images_per_caption=64)
QUICK = LabConfig("quick", QUICK_PRETRAIN, images_per_caption=16, sample_steps=10, eval_seeds=2, train_scale=0.2,
                  smoke_steps=4)


# ---------------------------------------------------------------------------------------------------------------
# Trainer settings, once per method family
# ---------------------------------------------------------------------------------------------------------------

# Flags every offline run shares. rank 8 on the attention projections as paper 000; no warm-up (a few hundred
# steps only); checkpoints only at the end; 32 px is the lab's resolution.
COMMON_FLAGS = {"resolution": 32, "rank": 8, "lr_warmup_steps": 0, "lr_scheduler": "constant", "seed": 0}

# Reference-based objectives (DPO, DSPO, Diff-contrast, KTO, BCE with reference, SPIN): Diffusion-DPO's beta 5000
# (minipref convention; paper 000/004 use it for SD1.5) and the same lr as SFT, so that the families differ only in
# their objective.
REFERENCE_FLAGS = {"learning_rate": 1e-3, "train_batch_size": 16, "max_train_steps": 300, "beta": 5000.0}

FAMILIES = {
    # SFT / CSFT: plain regression on the chosen images; no reference, no beta. lr 1e-3: the LoRA must move a
    # model whose own weights were trained at 1e-3, in a few hundred steps.
    "sft": dict(flags={"learning_rate": 1e-3, "train_batch_size": 32, "max_train_steps": 300},
                reason="no beta; lr as the pretraining's peak so a few hundred steps can move the LoRA"),
    "reference": dict(flags=REFERENCE_FLAGS,
                      reason="Diffusion-DPO's beta 5000 unchanged; batch 16 pairs = 32 images, as SFT's 32"),
    # DSPO (all three variants): the reference family's settings, and gamma = 1 / (2 beta) instead of the paper's 1.
    # At theta = ref DSPO's gradient is (1 - beta gamma / 2) times SFT's on the winners (docs/conventions.md I8): at
    # beta 5000 and gamma 1 that is -2499 x SFT, an anti-SFT start that undoes the pretraining (the lab measured it: no
    # move at all). gamma = 1/(2 beta) is Theorem 1's value: the start is 3/4 SFT and the gate weights the
    # correction (docs/methods.md, "DSPO"). dspo_ref (Eq. 47) has no gamma; it takes the family's flags unchanged.
    "dspo": dict(flags={**REFERENCE_FLAGS, "dspo_gamma": 1.0 / (2.0 * REFERENCE_FLAGS["beta"])},
                 reason="the reference family's beta 5000 with gamma = 1/(2 beta) = 1e-4 (Theorem 1): the paper's "
                        "gamma 1 makes the start -2499 x SFT at this beta"),
    # SPO: its own sampler-in-the-loop trainer; paper 003's beta 10 and clip 0.1 (full/presets/sd15-spo.json).
    "spo": dict(flags={"learning_rate": 1e-3, "train_batch_size": 8, "beta": 10.0},
                reason="paper 003's beta and clip; the lr of the other families"),
}


# ---------------------------------------------------------------------------------------------------------------
# The flow lab (`python -m full.lab --family sd3`, docs/lab_flow.md): the same world, data recipe, presets and
# evaluation on a tiny SD3-shaped pipeline pretrained with the rectified-flow loss (full/lab/pretrain_flow.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowPretrainConfig(PretrainConfig):
    """The UNet lab's pretraining settings (VAE, pool, steps, batch, lr, dropout, EMA: the same numbers, so the two
    labs differ in the denoiser and its loss only) and the transformer's shape."""

    transformer_layers: int = 4  # SD3-medium 24 joint blocks; a few are enough for 36 captions
    transformer_heads: int = 2
    transformer_head_dim: int = 32  # width 64 = the UNet lab's text width
    clip_text_width: int = 32  # each of SD3's two CLIP encoders; concatenated 64 = the T5 width = joint_attention_dim
    # T5 tokens: the pipeline's own default (StableDiffusion3Pipeline.__call__ max_sequence_length=256), which
    # full.evaluate samples with; the trainers get --max_sequence_length 256 to match (the SD3 pipeline passes no
    # attention mask, so the number of pad tokens changes the conditioning)
    t5_length: int = 256


FLOW_FULL_PRETRAIN = FlowPretrainConfig()
FLOW_QUICK_PRETRAIN = FlowPretrainConfig(**{k: v for k, v in vars(QUICK_PRETRAIN).items()})
FLOW_METHODS = ("dpo", "kto_kahneman_tversky", "sft", "dpo_swapped")
FLOW_TRAINER_FLAGS = (("max_sequence_length", FLOW_FULL_PRETRAIN.t5_length),)
FLOW_FULL = replace(FULL, name="full-sd3", pretrain=FLOW_FULL_PRETRAIN, family="sd3", methods=FLOW_METHODS,
                    trainer_flags=FLOW_TRAINER_FLAGS)
# the quick flow lab trains every arm (and NAME_seed<N>) a fifth of its preset: no 4-step smoke runs, every row is
# measured
FLOW_QUICK = replace(QUICK, name="quick-sd3", pretrain=FLOW_QUICK_PRETRAIN, family="sd3", methods=FLOW_METHODS,
                     trainer_flags=FLOW_TRAINER_FLAGS, smoke_steps=0)
