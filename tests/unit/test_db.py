"""state.db is the agent's: every setting checked when written and again when read."""

from __future__ import annotations

import os
import sqlite3

import pytest

from portal.core import store
from portal.core.errors import UnsafePathError
from portal.core.settings import SettingsError


def test_settings_and_progress_round_trip(tmp_path):
    assert store.read_settings(tmp_path) == {}
    assert store.done_steps(tmp_path) == set()
    store.write_settings(tmp_path, {"domain": "Example.COM.", "mail_host": "mail.example.com"})
    store.mark_done(tmp_path, "domain", {"public_ipv4": "192.0.2.10"})
    store.mark_done(tmp_path, "domain")  # twice is fine
    assert store.read_settings(tmp_path) == {"domain": "example.com", "mail_host": "mail.example.com",
                                             "public_ipv4": "192.0.2.10"}
    assert store.done_steps(tmp_path) == {"domain"}
    assert os.stat(tmp_path / "state.db").st_mode & 0o777 == 0o600


@pytest.mark.parametrize("key, value, words", [
    ("domain", "exa mple.com", "not a domain name"),
    ("publish_addresses", "fe80::1%]\n  privileged: true", "line breaks"),
    ("publish_addresses", "fe80::1%eth0", "not an IP address"),
    ("tls_cert", "/x:/usr/bin/tini:ro #", "absolute path"),
    ("tls_cert", "/etc/../root/key", "absolute path"),
    ("no_such_setting", "1", "not a Mailstead setting"),
])
def test_a_bad_value_is_refused_naming_the_setting_and_nothing_is_stored(tmp_path, key, value, words):
    store.write_settings(tmp_path, {"domain": "example.org"})
    with pytest.raises(SettingsError) as err:
        store.write_settings(tmp_path, {"mail_host": "mail.example.org", key: value})
    assert err.value.field == key[:40] and words in str(err.value)
    assert store.read_settings(tmp_path) == {"domain": "example.org"}


def test_a_value_that_did_not_come_through_the_agent_is_refused_where_it_is_used(tmp_path):
    store.write_settings(tmp_path, {"domain": "example.org"})
    with sqlite3.connect(tmp_path / "state.db") as conn:  # as a damaged file or an old backup would
        conn.execute("INSERT INTO settings VALUES ('tls_key', '/:/host #')")
    assert store.read_settings(tmp_path) == {"domain": "example.org"}  # left out (and logged)
    with pytest.raises(SettingsError) as err:
        store.read_settings(tmp_path, strict=True)
    assert err.value.field == "tls_key" and "set it again" in str(err.value)


def test_a_state_db_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere.db").write_bytes(b"")
    (tmp_path / "state.db").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(UnsafePathError):
        store.connect(tmp_path)


def test_the_pickled_job_table_of_an_old_version_is_dropped_unread(tmp_path):
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("CREATE TABLE scheduler_jobs (id TEXT, next_run_time REAL, job_state BLOB)")
        conn.execute("INSERT INTO scheduler_jobs VALUES ('x', 0, x'80049500')")
    os.chmod(tmp_path / "state.db", 0o600)
    assert store.drop_legacy_tables(tmp_path) == ["scheduler_jobs"]
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name='scheduler_jobs'").fetchall()
