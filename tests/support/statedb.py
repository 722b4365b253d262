"""state.db as the tests set it up: raw rows, written by the test (as root, like the
agent) without the agent's checks, so a test can also store a value the agent would
refuse and see it refused where it is used. Paths are the state.db file's."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from portal.core import store


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (and if needed create) the state.db at `path` with the schema in place."""
    return store.connect(Path(path).parent)


def write_settings(path: str | Path, values: dict[str, str]) -> None:
    conn = connect(path)
    try:
        with conn:
            conn.executemany("INSERT INTO settings (key, value) VALUES (?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", list(values.items()))
    finally:
        conn.close()


def read_setting(path: str | Path, key: str) -> str | None:
    if not Path(path).exists():
        return None
    conn = connect(path)
    try:
        row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def read_settings(path: str | Path) -> dict[str, str]:
    if not Path(path).exists():
        return {}
    conn = connect(path)
    try:
        return {k: v for k, v in conn.execute("SELECT key, value FROM settings")}
    finally:
        conn.close()


def done_steps(path: str | Path) -> set[str]:
    if not Path(path).exists():
        return set()
    conn = connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT step_id FROM wizard_progress")}
    finally:
        conn.close()


def mark_done(path: str | Path, *steps: str) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    conn = connect(path)
    try:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO wizard_progress (step_id, done_at) VALUES (?, ?)",
                             [(s, now) for s in steps])
    finally:
        conn.close()
