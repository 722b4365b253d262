"""state.db: settings and wizard progress (sqlite, schema created on demand)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the agent uses this module without flask (connect, write_settings)
    from flask import Flask

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS wizard_progress (
    step_id TEXT PRIMARY KEY,
    done_at TEXT NOT NULL
);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (and if needed create) state.db with the schema in place."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


def get_db() -> sqlite3.Connection:
    """The request's connection (opened on first use, closed at teardown)."""
    from flask import current_app, g

    if "db" not in g:
        g.db = connect(current_app.config["DB_PATH"])
    return g.db


def close_db(_exc: BaseException | None = None) -> None:
    from flask import g

    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(close_db)


# -- settings -----------------------------------------------------------------

def get_setting(key: str, default: str | None = None) -> str | None:
    row = get_db().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row["value"] if row else default


def get_settings() -> dict[str, str]:
    rows = get_db().execute("SELECT key, value FROM settings").fetchall()
    return {row["key"]: row["value"] for row in rows}


def set_settings(values: dict[str, str]) -> None:
    conn = get_db()
    with conn:
        _upsert_settings(conn, values)


def _upsert_settings(conn: sqlite3.Connection, values: dict[str, str]) -> None:
    conn.executemany(
        "INSERT INTO settings (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        list(values.items()),
    )


# -- wizard progress -----------------------------------------------------------

def done_steps() -> set[str]:
    rows = get_db().execute("SELECT step_id FROM wizard_progress").fetchall()
    return {row["step_id"] for row in rows}


def mark_step_done(step_id: str) -> None:
    conn = get_db()
    with conn:
        _mark_done(conn, step_id)


def save_step(step_id: str, values: dict[str, str]) -> None:
    """Store a step's settings and mark it done in one transaction."""
    conn = get_db()
    with conn:
        _upsert_settings(conn, values)
        _mark_done(conn, step_id)


def _mark_done(conn: sqlite3.Connection, step_id: str) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    conn.execute(
        "INSERT INTO wizard_progress (step_id, done_at) VALUES (?, ?) "
        "ON CONFLICT(step_id) DO UPDATE SET done_at = excluded.done_at",
        (step_id, now),
    )


# -- outside a request (firstboot, CLI) ---------------------------------------------

def read_setting(path: str | Path, key: str) -> str | None:
    """Read one setting without creating anything; None if db/table/key is missing."""
    if not Path(path).exists():
        return None
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=10)
    try:
        row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0] if row else None


def write_settings(path: str | Path, values: dict[str, str]) -> None:
    """Store settings in the state.db at `path` in one transaction (the agent's side)."""
    conn = connect(path)
    try:
        with conn:
            _upsert_settings(conn, values)
    finally:
        conn.close()
