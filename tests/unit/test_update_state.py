"""The state copy an update takes, and the rollback that puts it back (portal/update/state.py)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from portal.update import state as S


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    state, update = tmp_path / "state", tmp_path / "update"
    (state / "secrets").mkdir(parents=True, mode=0o700)
    (state / "secrets" / "admin.json").write_text('{"user": "owner"}')
    (state / "tls" / "live-1").mkdir(parents=True)
    (state / "tls" / "live-1" / "cert.pem").write_text("CERT")
    os.symlink("live-1", state / "tls" / "live")
    (state / "accounts").mkdir(mode=0o750)
    (state / "jobs").mkdir()
    (state / "jobs" / "123.json").write_text("{}")
    for db in ("state.db", "accounts/accounts.db"):
        conn = sqlite3.connect(state / db)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.execute("INSERT INTO t VALUES ('before')")
        conn.commit()
        conn.close()
    os.chmod(state / "accounts" / "accounts.db", 0o640)
    return state, update


def value(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT v FROM t").fetchone()[0]
    finally:
        conn.close()


def change(state: Path) -> None:
    """What a new version might do to the state while it runs."""
    for db in ("state.db", "accounts/accounts.db"):
        conn = sqlite3.connect(state / db)
        conn.execute("UPDATE t SET v = 'after'")
        conn.commit()
        conn.close()
    (state / "secrets" / "admin.json").write_text('{"user": "changed"}')
    (state / "new-format.json").write_text("{}")


def test_a_rollback_puts_back_the_state_from_before_the_update(dirs) -> None:
    state, update = dirs
    S.begin(state, update, "0.2.0", "0.3.0", "uefi")
    assert (update / S.RECORD).stat().st_mode & 0o777 == 0o600
    assert S.on_boot(state, update, "0.3.0") == "trial"
    change(state)
    S.finish(update, "0.3.0", False, "rspamd never became healthy")
    # The boot loader came back to 0.2.0:
    assert S.on_boot(state, update, "0.2.0") == "rolled_back"
    assert value(state / "state.db") == "before" and value(state / "accounts" / "accounts.db") == "before"
    assert (state / "secrets" / "admin.json").read_text() == '{"user": "owner"}'
    assert not (state / "new-format.json").exists()
    assert os.readlink(state / "tls" / "live") == "live-1" and (state / "tls" / "live" / "cert.pem").exists()
    assert (state / "accounts").stat().st_mode & 0o777 == 0o750
    assert (state / "accounts" / "accounts.db").stat().st_mode & 0o777 == 0o640
    # What the failed version left is kept aside, and the next boot is an ordinary one.
    assert value(update / "failed-0.3.0" / "state.db") == "after"
    assert S.on_boot(state, update, "0.2.0") == "none"
    outcomes = [h["outcome"] for h in S.history(update)]
    assert outcomes == ["rolled_back", "failed"]
    assert "0.3.0 did not come up healthy; back on 0.2.0" in S.history(update)[0]["message"]


def test_an_update_that_passes_keeps_the_new_state_and_the_copy_for_going_back(dirs) -> None:
    state, update = dirs
    S.begin(state, update, "0.2.0", "0.3.0", "bios")
    assert S.rollback_target(update, "0.3.0") is None  # on trial: nothing to go back to yet
    change(state)
    S.finish(update, "0.3.0", True, "healthy")
    assert S.on_boot(state, update, "0.3.0") == "none"
    assert value(state / "state.db") == "after"
    assert [h["outcome"] for h in S.history(update)] == ["installed"]
    assert S.rollback_target(update, "0.3.0") == "0.2.0"
    assert S.rollback_target(update, "0.2.0") is None


def test_going_back_by_choice_puts_back_the_state_from_before_the_update(dirs) -> None:
    state, update = dirs
    S.begin(state, update, "0.2.0", "0.3.0", "uefi")
    change(state)
    S.finish(update, "0.3.0", True, "healthy")
    S.begin_rollback(update, "0.3.0", "0.2.0", "uefi")
    # The boot loader did not switch: the request is dropped, nothing is put back.
    assert S.on_boot(state, update, "0.3.0") == "abandoned"
    assert value(state / "state.db") == "after"
    assert "did not switch" in S.history(update)[0]["message"]
    S.begin_rollback(update, "0.3.0", "0.2.0", "uefi")
    assert S.on_boot(state, update, "0.2.0") == "rolled_back"
    assert value(state / "state.db") == "before" and (state / "secrets" / "admin.json").read_text() == '{"user": "owner"}'
    last = S.history(update)[0]
    assert last["by"] == "owner" and last["alerted"] is False and "the owner chose" in last["message"]
    S.mark_alerted(update, "mail: sent to admin@example.test")
    assert S.history(update)[0]["alerted"] is True
    assert S.rollback_target(update, "0.2.0") is None  # the copy went back into place


def test_an_install_that_fails_leaves_nothing_pending(dirs) -> None:
    state, update = dirs
    S.begin(state, update, "0.2.0", "0.3.0", "uefi")
    S.abort(update, "installing 0.3.0 failed: the download stopped")
    assert S.read_record(update)["pending"] is None and not (update / S.COPY).exists()
    assert S.on_boot(state, update, "0.2.0") == "none"  # an ordinary boot: nothing is put back
    assert S.history(update)[0]["outcome"] == "not_installed"


def test_the_default_feed_address_is_checked(tmp_path) -> None:
    f = tmp_path / "update-feed-url"
    assert S.default_feed_url(f) == ""
    f.write_text("https://updates.example.org/mailstead\n")
    assert S.default_feed_url(f) == "https://updates.example.org/mailstead/"
    f.write_text("https://user:pw@updates.example.org/m/\n")
    assert S.default_feed_url(f) == ""


def test_the_copy_leaves_out_job_records_and_is_consistent_while_written(dirs) -> None:
    state, update = dirs
    writer = sqlite3.connect(state / "state.db")
    writer.execute("INSERT INTO t VALUES ('uncommitted')")   # an open transaction: not in the copy
    try:
        copy = S.copy_state(state, update)
    finally:
        writer.rollback()
        writer.close()
    assert not (copy / "jobs").exists()
    conn = sqlite3.connect(copy / "state.db")
    assert [r[0] for r in conn.execute("SELECT v FROM t")] == ["before"]
    conn.close()
    assert (update / S.COPY).stat().st_mode & 0o777 == 0o700


def test_a_third_version_running_drops_the_pending_update(dirs) -> None:
    state, update = dirs
    S.begin(state, update, "0.2.0", "0.3.0", "uefi")
    assert S.on_boot(state, update, "0.4.0") == "abandoned"
    assert S.read_record(update)["pending"] is None


def test_a_rollback_without_a_copy_says_so_and_keeps_the_state(dirs) -> None:
    state, update = dirs
    S.begin(state, update, "0.2.0", "0.3.0", "uefi")
    import shutil
    shutil.rmtree(update / S.COPY)
    with pytest.raises(S.UpdateStateError, match="no copy of the state"):
        S.on_boot(state, update, "0.2.0")
    assert value(state / "state.db") == "before"
