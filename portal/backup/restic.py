"""Run restic: one command at a time, with a timeout, JSON progress parsed into
progress events, and its failures turned into messages that name what to fix."""

from __future__ import annotations

import json
import selectors
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portal.backup import BackupError
from portal.backup.config import Paths, Target, restic_env, restic_options

Progress = Callable[[str, str], None]

# restic's exit codes (0.17+): 10 no repository, 11 locking failed, 12 wrong password.
NO_REPO, LOCKED, WRONG_PASSWORD = 10, 11, 12

# Backend errors that retrying does not heal (restic retries every error for minutes).
PERMANENT = ("does not exist in our records", "signature we calculated does not match", "invalidaccesskeyid", "signaturedoesnotmatch", "access denied",
             "accessdenied", "forbidden", "permission denied", "host key verification failed")

RETENTION = {"daily": 7, "weekly": 4, "monthly": 12}
HOST = "mailstead"  # every snapshot's host: the same on a re-flashed appliance, so retention groups them
TAG = "mailstead"


def retention_args(policy: dict[str, int] | None = None) -> list[str]:
    """`forget` arguments for the policy (default 7 daily, 4 weekly, 12 monthly)."""
    policy = {**RETENTION, **(policy or {})}
    args = []
    for unit in ("daily", "weekly", "monthly"):
        n = policy[unit]
        if not isinstance(n, int) or n < 0:
            raise BackupError(f"keep_{unit}: must be a whole number, 0 or more", f"keep_{unit}", "invalid")
        if n:
            args += [f"--keep-{unit}", str(n)]
    if not args:
        raise BackupError("retention: keep at least one daily, weekly or monthly snapshot", "retention", "invalid")
    return ["forget", "--tag", TAG, "--host", HOST, "--group-by", "host", *args, "--prune"]


@dataclass
class Restic:
    paths: Paths
    target: Target
    cache_dir: Path
    binary: str = "restic"
    password_file: Path | None = None
    give_up: float = 120.0  # seconds of backend retries before the run stops

    def command(self, *args: str, json_out: bool = True) -> list[str]:
        return [self.binary, *restic_options(self.paths, self.target), *(["--json"] if json_out else []), *args]

    def run(self, *args: str, timeout: float = 300, json_out: bool = True, cwd: Path | None = None,
            on_line: Callable[[str], None] | None = None, what: str = "") -> str:
        """Run restic; return its stdout; raise BackupError with the cause in plain words.

        restic retries a failing backend for minutes; refused credentials and host
        keys never heal, so the run stops at the first such retry, and a target
        that keeps failing stops it after `self.give_up` seconds of retries."""
        env = restic_env(self.paths, self.target, self.cache_dir, self.password_file)
        cmd = self.command(*args, json_out=json_out)
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    env=env, cwd=cwd, text=True, errors="replace")
        except FileNotFoundError:
            raise BackupError(f"restic is not installed ({self.binary}); install the restic package",
                              "restic") from None
        errors: list[str] = []
        state = {"first_retry": 0.0, "stop": ""}

        def read_errors() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if len(errors) < 2000:
                    errors.append(line)
                low = line.lower()
                if "retrying after" in low:
                    if any(p in low for p in PERMANENT):
                        state["stop"] = "permanent"
                    elif not state["first_retry"]:
                        state["first_retry"] = time.monotonic()

        reader = threading.Thread(target=read_errors, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        out: list[str] = []
        stopped = ""
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                if now > deadline:
                    stopped = "timeout"
                elif state["stop"]:
                    stopped = "permanent"
                elif state["first_retry"] and now - state["first_retry"] > self.give_up:
                    stopped = "retries"
                if stopped:
                    proc.kill()
                    break
                if not sel.select(timeout=0.5):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if on_line is not None:
                    on_line(line)
                out.append(line)
            out.extend(proc.stdout.readlines() if not stopped else [])
        finally:
            sel.close()
            proc.wait()
            reader.join(timeout=10)
            proc.stdout.close()
            if proc.stderr is not None:
                proc.stderr.close()
        stderr = "".join(errors)
        if stopped == "timeout" and not state["first_retry"]:
            raise BackupError(f"restic {args[0]} did not finish within {timeout:g} s and was stopped; "
                              "the target may be slow or unreachable", "timeout", "timeout")
        if stopped or proc.returncode != 0:
            return_code = proc.returncode if not stopped else -1
            raise explain(return_code, stderr, self.target, what or args[0])
        return "".join(out)

    def json(self, *args: str, timeout: float = 300) -> Any:
        out = self.run(*args, timeout=timeout)
        text = out.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def explain(code: int, stderr: str, target: Target, what: str) -> BackupError:
    """restic's failure as a BackupError naming the field to fix (never a secret:
    credentials reach restic through the environment and files, never its arguments)."""
    text = " ".join(_plain(stderr).split())
    low = text.lower()
    where = target.repository()
    tail = text[-300:]
    if code == WRONG_PASSWORD or "wrong password" in low:
        return BackupError("password: the repository password does not match (wrong password or no key found); "
                           "use the password from the recovery sheet", "password", "wrong_password")
    if target.kind == "s3" and any(s in low for s in ("invalidaccesskeyid", "signaturedoesnotmatch",
                                                       "does not exist in our records",
                                                       "signature we calculated does not match",
                                                       "access denied", "accessdenied", "403 forbidden")):
        if "signature" in low:
            return BackupError(f"secret_access_key: the S3 store at {target.endpoint} knows the access key ID but "
                               "the secret access key does not match it; enter the secret key again",
                               "secret_access_key", "bad_credentials")
        return BackupError(f"access_key_id: the S3 store at {target.endpoint} refused the access key "
                           f"({tail[-160:]}); check the access key ID and secret key", "access_key_id",
                           "bad_credentials")
    if target.kind == "sftp":
        if "host key verification failed" in low or "remote host identification has changed" in low:
            return BackupError(f"host: the SFTP server {target.host} presents a different host key than the one "
                               "recorded at configuration; if the server was rebuilt, configure the target again",
                               "host", "host_key")
        if "permission denied" in low:
            return BackupError(f"key: the SFTP server {target.host} refused user {target.user} with the appliance's "
                               "key; add the public key shown at configuration to the user's authorized_keys",
                               "key", "bad_credentials")
        # restic passes ssh's own words on from a goroutine that may not have run
        # before it exits (seen with the server down: only its "EOF" reached us).
        if "unable to start the sftp session" in low or "server unexpectedly closed connection" in low:
            return BackupError(f"target: cannot reach {where}: no SFTP session ({tail[-200:]}); is the server up "
                               "and reachable from this appliance, and does it take the key shown at "
                               "configuration?", "target", "unreachable")
    unreachable = ("connection refused", "no such host", "i/o timeout", "network is unreachable",
                   "connection timed out", "could not resolve", "name or service not known",
                   "connection closed", "no route to host", "connection reset", "dial tcp",
                   "ssh command exited")
    if target.kind != "local" and any(s in low for s in unreachable):
        return BackupError(f"target: cannot reach {where}: {tail[-200:]}; is the server up and reachable from "
                           "this appliance?", "target", "unreachable")
    if code == NO_REPO or "repository does not exist" in low or ("unable to open config file" in low):
        hint = ("is the disk mounted?" if target.kind == "local" else "check the path/bucket")
        return BackupError(f"target: there is no restic repository at {where} ({hint}); configure the target to "
                           "create one", "target", "no_repository")
    if code == LOCKED or "repository is already locked" in low:
        return BackupError(f"target: the repository is locked by another restic process ({tail[-200:]}); "
                           "it is unlocked automatically once the lock is older than the run's timeout",
                           "target", "locked")
    if target.kind == "local" and ("permission denied" in low or "read-only file system" in low
                                   or "no space left" in low):
        return BackupError(f"path: cannot write to {target.path}: {tail[-200:]}", "path", "target_failed")
    return BackupError(f"restic {what} failed (exit {code}): {tail or 'no message'}", "target", "restic_failed")


def _plain(stderr: str) -> str:
    """restic --json writes its errors as JSON lines ({"message_type": "exit_error", "message": ...})."""
    lines = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if isinstance(msg, dict):
                item = msg.get("error") if isinstance(msg.get("error"), dict) else {}
                line = str(msg.get("message") or item.get("message") or "")
        lines.append(line)
    return "\n".join(lines)


class ProgressParser:
    """restic backup --json lines -> at most one progress event every `every` seconds."""

    def __init__(self, progress: Progress, step: str = "upload", every: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.progress, self.step, self.every, self.clock = progress, step, every, clock
        # None, not 0.0: time.monotonic() counts from boot, so on a machine booted
        # less than `every` seconds ago a 0.0 start dropped the first event.
        self.last: float | None = None
        self.summary: dict[str, Any] | None = None
        self.errors: list[str] = []

    def __call__(self, line: str) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        kind = msg.get("message_type")
        if kind == "status":
            now = self.clock()
            if self.last is not None and now - self.last < self.every and msg.get("percent_done", 0) < 1:
                return
            self.last = now
            self.progress(self.step, describe_status(msg))
        elif kind == "summary":
            self.summary = msg
        elif kind == "error":
            item = msg.get("item") or ""
            self.errors.append(f"{item}: {(msg.get('error') or {}).get('message', '')}"[:200])


def describe_status(msg: dict[str, Any]) -> str:
    pct = 100 * float(msg.get("percent_done") or 0)
    done_files = msg.get("files_done", msg.get("files_restored", 0))  # backup / restore
    done_bytes = msg.get("bytes_done", msg.get("bytes_restored", 0))
    files = f"{done_files}/{msg.get('total_files', '?')} files"
    size = f"{_mb(done_bytes)}/{_mb(msg.get('total_bytes', 0))} MB"
    eta = msg.get("seconds_remaining")
    return f"{pct:.0f}% — {files}, {size}" + (f", about {int(eta)} s left" if eta else "")


def _mb(n: Any) -> str:
    return f"{(n or 0) / 1e6:.1f}"


def locks(r: Restic, timeout: float = 60) -> list[dict[str, Any]]:
    """The repository's locks: [{"id", "time" (epoch s), "exclusive", "hostname", "pid"}]."""
    import datetime as dt

    ids = [i for i in r.run("list", "locks", "--no-lock", json_out=False, timeout=timeout).split() if i]
    found = []
    for lock_id in ids:
        try:
            data = json.loads(r.run("cat", "lock", lock_id, "--no-lock", json_out=False, timeout=timeout))
        except (BackupError, ValueError):
            continue  # removed meanwhile
        when = str(data.get("time", ""))
        try:
            # Go's RFC 3339 with nanoseconds: trim to microseconds for Python
            base, _, rest = when.partition(".")
            frac = "".join(ch for ch in rest if ch.isdigit())[:6]
            tz = rest[len("".join(ch for ch in rest if ch.isdigit())):] if rest else ""
            stamp = dt.datetime.fromisoformat(f"{base}.{frac or '0'}{tz.replace('Z', '+00:00')}").timestamp()
        except ValueError:
            stamp = 0.0
        found.append({"id": lock_id, "time": stamp, "exclusive": bool(data.get("exclusive")),
                      "hostname": data.get("hostname", ""), "pid": data.get("pid", 0)})
    return found


def clear_stale_locks(r: Restic, older_than: float, progress: Progress) -> int:
    """`restic unlock` (restic's own rule: dead process on this host, or 30 min
    without refresh); then, if locks older than `older_than` seconds remain, the
    run that holds them is past any timeout of ours: remove all. Returns how many were removed."""
    before = locks(r)
    if not before:
        return 0
    r.run("unlock", json_out=False, timeout=120)
    left = locks(r)
    now = time.time()
    old = [lk for lk in left if now - lk["time"] > older_than]
    if old:
        progress("locks", f"removing {len(left)} lock(s) older than {older_than:g} s "
                          f"(left by {', '.join(sorted({str(lk['hostname']) for lk in old}))})")
        r.run("unlock", "--remove-all", json_out=False, timeout=120)
        left = locks(r)
    removed = len(before) - len(left)
    if removed:
        progress("locks", f"removed {removed} stale lock(s)")
    return removed


def run_json_lines(r: Restic, args: Sequence[str], timeout: float, parser: ProgressParser,
                   cwd: Path | None = None) -> None:
    r.run(*args, timeout=timeout, on_line=parser, cwd=cwd)
