"""Settings and wizard progress written the agent's way (checked), for test rigs."""

from __future__ import annotations

from pathlib import Path

from portal.core import store


def write_settings(state_dir: Path, **values: str) -> dict[str, str]:
    """Store settings in `state_dir`'s state.db through the agent's checks."""
    return store.write_settings(state_dir, values)


def mark_done(state_dir: Path, *steps: str) -> None:
    for step in steps:
        store.mark_done(state_dir, step)
