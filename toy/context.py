"""What a method's fine-tuning step may use (``FineTuneContext``): its spec, the policy and the frozen reference,
the noise schedule and samplers, the preference data and the step's random generator. Its own module so that the
steps (toy/methods.py, toy/spo.py) and the loop that calls them (toy/train.py) import it without importing each
other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .data import PreferenceData
from .schedule import DDIMSteps, DPMSolver, NoiseSchedule


@dataclass
class FineTuneContext:
    """Everything a method's step function may use. ``state`` holds per-method extras (SPIN's opponent, SPO's SPM)."""

    spec: object  # the toy.methods.MethodSpec being trained
    policy: nn.Module
    reference: nn.Module
    scheduler: NoiseSchedule
    sampler: DPMSolver
    ddim: DDIMSteps
    data: PreferenceData
    generator: torch.Generator
    state: dict = field(default_factory=dict)
