"""state.db helpers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flask import Flask

from portal.web import db


def test_schema_is_created_on_first_use(app: Flask, state_dir: Path) -> None:
    with app.app_context():
        assert db.get_settings() == {}
        assert db.done_steps() == set()
    conn = sqlite3.connect(state_dir / "state.db")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {"settings", "wizard_progress"} <= tables


def test_settings_and_progress_round_trip(app: Flask) -> None:
    with app.app_context():
        db.set_settings({"a": "1", "b": "2"})
        db.set_settings({"a": "3"})
        db.save_step("domain", {"domain": "example.com"})
        db.mark_step_done("domain")  # twice is fine
        assert db.get_settings() == {"a": "3", "b": "2", "domain": "example.com"}
        assert db.get_setting("missing", "default") == "default"
        assert db.done_steps() == {"domain"}


def test_read_setting_outside_a_request(app: Flask, state_dir: Path, tmp_path: Path) -> None:
    assert db.read_setting(tmp_path / "absent.db", "x") is None
    assert not (tmp_path / "absent.db").exists()  # read-only: creates nothing
    sqlite3.connect(tmp_path / "empty.db").close()
    assert db.read_setting(tmp_path / "empty.db", "x") is None
    with app.app_context():
        db.set_settings({"setup_complete": "1"})
    assert db.read_setting(state_dir / "state.db", "setup_complete") == "1"
