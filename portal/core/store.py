"""state.db: the agent's own database (root, 0600), and the only way to it.

Tables: `settings` (key/value text, every value checked by portal/core/settings.py
when written and again when read), `wizard_progress` (the setup steps done),
plus the tables the scheduler and the health checks keep (they create their
own through `connect`). Nothing in it is ever unpickled; it holds text and
numbers only.

The web process never opens it: it asks the agent (portal/web/state.py).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

from portal.core.errors import UnsafePathError
from portal.core.layout import StateLayout
from portal.core.settings import RETIRED, SettingsError, check_setting, check_settings

log = logging.getLogger("mailstead.store")

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
# Tables an earlier version kept here that are never read again (APScheduler's
# pickled job store: unpickling it would run whatever was written into it).
DROPPED_TABLES = ("scheduler_jobs",)


def _layout(where: StateLayout | Path | str) -> StateLayout:
    return where if isinstance(where, StateLayout) else StateLayout(Path(where))


def _check_db_file(path: Path) -> None:
    """state.db must be a regular file of this process's user, not a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path} is not a regular file (a symlink?); as root, remove it and restart "
                              "mailstead-agent")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to uid {st.st_uid}, not to the agent; as root, check it "
                              "(the web process must never write the agent's state)")


def connect(where: StateLayout | Path | str, *, create: bool = True) -> sqlite3.Connection:
    """Open state.db (made 0600 if missing, with the schema). `where` is the state
    folder or its layout."""
    layout = _layout(where)
    path = layout.state_db
    _check_db_file(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(path)
        from portal.core.safefs import ensure_dir

        if not layout.root.exists():
            ensure_dir(layout.root, 0o755)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
    conn = sqlite3.connect(path, timeout=10)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


def drop_legacy_tables(where: StateLayout | Path | str) -> list[str]:
    """Remove tables no version reads any more (never read, only dropped)."""
    conn = connect(where)
    dropped = []
    try:
        with conn:
            for table in DROPPED_TABLES:
                found = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                     (table,)).fetchone()
                if found:
                    conn.execute(f"DROP TABLE {table}")  # noqa: S608 - a name from the tuple above
                    dropped.append(table)
    finally:
        conn.close()
    return dropped


# -- settings --------------------------------------------------------------------------

def read_settings(where: StateLayout | Path | str, *, strict: bool = False) -> dict[str, str]:
    """Every stored setting, each checked again. A stored value that fails its check
    (not written by this agent: a damaged file, an old backup) raises SettingsError
    naming it when `strict`; otherwise it is left out and logged."""
    layout = _layout(where)
    if not layout.state_db.exists():
        return {}
    conn = connect(layout)
    try:
        rows = conn.execute("SELECT key, value FROM settings").fetchall()
    finally:
        conn.close()
    out: dict[str, str] = {}
    for row in rows:
        if row["key"] in RETIRED:
            continue
        try:
            out[row["key"]] = check_setting(row["key"], row["value"])
        except SettingsError as exc:
            if strict:
                raise SettingsError(exc.field or row["key"],
                                    f"the stored value is not valid ({exc.message}); set it again") from None
            log.warning("ignoring the stored setting %s: %s", str(row["key"])[:40], exc.message)
    return out


def read_setting(where: StateLayout | Path | str, key: str, default: str = "") -> str:
    return read_settings(where).get(key, default)


def write_settings(where: StateLayout | Path | str, values: Mapping[str, object]) -> dict[str, str]:
    """Check every value (SettingsError names the first bad one, nothing is stored
    then) and store them all in one transaction; returns what was stored."""
    checked = check_settings(values)
    conn = connect(where)
    try:
        with conn:
            _upsert(conn, checked)
    finally:
        conn.close()
    return checked


def delete_settings(where: StateLayout | Path | str, keys: Iterable[str]) -> None:
    conn = connect(where)
    try:
        with conn:
            conn.executemany("DELETE FROM settings WHERE key = ?", [(k,) for k in keys])
    finally:
        conn.close()


def _upsert(conn: sqlite3.Connection, values: Mapping[str, str]) -> None:
    conn.executemany(
        "INSERT INTO settings (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        list(values.items()),
    )


# -- wizard progress ----------------------------------------------------------------------

def done_steps(where: StateLayout | Path | str) -> set[str]:
    layout = _layout(where)
    if not layout.state_db.exists():
        return set()
    conn = connect(layout)
    try:
        return {row["step_id"] for row in conn.execute("SELECT step_id FROM wizard_progress")}
    finally:
        conn.close()


def mark_done(where: StateLayout | Path | str, step_id: str, values: Mapping[str, object] | None = None) -> None:
    """Mark a wizard step done, storing its settings (checked) in the same transaction."""
    checked = check_settings(values or {})
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    conn = connect(where)
    try:
        with conn:
            _upsert(conn, checked)
            conn.execute("INSERT INTO wizard_progress (step_id, done_at) VALUES (?, ?) "
                         "ON CONFLICT(step_id) DO UPDATE SET done_at = excluded.done_at", (step_id, now))
    finally:
        conn.close()
