"""A restore treats the snapshot as untrusted input (issue 14, "A restore trusts the
snapshot"), with the real restic and a local repository.

Each test makes a snapshot as an attacker could: someone who knows the repository
password (it is on the recovery sheet), or an appliance whose web process was taken
before the boundary was closed and whose backups hold what it planted (its state.db
was the web user's). The manifest is computed by the test, as such an attacker would
compute a consistent one. A restore that copies the snapshot over the state carries
each attack out; these tests see it refused before anything is touched, or imported
only through the checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyotp
import pytest

from portal.agent.registry import Context, OpError
from portal.backup import BackupError
from portal.backup import config as cfg
from portal.backup.contents import FolderVolumes, stage
from portal.backup.restic import HOST, TAG
from portal.backup.service import Env, backup, configure, restore, snapshots, verify
from portal.stack.accounts import Accounts, NoKeys
from tests.support.statedb import read_settings, write_settings

VERSION = "0.1.0"
ADMIN = "postmaster@example.test"
PASSWORD = "the administrator's password"
RIG_CERT = "/srv/this-machine/cert.pem"  # this machine's own tls_cert (restore=False)


class NoStack:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def stop(self, project: str) -> None:
        self.calls.append(f"stop {project}")

    def start(self, progress: Any) -> dict[str, Any]:
        self.calls.append("start")
        return {"started": True}


def make_appliance(root: Path) -> Env:
    """A set-up appliance's state (no stack), its backups going to root/repo."""
    state = root / "state"
    write_settings(state / "state.db", {"domain": "example.test", "mail_host": "mail.example.test",
                                        "stack_project": "mstest-i14-untrusted", "tls_cert": RIG_CERT,
                                        "setup_complete": "1", "dnsbl_zones": "before.example"})
    Accounts(state / "accounts" / "accounts.db").create_mailbox(ADMIN, "a mailbox password", keys=NoKeys())
    (state / "secrets" / "dkim").mkdir(parents=True)
    (state / "secrets" / "dkim" / "example.test.key").write_text("-----BEGIN PRIVATE KEY-----\ndkim\n")
    (state / "tls").mkdir()
    (state / "tls" / "cert.pem").write_text("certificate")
    (state / "tls" / "key.pem").write_text("private key")
    env = Env(state, VERSION, volumes=FolderVolumes(root / "vols"), stack=NoStack(), timeout=120)
    configure(env, cfg.validate("local", path=str(root / "repo")))
    return env


def quiet(_step: str, _detail: str) -> None:
    pass


def staged(env: Env, root: Path) -> Path:
    """What a backup of `env` holds, staged into root/forged (to be changed by the test)."""
    staging = root / "forged"
    stage(env.state_dir, staging, env.volume_io(), {"version": VERSION, "created": "now"}, quiet)
    (staging / "manifest.json").unlink()
    return staging


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_for(staging: Path, fmt: int) -> dict[str, Any]:
    """A consistent manifest of `staging` as it is (format 1: the databases hashed; format 2:
    every regular file hashed and every folder listed)."""
    files, folders = {}, []
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in dirnames:
            folders.append((Path(dirpath) / name).relative_to(staging).as_posix())
        for name in filenames:
            path = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                files[path.relative_to(staging).as_posix()] = digest(path)
    dbs = {name: files[f"db/{name}"] for name in ("state.db", "accounts.db") if f"db/{name}" in files}
    manifest: dict[str, Any] = {"format": fmt, "version": VERSION, "created": "now", "settings": {},
                                "databases": dbs, "volumes": [], "messages": 0, "mailboxes": {}}
    if fmt == 1:
        manifest["files"] = ["secrets", "tls"]
    else:
        manifest.update(sha256=files, folders=sorted(folders), links={}, skipped=[])
    return manifest


def forge(env: Env, staging: Path, manifest: dict[str, Any] | None = None, fmt: int = 2) -> str:
    """Back `staging` up as a snapshot of this repository, with `manifest` (default: a
    consistent one of format `fmt`); its full ID."""
    (staging / "manifest.json").write_text(json.dumps(manifest or manifest_for(staging, fmt)))
    env.restic().run("backup", ".", "--host", HOST, "--tag", TAG, "--tag", f"version={VERSION}", cwd=staging,
                     timeout=120)
    return snapshots(env)[0]["full_id"]


def state_files(env: Env) -> dict[str, str]:
    """Every entry of the state folder (what a refused restore must leave as it is): files by
    content and mode, symlinks by target; the backup's own bookkeeping left out."""
    out = {}
    for path in sorted(env.state_dir.rglob("*")):
        rel = path.relative_to(env.state_dir).as_posix()
        if rel.startswith(("backup-cache", "backup-work")) or rel in ("backup.lock", "backup-state.json"):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "-> " + os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = f"{digest(path)} {stat.S_IMODE(st.st_mode):o}"
        else:
            out[rel] = f"{stat.S_IFMT(st.st_mode):o} {stat.S_IMODE(st.st_mode):o}"
    return out


def refused_untouched(env: Env, snapshot: str, *words: str) -> BackupError:
    before = state_files(env)
    with pytest.raises(BackupError) as err:
        restore(env, snapshot)
    for word in words:
        assert word in err.value.message, err.value.message
    assert "nothing was changed" in err.value.message
    assert state_files(env) == before
    assert env.stack.calls == []
    return err.value


# -- files of the snapshot ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", [1, 2])
def test_a_symlink_in_secrets_to_etc_shadow_is_refused_before_anything_is_touched(tmp_path: Path, fmt: int) -> None:
    env = make_appliance(tmp_path)
    staging = staged(env, tmp_path)
    os.symlink("/etc/shadow", staging / "files" / "secrets" / "dkim" / "example.test.key.old")
    os.symlink("/etc", staging / "files" / "secrets" / "acme")
    snapshot = forge(env, staging, fmt=fmt)
    refused_untouched(env, snapshot, "files/secrets/dkim/example.test.key.old is a symbolic link (to /etc/shadow)",
                      "files/secrets/acme is a symbolic link")
    assert not (env.state_dir / "secrets" / "acme").exists()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _device(path: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # as /dev/null


def _setuid(path: Path) -> None:
    path.write_text("#!/bin/sh\n")
    os.chmod(path, 0o4755)


def _world_writable(path: Path) -> None:
    path.write_text("anyone may write this\n")
    os.chmod(path, 0o666)


def _hard_link(path: Path) -> None:
    os.link(path.parent / "cert.pem", path)


@pytest.mark.parametrize("make, where, words", [
    (_fifo, "files/secrets/fifo", "is a FIFO"),
    (_device, "files/secrets/null", "is a character device"),
    (_setuid, "files/tls/helper", "has mode 4755 (setuid, setgid or sticky)"),
    (_world_writable, "files/tls/open.pem", "has mode 0666 (writable by everyone)"),
    (_hard_link, "files/tls/cert-again.pem", "is a hard link"),
])
def test_special_files_and_unusual_modes_are_refused(tmp_path: Path, make: Callable[[Path], None], where: str,
                                                     words: str) -> None:
    env = make_appliance(tmp_path)
    staging = staged(env, tmp_path)
    make(staging / where)
    snapshot = forge(env, staging, fmt=2)
    refused_untouched(env, snapshot, f"{where} {words}")


def test_restored_files_get_the_modes_of_their_folder_never_the_snapshots(tmp_path: Path) -> None:
    env = make_appliance(tmp_path)
    staging = staged(env, tmp_path)
    os.chmod(staging / "files" / "secrets" / "dkim" / "example.test.key", 0o644)  # readable by all, in the snapshot
    os.chmod(staging / "files" / "secrets" / "dkim", 0o755)
    os.chmod(staging / "files" / "tls" / "key.pem", 0o640)
    os.chown(staging / "files" / "tls" / "cert.pem", 1234, 1234)
    restore(env, forge(env, staging))
    secrets = env.state_dir / "secrets"
    assert stat.S_IMODE((secrets / "dkim").stat().st_mode) == 0o700
    assert stat.S_IMODE((secrets / "dkim" / "example.test.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((env.state_dir / "tls" / "key.pem").stat().st_mode) == 0o600
    cert = (env.state_dir / "tls" / "cert.pem").stat()
    assert (stat.S_IMODE(cert.st_mode), cert.st_uid, cert.st_gid) == (0o644, os.geteuid(), os.getegid())


# -- state.db: settings through their checks, nothing else ---------------------------------

class Payload:
    """Unpickled, it makes a folder: the sign that something read the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def plant(db: Path, settings: dict[str, str], marker: Path | None = None) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", list(settings.items()))
        if marker is not None:  # APScheduler's job store as an older Mailstead kept it in state.db
            conn.execute("CREATE TABLE scheduler_jobs (id VARCHAR(191) PRIMARY KEY, next_run_time FLOAT, "
                         "job_state BLOB NOT NULL)")
            conn.execute("INSERT INTO scheduler_jobs VALUES ('backup', 0, ?)", (pickle.dumps(Payload(marker)),))
            conn.execute("CREATE TABLE schedules (job TEXT PRIMARY KEY, cron TEXT)")
            conn.execute("INSERT INTO schedules VALUES ('backup', '* * * * *')")
    conn.close()


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_planted_tls_cert_and_scheduler_pickle_never_reach_this_machine(tmp_path: Path, fmt: int) -> None:
    env = make_appliance(tmp_path)
    staging = staged(env, tmp_path)
    marker = tmp_path / "unpickled"
    plant(staging / "db" / "state.db", {"tls_cert": "/:/host #", "stack_project": "attacker",
                                        "dnsbl_zones": "from-the-snapshot.example"}, marker)
    events: list[tuple[str, str]] = []
    restore(env, forge(env, staging, fmt=fmt), lambda s, d: events.append((s, d)))
    settings = read_settings(env.state_dir / "state.db")
    assert settings["tls_cert"] == RIG_CERT and settings["stack_project"] == "mstest-i14-untrusted"
    assert settings["dnsbl_zones"] == "from-the-snapshot.example"  # restorable settings do come back
    conn = sqlite3.connect(env.state_dir / "state.db")
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert not {"scheduler_jobs", "schedules"} & tables
    assert not marker.exists()
    assert any("stack_project" in d and "tls_cert" in d for s, d in events if s == "settings"), events


@pytest.mark.parametrize("key, value", [
    ("dns_servers", "fe80::1%]\n  privileged: true\n  pid: host"),
    ("publish_addresses", "127.0.0.1 #"),
    ("domain", "example.test\nprivileged: true"),
])
def test_a_setting_that_fails_its_check_refuses_the_restore_naming_it(tmp_path: Path, key: str, value: str) -> None:
    env = make_appliance(tmp_path)
    staging = staged(env, tmp_path)
    plant(staging / "db" / "state.db", {key: value})
    refused_untouched(env, forge(env, staging), f"the snapshot's setting {key} is not valid")


def test_an_account_row_that_fails_its_check_refuses_the_restore(tmp_path: Path) -> None:
    env = make_appliance(tmp_path)
    staging = staged(env, tmp_path)
    conn = sqlite3.connect(staging / "db" / "accounts.db")
    with conn:
        conn.execute("INSERT INTO mailboxes (address, local, domain, password, quota_mb, created) "
                     "VALUES ('../../etc@example.test', '../../etc', 'example.test', '{PLAIN}known', 0, 'now')")
    conn.close()
    refused_untouched(env, forge(env, staging), "'../../etc@example.test' is not a normalized address")


# -- the manifest covers every file ---------------------------------------------------------

@pytest.mark.parametrize("where", ["files/secrets/dkim/example.test.key", "files/tls/cert.pem"])
def test_verification_catches_a_corrupted_file_in_secrets_or_tls(tmp_path: Path, where: str) -> None:
    """The manifest made at backup time, then the file damaged before it reached the
    repository (a bad disk, a bit flip): verification and a restore name it."""
    env = make_appliance(tmp_path)
    staging = tmp_path / "forged"
    manifest = stage(env.state_dir, staging, env.volume_io(), {"version": VERSION, "created": "now"}, quiet)
    (staging / where).write_bytes(b"damaged")
    forge(env, staging, manifest)
    with pytest.raises(BackupError) as err:
        verify(env)
    assert f"{where} differs from the manifest" in err.value.message
    refused_untouched(env, "latest", f"{where} differs from the manifest")


def test_a_file_the_manifest_does_not_list_or_a_listed_one_missing_is_refused(tmp_path: Path) -> None:
    env = make_appliance(tmp_path)
    staging = staged(env, tmp_path)
    manifest = manifest_for(staging, 2)
    (staging / "files" / "secrets" / "extra.key").write_text("not in the manifest")
    (staging / "files" / "tls" / "key.pem").unlink()
    refused_untouched(env, forge(env, staging, manifest), "files/secrets/extra.key is in the snapshot but not in "
                      "its manifest", "files/tls/key.pem is missing")


# -- the admin record: spent codes stay spent -------------------------------------------------

def admin(ctx: Context) -> tuple[pyotp.TOTP, list[str]]:
    from portal.admin.privileged import admin_setup, admin_totp_begin

    totp = pyotp.TOTP(admin_totp_begin.run(ctx, address=ADMIN)["secret"])
    return totp, admin_setup.run(ctx, address=ADMIN, password=PASSWORD, totp_code=totp.now())["recovery_codes"]


def login(ctx: Context, code: str) -> dict[str, Any]:
    from portal.admin.privileged import admin_login

    return admin_login.run(ctx, address=ADMIN, password=PASSWORD, code=code, client="192.0.2.10")


def denied(ctx: Context, code: str) -> None:
    with pytest.raises(OpError) as err:
        login(ctx, code)
    assert err.value.code == "denied"


def test_an_older_snapshot_brings_back_no_spent_recovery_code_and_no_older_totp_step(tmp_path: Path) -> None:
    env = make_appliance(tmp_path)
    write_settings(env.state_dir / "state.db", {"setup_complete": "0"})  # the Admin step makes the admin
    ctx = Context(state_dir=env.state_dir)
    totp, codes = admin(ctx)
    write_settings(env.state_dir / "state.db", {"setup_complete": "1"})
    older = backup(env)["snapshot"]

    assert login(ctx, codes[0])["used_recovery_code"] is True  # spent, after the backup
    next_code = totp.at(time.time() + 30)
    login(ctx, next_code)  # a newer TOTP step used, after the backup
    newer = backup(env)["snapshot"]

    restore(env, older)  # admin.json as it was: codes[0] unspent, the older step
    denied(ctx, codes[0])
    denied(ctx, next_code)
    record = json.loads((env.state_dir / "secrets" / "admin.json").read_text())
    assert len(record["recovery_codes"]) == len(codes) - 1
    assert record["totp_last_step"] >= int((time.time() + 30) // 30) - 1
    assert login(ctx, codes[1])["used_recovery_code"] is True  # the unspent ones still work

    # A fresh machine: the newer snapshot's ledger comes with it, so the older one cannot
    # bring codes[0] or codes[1] back either.
    password = (env.state_dir / "secrets" / "backup-password").read_text().strip()
    fresh = Env(tmp_path / "fresh", VERSION, volumes=FolderVolumes(tmp_path / "fresh-vols"), stack=NoStack(),
                timeout=120)
    configure(fresh, cfg.validate("local", path=str(tmp_path / "repo")), password=password)
    fresh_ctx = Context(state_dir=fresh.state_dir)
    restore(fresh, newer)
    restore(fresh, older)
    denied(fresh_ctx, codes[0])
    denied(fresh_ctx, next_code)
    assert login(fresh_ctx, codes[2])["used_recovery_code"] is True


def test_backing_up_and_restoring_keeps_this_machines_sessions_and_lockout_out(tmp_path: Path) -> None:
    env = make_appliance(tmp_path)
    secrets = env.state_dir / "secrets"
    (secrets / "admin-sessions.json").write_text(json.dumps({"a" * 64: {"created": 1, "seen": 1}}))
    (secrets / "admin-lockout.json").write_text(json.dumps({"clients": {}}))
    snapshot = backup(env)["snapshot"]
    listed = env.restic().run("ls", "--json", snapshot, json_out=False, timeout=60)
    assert "admin-sessions.json" not in listed and "admin-lockout.json" not in listed
    (secrets / "admin-sessions.json").write_text("{}")  # signed out everywhere since
    restore(env, snapshot)
    assert json.loads((secrets / "admin-sessions.json").read_text()) == {}
