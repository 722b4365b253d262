"""portal.backup.snapshot: what a restore reads from a snapshot restored into a scratch
folder, checked as untrusted input before anything is written (the restic round trips
are in tests/integration/test_restore_untrusted.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from portal.backup import BackupError
from portal.backup.snapshot import read_accounts_db, read_folder, read_plan, read_state_db
from portal.stack.accounts import Accounts, NoKeys


def state_db(path: Path, settings: dict[str, object], steps: dict[str, str] | None = None,
             view: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    with conn:
        if view:
            conn.execute("CREATE TABLE t (key, value)")
            conn.executemany("INSERT INTO t VALUES (?, ?)", list(settings.items()))
            conn.execute("CREATE VIEW settings AS SELECT key, value FROM t")
        else:
            conn.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.executemany("INSERT INTO settings VALUES (?, ?)", list(settings.items()))
        conn.execute("CREATE TABLE wizard_progress (step_id TEXT PRIMARY KEY, done_at TEXT NOT NULL)")
        conn.executemany("INSERT INTO wizard_progress VALUES (?, ?)", list((steps or {}).items()))
    conn.close()
    return path


def test_settings_are_taken_only_when_restorable_and_valid(tmp_path: Path) -> None:
    db = state_db(tmp_path / "db" / "state.db",
                  {"domain": "Example.TEST", "tls_cert": "/:/host #", "stack_project": "x", "no_such_key": "1",
                   "setup_complete": "1"},
                  {"domain": "2030-01-01T00:00:00+00:00", "admin": "yesterday", "evil-step": "now"})
    settings, skipped, steps = read_state_db(db, tmp_path)
    assert settings == {"domain": "example.test", "setup_complete": "1"}  # normalized by its checker
    assert skipped == ["no_such_key", "stack_project", "tls_cert"]
    assert set(steps) == {"domain", "admin"} and steps["domain"] == "2030-01-01T00:00:00+00:00"
    assert not list(db.parent.glob("*-journal"))


@pytest.mark.parametrize("key, value", [("dns_servers", "fe80::1%]\n  privileged: true"), ("domain", 5),
                                        ("message_size_limit_mb", "99999")])
def test_a_restorable_setting_that_fails_its_check_is_refused_naming_it(tmp_path: Path, key: str,
                                                                         value: object) -> None:
    db = state_db(tmp_path / "state.db", {key: value})
    with pytest.raises(BackupError) as err:
        read_state_db(db, tmp_path)
    assert f"the snapshot's setting {key} is not valid" in err.value.message
    assert err.value.field == "snapshot" and "nothing was changed" in err.value.message


def test_a_settings_view_is_not_a_settings_table(tmp_path: Path) -> None:
    with pytest.raises(BackupError) as err:
        read_state_db(state_db(tmp_path / "state.db", {"domain": "example.test"}, view=True), tmp_path)
    assert "no settings table" in err.value.message


def accounts_db(path: Path) -> Path:
    accounts = Accounts(path)
    accounts.create_mailbox("alice@example.test", "alice's long password", 10, keys=NoKeys())
    accounts.add_alias("info@example.test", "alice@example.test")
    return path


def test_accounts_come_as_checked_rows_in_a_new_database(tmp_path: Path) -> None:
    data, counts = read_accounts_db(accounts_db(tmp_path / "accounts.db"), tmp_path)
    assert counts == {"domains": 1, "mailboxes": 1, "aliases": 1}
    (tmp_path / "new.db").write_bytes(data)
    new = Accounts(tmp_path / "new.db")
    assert new.list_mailboxes() == Accounts(tmp_path / "accounts.db").list_mailboxes()
    assert new.list_aliases() == [{"source": "info@example.test", "destination": "alice@example.test"}]


def read_kdf(data: bytes, where: Path) -> tuple[int, str]:
    where.write_bytes(data)
    with sqlite3.connect(where) as conn:
        return conn.execute("SELECT key_kdf, key_salt FROM mailboxes").fetchone()


def test_the_mail_key_derivation_comes_back_with_its_salt(tmp_path: Path) -> None:
    """A mailbox's key derivation (version 2 and its salt) is restored: without it the
    restored mailbox's keys would not open with its password (found by the integration
    tier: a restore lost both columns)."""
    db = accounts_db(tmp_path / "accounts.db")
    with sqlite3.connect(db) as conn:
        want = conn.execute("SELECT key_kdf, key_salt FROM mailboxes").fetchone()
    assert want[0] == 2 and len(want[1]) == 32
    data, _ = read_accounts_db(db, tmp_path)
    assert read_kdf(data, tmp_path / "new.db") == want


def test_a_snapshot_from_before_the_key_derivation_restores_as_version_1(tmp_path: Path) -> None:
    db = accounts_db(tmp_path / "accounts.db")
    with sqlite3.connect(db) as conn:  # the columns an older version did not have
        conn.execute("ALTER TABLE mailboxes DROP COLUMN key_salt")
        conn.execute("ALTER TABLE mailboxes DROP COLUMN key_kdf")
    data, _ = read_accounts_db(db, tmp_path)
    assert read_kdf(data, tmp_path / "new.db") == (1, "")


@pytest.mark.parametrize("sql, words", [
    ("UPDATE mailboxes SET key_kdf = 9", "has no valid key derivation"),
    ("UPDATE mailboxes SET key_salt = '../../x'", "has no valid key derivation"),
    ("UPDATE mailboxes SET password = '{PLAIN}known'", "has no argon2id password hash"),
    ("UPDATE mailboxes SET address = 'Alice@example.test'", "is not a normalized address"),
    ("UPDATE mailboxes SET local = 'bob'", "has another local part or domain"),
    ("UPDATE mailboxes SET quota_mb = -1", "has a quota that is not a number"),
    ("INSERT INTO aliases VALUES ('x@example.test', 'a b@example.test')", "is not a normalized address"),
    ("INSERT INTO domains VALUES ('../etc')", "is not a normalized domain"),
])
def test_an_account_row_that_fails_its_check_is_refused(tmp_path: Path, sql: str, words: str) -> None:
    db = accounts_db(tmp_path / "accounts.db")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute(sql)
    conn.close()
    with pytest.raises(BackupError) as err:
        read_accounts_db(db, tmp_path)
    assert words in err.value.message


def test_file_names_are_plain(tmp_path: Path) -> None:
    (tmp_path / "secrets" / "dkim").mkdir(parents=True)
    (tmp_path / "secrets" / "dkim" / "example.org.key").write_text("k")
    (tmp_path / "secrets" / "backup.json").write_text("the backup's own: left out")
    files, folders = read_folder(tmp_path / "secrets", "files/secrets", frozenset({"backup.json"}))
    assert files == {"dkim/example.org.key": b"k"} and folders == ["dkim"]
    (tmp_path / "secrets" / "dkim" / "a\nb").write_text("x")
    with pytest.raises(BackupError) as err:
        read_folder(tmp_path / "secrets", "files/secrets")
    assert "files/secrets/dkim/a\nb: not a name Mailstead makes" in err.value.message


def test_an_admin_record_from_the_snapshot_is_checked_field_by_field(tmp_path: Path) -> None:
    secrets = tmp_path / "files" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "admin.json").write_text(json.dumps({"address": "postmaster@example.test", "password_hash": "x",
                                                    "totp_secret": "A" * 32, "recovery_codes": []}))
    with pytest.raises(BackupError) as err:
        read_plan(tmp_path, {"format": 2}, {}, tmp_path, lambda *_: None)
    assert "files/secrets/admin.json: password_hash is not an argon2 hash" in err.value.message
