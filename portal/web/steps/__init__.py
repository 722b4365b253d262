"""Wizard steps: one module per step, each with a blueprint `bp` and a `STEP`
(portal.web.wizard.Step). Steps are found here by module, so adding a step is
adding a module; their order is Step.order."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def step_modules() -> list[ModuleType]:
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
               if not info.name.startswith("_")]
    return sorted((m for m in modules if hasattr(m, "STEP")), key=lambda m: m.STEP.order)
