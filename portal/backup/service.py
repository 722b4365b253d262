"""Backup, list, verify and restore: the functions the agent operations, the
scheduler and the CLI call. Every run records its outcome in
<state>/backup-state.json (read by the health checks):

    {"last_backup": {"at", "ok", "error", "snapshot", "seconds"},
     "last_verify": {"at", "ok", "error", "snapshot", "seconds", "messages"},
     "last_restore": {"at", "ok", "error", "snapshot", "seconds"}}

A failed run is recorded and never blocks the next one: each run starts from a
fresh staging folder, stale restic locks are removed (see restic.clear_stale_locks),
and the runs' own lock is a flock that dies with its process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portal.backup import BackupError
from portal.backup import config as cfg
from portal.backup.contents import FORMAT, MANIFEST, VOLUMES, DockerVolumes, FolderVolumes, VolumeIO, compare, stage
from portal.backup.restic import HOST, TAG, ProgressParser, Restic, clear_stale_locks, retention_args

Progress = Callable[[str, str], None]
DEFAULT_TIMEOUT = 6 * 3600


def _quiet(_step: str, _detail: str) -> None:
    pass


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Env:
    """Where a backup reads and writes; built from the agent's Context (see agentops.env_for)."""

    state_dir: Path
    version: str
    restic_bin: str = "restic"
    volumes: VolumeIO | None = None                 # None: the stack's docker volumes
    stack: Any = None                               # stop(project) / start(progress) (ComposeStack); None: no stack
    timeout: float = DEFAULT_TIMEOUT
    policy: dict[str, int] = field(default_factory=dict)
    give_up: float = 120.0                          # seconds of restic's backend retries before a run stops

    @property
    def paths(self) -> cfg.Paths:
        return cfg.Paths(self.state_dir / "secrets")

    @property
    def state_file(self) -> Path:
        return self.state_dir / "backup-state.json"

    @property
    def work(self) -> Path:
        return self.state_dir / "backup-work"  # staging, restore and verify scratch (0700)

    @property
    def cache(self) -> Path:
        return self.state_dir / "backup-cache"

    def restic(self, target: cfg.Target | None = None, password_file: Path | None = None) -> Restic:
        return Restic(self.paths, target or cfg.load_target(self.paths), self.cache, self.restic_bin, password_file,
                      give_up=self.give_up)

    def settings_table(self) -> dict[str, str]:
        from portal.core.store import read_settings

        return read_settings(self.state_dir)

    def project(self) -> str:
        return self.settings_table().get("stack_project", "").strip() or "mailstead"

    def volume_io(self) -> VolumeIO:
        if self.volumes is not None:
            return self.volumes
        return DockerVolumes(self.project(), f"mailstead-base:{self.version}")


# -- the state file -------------------------------------------------------------------

def read_state(env: Env) -> dict[str, Any]:
    try:
        data = json.loads(env.state_file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(env: Env, key: str, entry: dict[str, Any]) -> None:
    data = read_state(env)
    data[key] = entry
    tmp = env.state_file.with_name(f".{env.state_file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.chmod(tmp, 0o644)
    os.replace(tmp, env.state_file)


@contextlib.contextmanager
def run_lock(env: Env, what: str) -> Iterator[None]:
    """One backup/verify/restore at a time on this appliance (a flock: gone with its process)."""
    env.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(env.state_dir / "backup.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another backup, verification or restore is running; {what} again when it is done",
                              "busy", "busy") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def scratch(env: Env, name: str) -> Iterator[Path]:
    env.work.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(env.work, 0o700)
    path = env.work / name
    shutil.rmtree(path, ignore_errors=True)  # a crashed run's leftovers
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- configure ------------------------------------------------------------------------

def configure(env: Env, target: cfg.Target, *, password: str = "", key: str = "",
              timeout: float = 300) -> dict[str, Any]:
    """Store the target; with no password, generate one and create the repository;
    with a password (from a recovery sheet), open the existing repository with it.
    Returns the public target, the SSH public key (sftp) and, for a new
    repository, the recovery sheet: the only time the password is shown."""
    paths = env.paths
    paths.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    pubkey = ""
    if target.kind == "sftp":
        pubkey = cfg.write_ssh_files(paths, target, key or None)
    elif key:
        raise BackupError("key: only an SFTP target takes an SSH key", "key", "invalid")
    if target.kind == "local" and not password:  # an existing repository's folder is never made
        try:
            Path(target.path).mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise BackupError(f"path: cannot create {target.path}: {exc.strerror}", "path", "invalid") from None
    new = not password
    secret = password.strip() if password else cfg.new_password()
    if target.kind == "sftp":
        try:
            cfg.sftp_preflight(paths, target)
        except BackupError as err:
            if err.code == "bad_credentials":  # the key to add is shown nowhere else (the owner cannot read secrets/)
                err.message = f"{err.message} (the appliance's public key: {pubkey})"
                err.args = (err.message,)
            raise
    trial = paths.secrets / ".backup-password.new"
    cfg.write_secret(trial, secret + "\n")
    r = env.restic(target, password_file=trial)
    r.give_up = 20.0  # the owner is waiting: an unreachable target is said within seconds
    try:
        if new:
            try:
                r.run("init", timeout=timeout)
            except BackupError as err:
                if "already" in err.message or "config file already exists" in err.message:
                    raise BackupError(f"target: {target.repository()} already holds a restic repository; give its "
                                      "password (from the recovery sheet) to use it, or choose an empty folder",
                                      "password", "exists") from None
                raise
        else:
            r.run("cat", "config", "--no-lock", timeout=timeout)  # proves repository + password
        os.replace(trial, paths.password)
    finally:
        trial.unlink(missing_ok=True)
    configured_at = now_iso()
    cfg.save_target(paths, target, configured_at)
    result: dict[str, Any] = {"target": target.public(), "created": new, "configured_at": configured_at}
    if pubkey:
        result["ssh_public_key"] = pubkey
    if new:
        hostname = env.settings_table().get("mail_host", "") or env.settings_table().get("domain", "")
        result["recovery_sheet"] = cfg.recovery_sheet(target, secret, env.version, hostname)
    return result


# -- back up --------------------------------------------------------------------------

def backup(env: Env, progress: Progress = _quiet) -> dict[str, Any]:
    """Stage, `restic backup`, `forget --prune`; the outcome is recorded either way."""
    start = time.monotonic()
    entry: dict[str, Any] = {"at": now_iso(), "ok": False, "error": None, "snapshot": None, "seconds": 0}
    try:
        with run_lock(env, "back up"):
            result = _backup(env, progress, entry)
        entry.update(ok=True)
        return result
    except BackupError as err:
        entry["error"] = err.message
        raise
    except Exception as err:
        entry["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        raise
    finally:
        entry["seconds"] = round(time.monotonic() - start, 1)
        record(env, "last_backup", entry)


def _backup(env: Env, progress: Progress, entry: dict[str, Any]) -> dict[str, Any]:
    r = env.restic()
    deadline = time.monotonic() + env.timeout
    left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
    progress("target", f"opening {r.target.repository()}")
    clear_stale_locks(r, env.timeout, progress)
    values = env.settings_table()
    info = {"version": env.version, "created": entry["at"],
            "settings": {k: values[k] for k in ("domain", "mail_host", "stack_project") if values.get(k)}}
    with scratch(env, "staging") as staging:
        manifest = stage(env.state_dir, staging, env.volume_io(), info, progress)
        progress("upload", f"backing up {manifest['messages']} messages in {len(manifest['mailboxes'])} mailboxes")
        parser = ProgressParser(progress)
        # Staging is rebuilt each run: inode and ctime always change, so restic decides by size and mtime.
        # The mail host as a tag too: the snapshot list can say which appliance made each
        # snapshot (restic's own host is HOST for all, so retention groups them).
        mail_host = ["--tag", f"host={values['mail_host']}"] if values.get("mail_host") else []
        r.run("backup", ".", "--host", HOST, "--tag", TAG, "--tag", f"version={env.version}", *mail_host,
              "--ignore-inode", "--ignore-ctime", "--exclude-caches", timeout=left(), on_line=parser, cwd=staging)
    summary = parser.summary or {}
    entry["snapshot"] = (summary.get("snapshot_id") or "")[:8] or None
    if parser.errors:
        raise BackupError("some files could not be read: " + "; ".join(parser.errors[:3]), "contents")
    progress("retention", "forgetting old snapshots (7 daily, 4 weekly, 12 monthly) and pruning")
    r.run(*retention_args(env.policy), timeout=left(), json_out=False)
    return {"snapshot": entry["snapshot"], "messages": manifest["messages"],
            "mailboxes": len(manifest["mailboxes"]), "volumes": manifest["volumes"],
            "files_new": summary.get("files_new"), "files_changed": summary.get("files_changed"),
            "data_added": summary.get("data_added"), "total_bytes": summary.get("total_bytes_processed")}


# -- list -----------------------------------------------------------------------------

def snapshots(env: Env, timeout: float = 300) -> list[dict[str, Any]]:
    data = env.restic().json("snapshots", "--no-lock", "--tag", TAG, timeout=timeout) or []
    out = []
    for s in data:
        tags = s.get("tags") or []
        version = next((t.split("=", 1)[1] for t in tags if t.startswith("version=")), "")
        host = next((t.split("=", 1)[1] for t in tags if t.startswith("host=")), "")
        summ = s.get("summary") or {}
        out.append({"id": s.get("short_id") or s.get("id", "")[:8], "full_id": s.get("id", ""),
                    "time": s.get("time", ""), "version": version, "host": host,
                    "files": summ.get("total_files_processed"), "bytes": summ.get("total_bytes_processed")})
    return sorted(out, key=lambda x: x["time"], reverse=True)


# -- restore and verify ---------------------------------------------------------------

def version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_snapshot_id(snapshot: str) -> str:
    s = snapshot.strip()
    if s != "latest" and not (4 <= len(s) <= 64 and all(c in "0123456789abcdef" for c in s)):
        raise BackupError("snapshot: give 'latest' or a snapshot ID from the list (hex, e.g. 3f2a9c1b)",
                          "snapshot", "invalid")
    return s


def read_manifest(r: Restic, snapshot: str, timeout: float) -> dict[str, Any]:
    text = r.run("dump", "--tag", TAG, snapshot, f"/{MANIFEST}", json_out=False, timeout=timeout, what="dump")
    try:
        return json.loads(text)
    except ValueError:
        raise BackupError(f"snapshot {snapshot}: its manifest is unreadable; it was not made by Mailstead",
                          "snapshot") from None


def restore_into(r: Restic, snapshot: str, dest: Path, timeout: float, progress: Progress) -> str:
    """Restore `snapshot` into `dest`; returns the snapshot's ID."""
    parser = ProgressParser(progress, step="download")
    r.run("restore", "--tag", TAG, snapshot, "--target", str(dest), timeout=timeout, on_line=parser)
    summary = parser.summary or {}
    if summary.get("snapshot_id"):
        return str(summary["snapshot_id"])[:8]
    return _resolve(r, snapshot, timeout)


def _resolve(r: Restic, snapshot: str, timeout: float) -> str:
    data = r.json("snapshots", "--no-lock", "--tag", TAG, *(["--latest", "1"] if snapshot == "latest" else [snapshot]),
                  timeout=timeout) or []
    return str(data[-1].get("short_id", ""))[:8] if data else snapshot


def verify(env: Env, progress: Progress = _quiet) -> dict[str, Any]:
    """Restore the latest snapshot into a scratch folder and compare it with its
    manifest (message counts, SHA-256 per message file, the databases)."""
    start = time.monotonic()
    entry: dict[str, Any] = {"at": now_iso(), "ok": False, "error": None, "snapshot": None, "seconds": 0,
                             "messages": 0}
    try:
        with run_lock(env, "verify"):
            r = env.restic()
            clear_stale_locks(r, env.timeout, progress)
            with scratch(env, "verify") as dest:
                progress("download", "restoring the latest snapshot into a scratch folder")
                entry["snapshot"] = restore_into(r, "latest", dest, env.timeout, progress)
                try:
                    manifest = json.loads((dest / MANIFEST).read_text())
                except (OSError, ValueError):
                    raise BackupError(f"snapshot {entry['snapshot']}: no readable manifest", "snapshot") from None
                progress("compare", f"comparing {manifest.get('messages', 0)} messages with the manifest")
                problems = compare(manifest, dest)
            entry["messages"] = manifest.get("messages", 0)
            if problems:
                more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
                raise BackupError(f"snapshot {entry['snapshot']} does not match its manifest: "
                                  + "; ".join(problems[:5]) + more, "verify", "mismatch")
        entry["ok"] = True
        return {"snapshot": entry["snapshot"], "messages": entry["messages"],
                "mailboxes": len(manifest.get("mailboxes", {})), "ok": True}
    except Exception as err:
        entry["error"] = err.message if isinstance(err, BackupError) else f"{type(err).__name__}: {str(err)[:300]}"
        raise
    finally:
        entry["seconds"] = round(time.monotonic() - start, 1)
        record(env, "last_verify", entry)


class ComposeStack:
    """The real stack: stopped with `docker compose down`, brought back by the deploy operation."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def stop(self, project: str) -> None:
        import subprocess

        r = subprocess.run(["docker", "compose", "-p", project, "down", "--remove-orphans"],
                           capture_output=True, text=True, timeout=300, check=False)
        if r.returncode != 0:
            raise BackupError(f"stack: could not stop it: {' '.join(r.stderr.split())[-300:]}", "stack")

    def start(self, progress: Progress) -> dict[str, Any]:
        from portal.agent.registry import OpError
        from portal.stack.privileged import deploy_stack

        try:
            return deploy_stack(self.ctx, progress)
        except OpError as err:
            raise BackupError(f"restored, but the stack did not come back: {err.message}", "stack",
                              "deploy_failed") from None


def restore(env: Env, snapshot: str = "latest", progress: Progress = _quiet) -> dict[str, Any]:
    """Bring the appliance back to `snapshot`: checked first (version, manifest,
    SHA-256 of every message), then the stack is stopped, files and volumes are
    put back, and the stack is deployed and waited for until healthy.
    Recorded as "last_restore" in backup-state.json."""
    snapshot = check_snapshot_id(snapshot)
    start = time.monotonic()
    entry: dict[str, Any] = {"at": now_iso(), "ok": False, "error": None, "snapshot": snapshot, "seconds": 0}
    try:
        result = _restore(env, snapshot, progress, start)
        entry.update(ok=True, snapshot=result["snapshot"])
        return result
    except Exception as err:
        entry["error"] = err.message if isinstance(err, BackupError) else f"{type(err).__name__}: {str(err)[:300]}"
        raise
    finally:
        entry["seconds"] = round(time.monotonic() - start, 1)
        record(env, "last_restore", entry)


def _restore(env: Env, snapshot: str, progress: Progress, start: float) -> dict[str, Any]:
    with run_lock(env, "restore"):
        r = env.restic()
        clear_stale_locks(r, env.timeout, progress)
        progress("check", f"reading the manifest of snapshot {snapshot}")
        manifest = read_manifest(r, snapshot, env.timeout)
        made_by = str(manifest.get("version", ""))
        if version_tuple(made_by) > version_tuple(env.version):
            raise BackupError(f"snapshot {snapshot} was made by Mailstead {made_by}, newer than this appliance "
                              f"({env.version}); upgrade this appliance to {made_by} or later, then restore "
                              "(nothing was changed)", "snapshot", "newer_version")
        fmt = manifest.get("format")
        if not isinstance(fmt, int) or fmt < 1 or fmt > FORMAT:
            raise BackupError(f"snapshot {snapshot} has backup format {fmt!r}, which this Mailstead ({env.version}) "
                              f"does not read (it reads format 1 to {FORMAT}); upgrade this appliance, then restore "
                              "(nothing was changed)", "snapshot", "newer_version")
        # Older snapshots of a known format restore as they are: state.db's tables are
        # created or extended by the portal on start (db.py), so settings carry over.
        with scratch(env, "restore") as dest:
            progress("download", f"restoring snapshot {snapshot} into a scratch folder")
            snap_id = restore_into(r, snapshot, dest, env.timeout, progress)
            problems = compare(manifest, dest)
            if problems:
                raise BackupError(f"snapshot {snap_id} does not match its manifest ({'; '.join(problems[:3])}); "
                                  "nothing was changed: try an older snapshot", "snapshot", "mismatch")
            old_project = env.project()
            stack = env.stack
            if stack is not None and (env.state_dir / "stack" / "compose.yaml").exists():
                progress("stop", f"stopping the mail stack ({old_project})")
                stack.stop(old_project)  # a fresh appliance has none to stop
            progress("files", "putting back the databases, secrets, certificates and stack config")
            put_back_files(env.state_dir, dest)
            volumes = env.volume_io()  # the restored settings' compose project
            for name in manifest.get("volumes", []):
                if name in VOLUMES and (dest / "volumes" / name).is_dir():
                    progress("volumes", f"putting back the {name} volume")
                    volumes.load(name, dest / "volumes" / name)
        deployed = None
        # Only a stack the backed-up appliance had (its rendered compose file came back):
        # a snapshot taken before setup's Deploy has none to start.
        if stack is not None and (env.state_dir / "stack" / "compose.yaml").exists():
            progress("deploy", "starting the restored stack and waiting until it is healthy")
            deployed = stack.start(progress)
    return {"snapshot": snap_id, "version": made_by, "messages": manifest.get("messages", 0),
            "mailboxes": len(manifest.get("mailboxes", {})), "seconds": round(time.monotonic() - start, 1),
            "stack": deployed}


def put_back_files(state_dir: Path, restored: Path) -> None:
    """Replace state.db, accounts.db, tls/, stack/ and secrets/ (keeping this
    appliance's own backup configuration) with the restored ones."""
    db = restored / "db"
    if (db / "state.db").exists():
        _replace_file(db / "state.db", state_dir / "state.db")
    if (db / "accounts.db").exists():
        (state_dir / "accounts").mkdir(parents=True, exist_ok=True)
        _replace_file(db / "accounts.db", state_dir / "accounts" / "accounts.db")
        for extra in ("accounts.db-wal", "accounts.db-shm"):
            (state_dir / "accounts" / extra).unlink(missing_ok=True)
    for extra in ("state.db-wal", "state.db-shm"):
        (state_dir / extra).unlink(missing_ok=True)
    files = restored / "files"
    for name in ("tls", "stack"):
        if (files / name).is_dir():
            _replace_tree(files / name, state_dir / name)
    if (files / "secrets").is_dir():
        secrets = state_dir / "secrets"
        secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        for item in secrets.iterdir():
            if item.name not in cfg.OWN_SECRETS:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        for item in (files / "secrets").iterdir():
            if item.name in cfg.OWN_SECRETS:
                continue
            dest = secrets / item.name
            if item.is_dir() and not item.is_symlink():
                shutil.copytree(item, dest, symlinks=True)
            else:
                shutil.copy2(item, dest, follow_symlinks=False)


def _replace_file(src: Path, dest: Path) -> None:
    """Put `src` in place of `dest`, keeping the owner and mode of the file it replaces:
    the snapshot's copies were made by root, but this appliance's state.db is the web
    user's (the portal could not open a root-owned one: found by the VM restore test)."""
    tmp = dest.with_name(f".{dest.name}.restore")
    shutil.copy2(src, tmp)
    if dest.exists():
        st = dest.stat()
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o7777)
    os.replace(tmp, dest)


def _replace_tree(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.restore")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
