"""The admin dashboard (after setup): one module per area, each with a blueprint
`bp` and a `NAV` entry (portal.web.dashboard.Nav). Areas are found by module, like
the wizard's steps, so adding an area is adding a module. Every endpoint here
needs an admin session (portal/web/auth.py)."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from flask import render_template


@dataclass(frozen=True)
class Nav:
    order: int
    title: str
    endpoint: str


def area_modules() -> list[ModuleType]:
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
               if not info.name.startswith("_")]
    return sorted((m for m in modules if hasattr(m, "bp")), key=lambda m: getattr(m, "NAV", Nav(999, "", "")).order)


def nav() -> list[Nav]:
    return [m.NAV for m in area_modules() if hasattr(m, "NAV")]


def render_dashboard(template: str, current: str, **context: Any) -> str:
    """Render a dashboard page with the navigation (`current`: the area's endpoint)."""
    return render_template(template, nav=nav(), current=current, **context)
