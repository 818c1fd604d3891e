"""What every check is given."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_mesh.qualify.profiles import Profile


@dataclass
class Context:
    profile: Profile
    out: Path
    """The report directory; checks write logs and scratch files below it."""
    deadline: float
    """time.time() by which the whole qualification must end."""

    @property
    def device(self) -> torch.device:
        if self.profile.cpu:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def remaining(self) -> float:
        return self.deadline - time.time()

    def sync(self) -> None:
        """Wait for the device (a clock read after it times the device's work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
