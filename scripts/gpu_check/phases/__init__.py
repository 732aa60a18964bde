"""The phases of the GPU check, one module each, in running order (:data:`PHASES`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..context import Context
from .assets import phase_assets
from .checkpoint import phase_checkpoint
from .environment import phase_environment
from .fit import phase_fit
from .fsdp import phase_fsdp
from .heal import phase_heal
from .heal_memory import phase_heal_memory
from .released import phase_released
from .validate import phase_validate

__all__ = ["PHASES", "phase_assets", "phase_checkpoint", "phase_environment", "phase_fit", "phase_fsdp", "phase_heal",
           "phase_heal_memory", "phase_released", "phase_validate"]


PHASES: dict[str, tuple[Callable[[Context], dict[str, Any]], tuple[str, ...]]] = {
    "environment": (phase_environment, ()),
    "assets": (phase_assets, ()),
    "fit": (phase_fit, ("assets",)),
    "validate": (phase_validate, ("fit",)),
    "checkpoint": (phase_checkpoint, ("fit",)),
    "heal": (phase_heal, ("assets",)),
    "heal_memory": (phase_heal_memory, ("assets",)),
    "fsdp": (phase_fsdp, ("assets",)),
    "released": (phase_released, ("assets",)),
}
"""name -> (function, phases it needs to have succeeded), in running order."""
