"""`RunConfig`: everything the run loop (`full/run/`) needs to know about a run, as typed fields.

A trainer builds it once its flags are final (`full.cli.run_config(args)`: each field from the flag of the same
name); `full/run` never sees the parsed command line. ``flags`` keeps every flag's resolved value as a plain dict
for what records them all: `args.json`, the trackers' config, the model card's hyperparameter table and the run's
identity (full/run/output_dir.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from full.models.config import ModelConfig


@dataclass(frozen=True)
class RunConfig:
    method: str
    output_dir: str
    model: ModelConfig  # what validation samples with; the model card's base model; the run's identity
    flags: dict = field(default_factory=dict)
    seed: int = 0
    resolution: int | None = None
    # the batch: processes x train_batch_size x gradient_accumulation_steps
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    # the optimizer and its schedule
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    optimizer: str = "adamw"  # adamw | adafactor | adamw_8bit
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None  # None: the accelerate config's
    # checkpoints, trackers, the Hub
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "minipref"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    # validation grids
    validation_prompts: list[str] | None = None
    validation_steps: int = 500
    num_validation_images: int = 2
    num_validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5

    def flag(self, name: str, default=None):
        """A flag's resolved value (None, or ``default``, when this entry point has no such flag)."""
        return self.flags.get(name, default)

