"""Which images the stack runs: its version and the image IDs pinned for it.

`<state>/stack-images.json` ({"version", "images": {service: image ID}, "at"})
is written after every successful deploy and upgrade. A deploy uses these
IDs, as long as docker still has them, rather than the images the appliance
ships now: a newer appliance version's images reach the stack only through
an explicit upgrade (portal/stack/upgrade.py).

A stack deployed before this file existed is described by its rendered
compose.yaml: the IDs it pins and the version in its first line.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portal.core import safefs
from portal.core.layout import StateLayout
from portal.stack.settings import SERVICES

PIN_FILE = "stack-images.json"
_HEADER = re.compile(r"^# Mailstead mail stack (\S+): ", re.MULTILINE)
_SERVICE_IMAGE = re.compile(r"^  ([a-z]+):\n(?:    .*\n|\n)*?    image: (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Pin:
    version: str
    images: dict[str, str]
    source: str  # "pin file" or "compose.yaml"

    def public(self) -> dict[str, Any]:
        return {"version": self.version, "images": dict(self.images), "source": self.source}


def pin_path(state_dir: Path) -> Path:
    return StateLayout(Path(state_dir)).stack_images


def read_pin(state_dir: Path) -> Pin | None:
    """The pinned version and image IDs, or None when no stack was ever deployed.
    The pin file is read only if it is the agent's own regular file (a symlink or
    another user's file is refused, not followed)."""
    try:
        data = safefs.read_json(pin_path(state_dir), owner_uid=os.geteuid())
        images = {s: str(data["images"][s]) for s in SERVICES}
        return Pin(str(data["version"]), images, "pin file")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return pin_from_compose(StateLayout(Path(state_dir)).stack)


def pin_from_compose(stack_dir: Path) -> Pin | None:
    """What the rendered compose.yaml pins (a stack deployed before the pin file existed)."""
    try:
        text = safefs.read_text(stack_dir / "compose.yaml", owner_uid=os.geteuid())
    except (OSError, UnicodeDecodeError):
        return None
    header = _HEADER.search(text)
    images = {m.group(1): m.group(2).strip("'\"") for m in _SERVICE_IMAGE.finditer(text)}
    if header is None or not all(images.get(s, "").startswith("sha256:") for s in SERVICES):
        return None
    return Pin(header.group(1), {s: images[s] for s in SERVICES}, "compose.yaml")


def write_pin(state_dir: Path, version: str, images: dict[str, str]) -> None:
    """Write the pin file through the safe-write helper (a new file with a random
    temporary name, renamed into place: nothing at a fixed name is followed)."""
    safefs.ensure_dir(state_dir, 0o755)
    safefs.write_json(pin_path(state_dir), {"version": version, "images": {s: images[s] for s in SERVICES},
                                            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                      0o644)


def present(client: Any, images: dict[str, str]) -> dict[str, str] | None:
    """`images` if docker still has every one of them, else None."""
    import docker.errors

    for image_id in images.values():
        try:
            client.images.get(image_id)
        except docker.errors.ImageNotFound:
            return None
    return dict(images)


def running_images(client: Any, project: str) -> dict[str, str]:
    """{service: image ID} of the project's containers now."""
    out = {}
    for c in client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"}):
        service = c.labels.get("com.docker.compose.service", "")
        if service:
            out[service] = c.attrs.get("Image", "")
    return out
