"""Backups with the real restic against real targets on loopback: a local
folder, moto's S3 server and an sshd serving SFTP. The stack's volumes are
folders here (FolderVolumes); tests/integration/test_backup_stack.py does the
same with the real stack's docker volumes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from portal.backup import BackupError
from portal.backup import config as cfg
from portal.backup.contents import FolderVolumes
from portal.backup.restic import locks
from portal.backup.service import Env, backup, configure, read_state, restore, snapshots, verify
from portal.stack.accounts import Accounts, NoKeys
from tests.support.statedb import write_settings

from .backup_targets import Moto, Sshd

VERSION = "0.1.0"


class NoStack:
    """Records what a restore asks of the stack (there is none in these tests)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stop(self, project: str) -> None:
        self.calls.append(f"stop {project}")

    def start(self, progress) -> dict:
        self.calls.append("start")
        return {"started": True}


def make_state(root: Path, messages: int = 6) -> tuple[Path, Path]:
    """A state folder and volume folders as an appliance has them, with mail in 2 mailboxes."""
    state, vols = root / "state", root / "vols"
    write_settings(state / "state.db", {"domain": "example.test", "mail_host": "mail.example.test",
                                        "stack_project": "mstest-i6b", "stack_deployed": "1"})
    accounts = Accounts(state / "accounts" / "accounts.db")
    for address in ("alice@example.test", "bob@example.test"):
        accounts.create_mailbox(address, f"{address} password", keys=NoKeys())
    (state / "secrets" / "dkim").mkdir(parents=True)
    (state / "secrets" / "dkim" / "mailstead-rsa.key").write_text("-----BEGIN PRIVATE KEY-----\nrsa\n")
    (state / "secrets" / "redis-password").write_text("redis-pw\n")
    os.chmod(state / "secrets", 0o700)
    (state / "tls" / "archive" / "1").mkdir(parents=True)
    (state / "tls" / "archive" / "1" / "fullchain.pem").write_text("cert")
    (state / "tls" / "archive" / "1" / "privkey.pem").write_text("key")
    os.symlink("archive/1", state / "tls" / "live")
    (state / "stack").mkdir()
    (state / "stack" / "compose.yaml").write_text("services: {}\n")
    for i in range(messages):
        box = "alice" if i % 2 else "bob"
        d = vols / "mail" / "example.test" / box / "mail" / "mailboxes" / "INBOX" / "dbox-Mails"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"u.{i + 1}").write_bytes(os.urandom(200 + i))
        os.chown(d / f"u.{i + 1}", 5000, 5000)
    (vols / "dav" / "collection-root" / "alice").mkdir(parents=True)
    (vols / "dav" / "collection-root" / "alice" / "cal.ics").write_text("BEGIN:VCALENDAR\n")
    (vols / "redis").mkdir()
    (vols / "redis" / "dump.rdb").write_bytes(b"REDIS0011")
    return state, vols


def tree(root: Path) -> dict[str, str]:
    """Every file (hash, mode, owner) and symlink (target) under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        st = p.lstat()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(stat.S_IMODE(st.st_mode))} {st.st_uid}"
    return out


def restored_modes(before: dict[str, str]) -> dict[str, str]:
    """What a restore makes of the files of `before` (a tree()): the same bytes, in the
    modes of the restore's fixed table (secrets 0600, tls 0644 and keys 0600), root's;
    stack/ is rendered anew at deploy, not restored."""
    out = {}
    for rel, entry in before.items():
        if rel.startswith("stack/"):
            continue
        if entry.startswith("->"):
            out[rel] = entry
            continue
        digest = entry.split()[0]
        if rel.startswith("secrets/"):
            mode = "0o600"
        elif rel.startswith("tls/"):
            mode = "0o600" if rel.endswith(("key.pem", ".key")) else "0o644"
        else:
            mode = entry.split()[1]
        out[rel] = f"{digest} {mode} 0"
    return out


def sheet_password(sheet: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in sheet.splitlines() if line.startswith("Password:"))


def test_local_round_trip_onto_a_fresh_state(tmp_path):
    state, vols = make_state(tmp_path)
    events: list[tuple[str, str]] = []
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=120)
    repo = tmp_path / "repo"
    made = configure(env, cfg.validate("local", path=str(repo)))
    password = sheet_password(made["recovery_sheet"])
    assert (state / "secrets" / "backup-password").read_text().strip() == password
    assert stat.S_IMODE((state / "secrets" / "backup.json").stat().st_mode) == 0o600

    result = backup(env, lambda step, detail: events.append((step, detail)))
    assert result["messages"] == 6 and result["mailboxes"] == 2
    assert set(result["volumes"]) == {"mail", "dav", "redis"}
    assert [s for s, _ in events][:2] == ["target", "databases"] and ("upload" in {s for s, _ in events})
    last = read_state(env)["last_backup"]
    assert last["ok"] is True and last["error"] is None and last["snapshot"] == result["snapshot"]
    assert not (state / "backup-work" / "staging").exists()  # no plaintext copy of the secrets left behind
    assert password not in json.dumps(events) and password not in json.dumps(read_state(env))

    before_state = tree(state)
    before_vols = tree(vols)
    # The machine is lost: a new one with an empty state folder and the recovery sheet.
    new_state, new_vols = tmp_path / "new-state", tmp_path / "new-vols"
    new_vols.mkdir()
    stack = NoStack()
    env2 = Env(new_state, VERSION, volumes=FolderVolumes(new_vols), stack=stack, timeout=120)
    joined = configure(env2, cfg.validate("local", path=str(repo)), password=password)
    assert joined["created"] is False and "recovery_sheet" not in joined
    assert [s["id"] for s in snapshots(env2)] == [result["snapshot"]]
    done = restore(env2, "latest")
    assert done["snapshot"] == result["snapshot"] and done["messages"] == 6
    assert read_state(env2)["last_restore"]["ok"] is True
    assert stack.calls == ["start"]  # a fresh appliance: nothing to stop; deployed from the restored settings

    after_state = {k: v for k, v in tree(new_state).items() if not k.startswith(("secrets/backup", "backup-"))}
    want_state = restored_modes({k: v for k, v in before_state.items() if not k.startswith(("secrets/backup", "backup-"))})
    # The databases are imported as checked data, not copied: compare their contents.
    for db in ("state.db", "accounts/accounts.db"):
        after_state.pop(db), want_state.pop(db)
    assert after_state == want_state
    assert tree(new_vols) == before_vols
    with sqlite3.connect(new_state / "state.db") as conn:
        # stack_project is the machine's own (not restored): the new machine has none set
        assert dict(conn.execute("SELECT key, value FROM settings")) == {
            "domain": "example.test", "mail_host": "mail.example.test", "stack_deployed": "1"}
    conn.close()
    assert Accounts(state / "accounts" / "accounts.db").list_mailboxes() == \
        Accounts(new_state / "accounts" / "accounts.db").list_mailboxes()
    assert stat.S_IMODE((new_state / "accounts" / "accounts.db").stat().st_mode) == 0o640

    # Restoring over a running appliance (its own compose project, its stack deployed):
    # the stack is stopped first, the damage undone.
    write_settings(new_state / "state.db", {"stack_project": "mstest-i6b-new"})
    (new_state / "stack").mkdir()
    (new_state / "stack" / "compose.yaml").write_text("services: {}\n")
    (new_state / "secrets" / "dkim" / "mailstead-rsa.key").write_text("damaged")
    next((new_vols / "mail").rglob("u.1")).unlink()
    stack2 = NoStack()
    restore(Env(new_state, VERSION, volumes=FolderVolumes(new_vols), stack=stack2, timeout=120), done["snapshot"])
    assert stack2.calls == ["stop mstest-i6b-new", "start"]
    assert tree(new_vols) == before_vols
    assert (new_state / "secrets" / "dkim" / "mailstead-rsa.key").read_text().endswith("rsa\n")
    assert (new_state / "secrets" / "backup-password").read_text().strip() == password  # its own config kept


def test_verify_records_success_and_an_incremental_run_adds_little(tmp_path):
    state, vols = make_state(tmp_path, messages=40)
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=120)
    configure(env, cfg.validate("local", path=str(tmp_path / "repo")))
    first = backup(env)
    d = next((vols / "mail").rglob("dbox-Mails"))
    (d / "u.999").write_bytes(b"a new message")
    second = backup(env)
    assert second["messages"] == 41 and second["snapshot"] != first["snapshot"]
    assert second["files_new"] == 1 and second["data_added"] < first["data_added"]
    out = verify(env)
    assert out == {"snapshot": second["snapshot"], "messages": 41, "mailboxes": 2, "ok": True}
    assert read_state(env)["last_verify"]["ok"] is True
    assert len(snapshots(env)) == 2


def test_local_target_down_fails_clearly_then_recovers(tmp_path):
    state, vols = make_state(tmp_path)
    repo = tmp_path / "disk" / "repo"
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=60)
    configure(env, cfg.validate("local", path=str(repo)))
    backup(env)
    os.rename(tmp_path / "disk", tmp_path / "unplugged")  # the backup disk is not mounted
    with pytest.raises(BackupError) as err:
        backup(env)
    assert err.value.field == "target" and "no restic repository" in str(err.value)
    assert "disk mounted" in str(err.value)
    last = read_state(env)["last_backup"]
    assert last["ok"] is False and "no restic repository" in last["error"]
    os.rename(tmp_path / "unplugged", tmp_path / "disk")
    assert backup(env)["snapshot"]
    assert read_state(env)["last_backup"]["ok"] is True


def _lock_holder(env: Env) -> subprocess.Popen[bytes]:
    """A real restic process holding a lock on the repository (backup from stdin, waiting)."""
    r = env.restic()
    proc = subprocess.Popen(r.command("backup", "--stdin", "--stdin-filename", "x", json_out=False),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cfg.restic_env(r.paths, r.target, r.cache_dir))
    # Until the lock reads back as this process's: the file appears before restic has
    # written it, and a process killed in between leaves a lock nobody can read (seen
    # on a loaded machine: the run then found no lock to remove).
    deadline = time.monotonic() + 30
    while not any(lk["pid"] == proc.pid for lk in locks(r)):
        assert time.monotonic() < deadline, "restic did not take a lock"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_leftover_lock_does_not_block_the_run(tmp_path, how):
    state, vols = make_state(tmp_path)
    repo = tmp_path / "repo"
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=60)
    configure(env, cfg.validate("local", path=str(repo)))
    backup(env)
    holder = _lock_holder(env)
    try:
        if how == "killed":  # a crashed run: restic's own rule (dead process on this host) clears it
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        else:  # a hung run, alive: cleared once the lock is older than the run's timeout
            holder.send_signal(signal.SIGSTOP)
            # The timeout also bounds this whole run (lock housekeeping, about ten restic
            # starts that each derive the key, staging, the upload, the prune): 15 s left
            # the upload 1 s on a loaded machine. So 40 s, and a lock 41 s old.
            env.timeout = 40
            time.sleep(41)
        assert any((repo / "locks").iterdir())
        events: list[tuple[str, str]] = []
        result = backup(env, lambda s, d: events.append((s, d)))
        assert result["snapshot"]
        assert any(s == "locks" and "removed" in d for s, d in events), events
        assert read_state(env)["last_backup"]["ok"] is True
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()


def test_a_fresh_lock_of_a_live_run_is_respected(tmp_path):
    """Not older than the timeout: the run fails (naming the lock) rather than breaking another run."""
    state, vols = make_state(tmp_path)
    repo = tmp_path / "repo"
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=600)
    configure(env, cfg.validate("local", path=str(repo)))
    backup(env)
    holder = _lock_holder(env)
    try:
        holder.send_signal(signal.SIGSTOP)
        with pytest.raises(BackupError) as err:
            backup(env)
        assert err.value.code == "locked" and "locked" in str(err.value)
        assert read_state(env)["last_backup"]["ok"] is False
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
    assert backup(env)["snapshot"]  # the next run goes through


def test_wrong_password_is_named(tmp_path):
    state, vols = make_state(tmp_path)
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=60)
    configure(env, cfg.validate("local", path=str(tmp_path / "repo")))
    other = Env(tmp_path / "other", VERSION, timeout=60)
    with pytest.raises(BackupError) as err:
        configure(other, cfg.validate("local", path=str(tmp_path / "repo")), password="not-the-password")
    assert err.value.field == "password" and "recovery sheet" in str(err.value)
    assert not (tmp_path / "other" / "secrets" / "backup.json").exists()
    assert not (tmp_path / "other" / "secrets" / "backup-password").exists()
    # configuring a new repository over an existing one is refused too
    with pytest.raises(BackupError) as err:
        configure(other, cfg.validate("local", path=str(tmp_path / "repo")))
    assert err.value.field == "password" and "already holds a restic repository" in str(err.value)


def test_a_snapshot_from_a_newer_version_is_refused_untouched(tmp_path):
    state, vols = make_state(tmp_path)
    env = Env(state, "9.0.0", volumes=FolderVolumes(vols), timeout=60)
    configure(env, cfg.validate("local", path=str(tmp_path / "repo")))
    backup(env)
    password = (state / "secrets" / "backup-password").read_text().strip()
    new_state, new_vols = tmp_path / "new", tmp_path / "new-vols"
    stack = NoStack()
    old = Env(new_state, VERSION, volumes=FolderVolumes(new_vols), stack=stack, timeout=60)
    configure(old, cfg.validate("local", path=str(tmp_path / "repo")), password=password)
    def settled() -> dict[str, str]:  # restic's cache may fill, the outcome is recorded; nothing else may change
        return {k: v for k, v in tree(new_state).items()
                if not k.startswith("backup-cache/") and k not in ("backup.lock", "backup-state.json")}

    before = settled()
    with pytest.raises(BackupError) as err:
        restore(old, "latest")
    assert err.value.code == "newer_version"
    assert read_state(old)["last_restore"]["ok"] is False
    assert "Mailstead 9.0.0" in str(err.value) and "upgrade this appliance" in str(err.value)
    assert stack.calls == [] and settled() == before and not new_vols.exists()


def test_a_snapshot_in_an_unknown_backup_format_is_refused_untouched(tmp_path, monkeypatch):
    from portal.backup import contents, service

    state, vols = make_state(tmp_path)
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=60)
    configure(env, cfg.validate("local", path=str(tmp_path / "repo")))
    monkeypatch.setattr(contents, "FORMAT", 3)  # a later Mailstead's backup format, same version string
    backup(env)
    monkeypatch.undo()
    stack = NoStack()
    with pytest.raises(BackupError) as err:
        restore(Env(state, VERSION, volumes=FolderVolumes(vols), stack=stack, timeout=60), "latest")
    assert service.FORMATS_READ == (1, 2) and "backup format 3" in str(err.value)
    assert "nothing was changed" in str(err.value)
    assert stack.calls == []


# -- S3 (moto) and SFTP (sshd) ---------------------------------------------------------

@pytest.fixture
def moto(tmp_path):
    server = Moto(tmp_path).start()
    yield server
    server.stop()


def test_s3_round_trip_and_bad_credentials(tmp_path, moto):
    state, vols = make_state(tmp_path)
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=120)
    good = dict(endpoint=moto.endpoint, bucket="mailstead-backup", access_key_id=moto.access_key_id,
                secret_access_key=moto.secret_access_key)
    with pytest.raises(BackupError) as err:
        configure(env, cfg.validate("s3", **{**good, "access_key_id": "AKIANOTAKEY0000"}))
    assert err.value.field == "access_key_id"
    with pytest.raises(BackupError) as err:
        configure(env, cfg.validate("s3", **{**good, "secret_access_key": "wrong-secret"}))
    assert err.value.field == "secret_access_key" and "wrong-secret" not in str(err.value)
    made = configure(env, cfg.validate("s3", **good, path="appliance1"))
    assert made["created"] and moto.secret_access_key not in made["recovery_sheet"]
    first = backup(env)
    assert first["messages"] == 6
    assert verify(env)["ok"] is True

    moto.stop()  # the store is down: a clear message, recorded
    env.give_up = 5  # restic's retries of an unreachable store (default 120 s)
    start = time.monotonic()
    with pytest.raises(BackupError) as err:
        backup(env)
    assert err.value.code == "unreachable" and "cannot reach" in str(err.value)
    assert time.monotonic() - start < 30
    assert read_state(env)["last_backup"]["ok"] is False


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()


def test_sftp_round_trip_down_and_back(tmp_path, sshd):
    state, vols = make_state(tmp_path)
    env = Env(state, VERSION, volumes=FolderVolumes(vols), timeout=120)
    remote = tmp_path / "remote" / "repo"
    target = cfg.validate("sftp", host="127.0.0.1", port=sshd.port, user=sshd.user, path=str(remote))
    # the appliance's own generated key is not authorized yet: named, with the key to add
    with pytest.raises(BackupError) as err:
        configure(env, target)
    assert err.value.field == "key" and "authorized_keys" in str(err.value)
    pub = (state / "secrets" / "backup-ssh" / "id_ed25519.pub").read_text()
    assert pub.split()[1] in str(err.value)  # the owner cannot read secrets/: the key is in the message
    with open(sshd.authorized, "a") as f:
        f.write(pub)
    made = configure(env, target)
    assert made["ssh_public_key"].split()[:2] == pub.split()[:2]
    assert stat.S_IMODE((state / "secrets" / "backup-ssh" / "id_ed25519").stat().st_mode) == 0o600
    assert (remote / "config").exists()
    assert backup(env)["messages"] == 6

    sshd.stop()
    with pytest.raises(BackupError) as err:
        backup(env)
    assert err.value.code == "unreachable" and "cannot reach" in str(err.value)
    assert read_state(env)["last_backup"]["ok"] is False
    sshd.start()  # same port, same host key
    assert backup(env)["snapshot"]
    assert read_state(env)["last_backup"]["ok"] is True
    assert verify(env)["messages"] == 6

    # a key given at configuration (from the owner) is used instead
    env2 = Env(tmp_path / "state2", VERSION, volumes=FolderVolumes(vols), timeout=120)
    password = (state / "secrets" / "backup-password").read_text().strip()
    joined = configure(env2, target, password=password, key=sshd.client_key.read_text())
    assert joined["ssh_public_key"].split()[1] == Path(f"{sshd.client_key}.pub").read_text().split()[1]
    assert len(snapshots(env2)) == 2
