"""The old in-app state.db calls, for tests that set up or inspect a state inside an
app context: they act on the state folder the test gave its app (TEST_STATE_DIR).
The portal itself no longer has them: it asks the agent (portal/web/state.py)."""

from __future__ import annotations

from pathlib import Path

from flask import current_app

from tests.support import statedb


def _db() -> Path:
    return Path(current_app.config["TEST_STATE_DIR"]) / "state.db"


def get_settings() -> dict[str, str]:
    return statedb.read_settings(_db())


def get_setting(key: str, default: str | None = None) -> str | None:
    return get_settings().get(key, default)


def set_settings(values: dict[str, str]) -> None:
    statedb.write_settings(_db(), values)


def done_steps() -> set[str]:
    return statedb.done_steps(_db())


def mark_step_done(step_id: str) -> None:
    statedb.mark_done(_db(), step_id)


def save_step(step_id: str, values: dict[str, str]) -> None:
    set_settings(values)
    mark_step_done(step_id)


# Path-based, outside an app context (the state.db file's path).
connect = statedb.connect
write_settings = statedb.write_settings
read_setting = statedb.read_setting
