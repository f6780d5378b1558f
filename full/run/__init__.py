"""The one training run every trainer (offline, SPIN, SPO) goes through.

accelerator.py  the Accelerator (DDP over gloo on a CPU-only machine), trackers checked at start, the optimizer
checkpoints.py  what a checkpoint holds (LoRA + optimizer + data position), written atomically, resumed
loop.py         `TrainingRun`: resume, the optimizer step, NaN/Inf stop, metrics, progress bar, checkpoints,
                validation, final save; a trainer hands it its data and a function that computes one loss
validation.py   sample a grid with the training UNet (or the saved LoRA) and send it to every tracker
outputs.py      what a finished run leaves in --output_dir besides the LoRA: args.json, README.md (model card),
                and the optional push to the Hub
"""
