"""The one training run every trainer (offline, SPIN, SPO) goes through.

config.py       `RunConfig`: the run's flags as one typed value (what everything here takes)
accelerator.py  the Accelerator (DDP over gloo on a CPU-only machine), trackers checked at start, the optimizer
checkpoints.py  what a checkpoint holds (LoRA + optimizer + data position), written atomically, resumed
loop.py         `TrainingRun`: resume, the optimizer step, NaN/Inf stop, metrics, progress bar, checkpoints,
                validation, final save; a trainer hands it its data and a function that computes one loss
phases.py       collect-then-train (SPO): the policy makes each phase's micro-batches, then trains on them
output_dir.py   --output_dir claimed for one run (its identity recorded), --resume_from_checkpoint checked
global_batch.py statistics over the whole batch of all processes (KTO's reference point, Diff-contrast's weights)
validation.py   sample a grid with the training UNet (or the saved LoRA) and send it to every tracker
outputs.py      what a finished run leaves in --output_dir besides the LoRA: args.json, README.md (model card),
                and the optional push to the Hub
"""
