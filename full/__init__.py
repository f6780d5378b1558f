"""Full-scale preference fine-tuning of Stable Diffusion 1.5 / SDXL with the minipref objectives.

Entry points (each also a console script, see pyproject.toml), thin shims over the library below:
    train.py  spin.py  spo.py  train_spm.py  cache.py  evaluate.py  bench.py   (`python -m full.<name>`)

cli.py      one-line input errors, --debug, the shared flags (diffusers names), presets as defaults
run/        the one training loop: accelerator, resume, step, NaN stop, metrics, checkpoints, validation, outputs
trainers/   what each trainer adds: its flags, data and one step (offline.py, spin.py, spo.py, spm.py)
models/     diffusers / peft glue: pipeline parts, prompt and image encoding, LoRA, the reference
data/       rows from parquet / the Hub, image datasets, samplers, converters, the latent cache
online/     what the online methods sample with: SPIN's opponent and generation, SPO's sampler, rollouts, SPM
eval/       generate with fixed seeds, score, statistics, plots (`python -m full.evaluate`)
presets/    each paper's settings with their sources (`python -m full.presets`)
launch/     accelerate configs and train.sh
"""

import logging as _logging


class _PilFallbackIsIntended(_logging.Filter):
    """transformers warns that its CLIP/SigLIP image processors "require torchvision" and falls back to the PIL ones,
    once per processor class, on every run. The PIL processors are the ones minipref uses on purpose: PyPI's
    torchvision wheels must match the installed torch build exactly, and a CPU torch beside a mismatched torchvision
    fails to import. So that notice says nothing a user should act on; every other transformers warning stays."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_PilFallbackIsIntended())
