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
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    return state_dir / PIN_FILE


def read_pin(state_dir: Path) -> Pin | None:
    """The pinned version and image IDs, or None when no stack was ever deployed."""
    try:
        data = json.loads(pin_path(state_dir).read_text())
        images = {s: str(data["images"][s]) for s in SERVICES}
        return Pin(str(data["version"]), images, "pin file")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return pin_from_compose(state_dir / "stack")


def pin_from_compose(stack_dir: Path) -> Pin | None:
    """What the rendered compose.yaml pins (a stack deployed before the pin file existed)."""
    try:
        text = (stack_dir / "compose.yaml").read_text()
    except OSError:
        return None
    header = _HEADER.search(text)
    images = {m.group(1): m.group(2).strip("'\"") for m in _SERVICE_IMAGE.finditer(text)}
    if header is None or not all(images.get(s, "").startswith("sha256:") for s in SERVICES):
        return None
    return Pin(header.group(1), {s: images[s] for s in SERVICES}, "compose.yaml")


def write_pin(state_dir: Path, version: str, images: dict[str, str]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = pin_path(state_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"version": version, "images": {s: images[s] for s in SERVICES},
                               "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                              indent=1, sort_keys=True))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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
