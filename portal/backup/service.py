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
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portal.backup import BackupError
from portal.backup import config as cfg
from portal.backup.contents import (FORMAT, FORMATS_READ, MANIFEST, VOLUMES, DockerVolumes, FolderVolumes, VolumeIO,
                                    check_snapshot, stage)
from portal.backup.restic import HOST, TAG, ProgressParser, Restic, clear_stale_locks, retention_args
from portal.core import safefs
from portal.core.layout import StateLayout

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
    def layout(self) -> StateLayout:
        return StateLayout(self.state_dir)

    @property
    def paths(self) -> cfg.Paths:
        return cfg.Paths(self.layout.secrets)

    @property
    def state_file(self) -> Path:
        return self.layout.backup_state

    @property
    def work(self) -> Path:
        return self.layout.backup_work  # staging, restore and verify scratch (0700)

    @property
    def cache(self) -> Path:
        return self.layout.backup_cache

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
        data = safefs.read_json(env.state_file, {})
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(env: Env, key: str, entry: dict[str, Any]) -> None:
    data = read_state(env)
    data[key] = entry
    safefs.ensure_dir(env.state_dir, 0o755)
    safefs.write_json(env.state_file, data, 0o644)


@contextlib.contextmanager
def run_lock(env: Env, what: str) -> Iterator[None]:
    """One backup/verify/restore at a time on this appliance (a flock: gone with its process)."""
    safefs.ensure_dir(env.state_dir, 0o755)
    fd = os.open(env.layout.backup_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
    """A scratch folder under backup-work (root's, 0700), removed afterwards."""
    safefs.ensure_dir(env.state_dir, 0o755)
    safefs.ensure_dir(env.work, 0o700)
    path = env.work / name
    safefs.remove_tree(path)  # a crashed run's leftovers
    try:
        yield path
    finally:
        safefs.remove_tree(path)


# -- configure ------------------------------------------------------------------------

def configure(env: Env, target: cfg.Target, *, password: str = "", key: str = "",
              timeout: float = 300) -> dict[str, Any]:
    """Store the target; with no password, generate one and create the repository;
    with a password (from a recovery sheet), open the existing repository with it.
    Returns the public target, the SSH public key (sftp) and, for a new
    repository, the recovery sheet: the only time the password is shown."""
    paths = env.paths
    safefs.ensure_dir(env.state_dir, 0o755)
    safefs.ensure_dir(paths.secrets, 0o700)
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
        safefs.rename(trial, paths.password)
    finally:
        safefs.remove(trial)
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
    import json

    text = r.run("dump", "--tag", TAG, snapshot, f"/{MANIFEST}", json_out=False, timeout=timeout, what="dump")
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise BackupError(f"snapshot {snapshot}: its manifest is unreadable; it was not made by Mailstead",
                          "snapshot") from None
    return manifest


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


def check_format(manifest: dict[str, Any], snapshot: str, version: str) -> int:
    """The manifest's backup format, if this Mailstead reads it; BackupError otherwise.
    The snapshot's own version claim only ever refuses (a newer one): it unlocks nothing."""
    made_by = str(manifest.get("version", ""))
    if version_tuple(made_by) > version_tuple(version):
        raise BackupError(f"snapshot {snapshot} was made by Mailstead {made_by}, newer than this appliance "
                          f"({version}); upgrade this appliance to {made_by} or later, then restore "
                          "(nothing was changed)", "snapshot", "newer_version")
    fmt = manifest.get("format")
    if type(fmt) is not int or fmt not in FORMATS_READ:
        raise BackupError(f"snapshot {snapshot} has backup format {fmt!r}, which this Mailstead ({version}) "
                          f"does not read (it reads format {FORMATS_READ[0]} to {FORMAT}); upgrade this appliance, "
                          "then restore (nothing was changed)", "snapshot", "newer_version")
    return fmt


def _mismatch(snapshot: str, problems: list[str], after: str) -> BackupError:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return BackupError(f"snapshot {snapshot} does not match its manifest or holds what Mailstead never backs up: "
                       + "; ".join(problems[:5]) + more + after, "snapshot", "mismatch")


def examine(env: Env, manifest: dict[str, Any], dest: Path, snapshot: str, progress: Progress,
            after: str = "") -> Any:
    """Check a snapshot restored into `dest` as a restore would (types and modes of every
    entry, the manifest's hashes, then everything a restore reads: settings, accounts,
    admin record, file names) and return the restore's plan; BackupError naming the
    paths or keys otherwise. Format 1 manifests hash only the messages and the
    databases: that is said, and the rest is checked for type, mode and content."""
    from portal.backup.snapshot import read_plan

    if manifest.get("format") == 1:
        progress("check", f"snapshot {snapshot} is in backup format 1: its manifest has SHA-256 sums of the "
                          "messages and the databases only; the other files are checked for type, mode and "
                          "content but not against a sum")
    progress("compare", f"checking {len(manifest.get('sha256') or {}) or manifest.get('messages', 0)} "
                        "files against the manifest")
    problems, links = check_snapshot(manifest, dest)
    if problems:
        raise _mismatch(snapshot, problems, after)
    return read_plan(dest, manifest, links, env.work, progress)


def verify(env: Env, progress: Progress = _quiet) -> dict[str, Any]:
    """Restore the latest snapshot into a scratch folder and check it as a restore would
    (examine): every file against its SHA-256 in the manifest, the message counts, the
    databases, the settings and accounts a restore would import."""
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
                    manifest = safefs.read_json(dest / MANIFEST, limit=1 << 30)
                except (OSError, ValueError):
                    manifest = None
                if not isinstance(manifest, dict):
                    raise BackupError(f"snapshot {entry['snapshot']}: no readable manifest", "snapshot")
                check_format(manifest, entry["snapshot"], env.version)
                examine(env, manifest, dest, entry["snapshot"], progress)
            entry["messages"] = manifest.get("messages", 0)
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
    """Bring the appliance back to `snapshot`, treated as untrusted input: restored into
    a scratch folder and checked first (version and format, every entry's type and
    mode, every file against the manifest's SHA-256, then the settings, accounts and
    admin record it holds: see examine and portal/backup/snapshot.py); only then is
    the stack stopped, the checked data written by the agent (never copied over the
    state as it is) and the volumes put back, and the stack deployed from the restored
    settings and waited for until healthy. Recorded as "last_restore" in
    backup-state.json."""
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
    from portal.backup.snapshot import apply_plan

    with run_lock(env, "restore"):
        r = env.restic()
        clear_stale_locks(r, env.timeout, progress)
        progress("check", f"reading the manifest of snapshot {snapshot}")
        manifest = read_manifest(r, snapshot, env.timeout)
        check_format(manifest, snapshot, env.version)
        made_by = str(manifest.get("version", ""))
        with scratch(env, "restore") as dest:
            progress("download", f"restoring snapshot {snapshot} into a scratch folder")
            snap_id = restore_into(r, snapshot, dest, env.timeout, progress)
            # Everything is checked before anything is touched.
            plan = examine(env, manifest, dest, snap_id, progress, "; nothing was changed: try an older snapshot")
            old_project = env.project()
            stack = env.stack
            if stack is not None and (env.layout.stack / "compose.yaml").exists():
                progress("stop", f"stopping the mail stack ({old_project})")
                stack.stop(old_project)  # a fresh appliance has none to stop
            imported = apply_plan(plan, env.state_dir, progress)
            volumes = env.volume_io()  # this machine's compose project (stack_project is its own)
            for name in manifest.get("volumes", []):
                if name in VOLUMES and (dest / "volumes" / name).is_dir():
                    progress("volumes", f"putting back the {name} volume")
                    volumes.load(name, dest / "volumes" / name)
        deployed = None
        # Only a stack the backed-up appliance had deployed: a snapshot taken before
        # setup's Deploy has none to start.
        if stack is not None and plan.settings.get("stack_deployed") == "1":
            progress("deploy", "starting the restored stack and waiting until it is healthy")
            deployed = stack.start(progress)
    return {"snapshot": snap_id, "version": made_by, "messages": manifest.get("messages", 0),
            "mailboxes": len(manifest.get("mailboxes", {})), "seconds": round(time.monotonic() - start, 1),
            "stack": deployed, "imported": imported}
