"""Long operations as background jobs with progress (deploy, certificate issue, DNS check).

A job is an operation declared with `job=True` (portal/agent/registry.py):
calling it starts the job and returns its record; callers poll `job_status(id)`
(or `job_latest(kind)` after a reload). The agent runs the job's function in a
thread and records each progress event in `<state>/jobs/<id>.json` (root, 0600,
written whole through the safe-write helper), so a page reload, a second
browser tab or the CLI see the same progress. A job's arguments are passed to
its function directly: nothing is handed over through a request file. A job whose agent died (killed, rebooted) is reported as
`interrupted`; starting the kind again runs it anew (the operations are safe
to repeat). At most one job of a kind runs at a time: starting a running kind
returns the running job.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portal.agent.registry import REGISTRY, Context, OpError, privileged
from portal.core import safefs
from portal.core.layout import StateLayout

Progress = Callable[[str, str], None]

KEEP = 20  # finished job files kept per kind
MAX_EVENTS = 500

_lock = threading.Lock()
_running: dict[str, str] = {}  # kind -> job id, in this agent process
_BOOT = f"{os.getpid()}-{time.time_ns()}"  # tells this agent's jobs from a dead agent's


def kinds() -> list[str]:
    return sorted(name for name, op in REGISTRY.items() if op.job)


def jobs_dir(ctx: Context) -> Path:
    return StateLayout(ctx.state_dir).jobs


def _write(path: Path, job: dict[str, Any]) -> None:
    safefs.write_bytes(path, json.dumps(job, sort_keys=True).encode(), 0o600)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        job = safefs.read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(job, dict):
        return None
    if job.get("state") == "running" and job.get("agent") != _BOOT:
        job["state"] = "interrupted"
        job["error"] = ("the agent stopped while this ran (restart or power loss); "
                        "start it again — it is safe to repeat")
    return job


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k != "agent"}


def _job_op(kind: str) -> Any:
    op = REGISTRY.get(kind)
    if op is None or not op.job:
        raise OpError("bad_args", f"unknown job '{kind[:40]}'; known: {', '.join(kinds())}", "kind")
    return op


def start(ctx: Context, kind: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run job operation `kind` with `args` in a thread (or return the one of this kind
    already running: jobs of a kind run one at a time, requests are not queued)."""
    func = _job_op(kind).func
    args = dict(args or {})
    folder = jobs_dir(ctx)
    safefs.ensure_dir(folder, 0o700)
    with _lock:
        running = _running.get(kind)
        if running:
            job = _read(folder / f"{running}.json")
            if job and job["state"] == "running":
                return _public(job)
        # Microseconds in the id: two jobs of a kind started within one second still
        # sort in start order (latest() and pruning go by name).
        now = time.time()
        job_id = (f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}{int(now * 1e6) % 1_000_000:06d}"
                  f"-{kind}-{secrets.token_hex(4)}")
        path = folder / f"{job_id}.json"
        job = {"id": job_id, "kind": kind, "state": "running", "agent": _BOOT,
               "started": time.time(), "finished": None, "events": [], "result": None, "error": None}
        _write(path, job)
        _running[kind] = job_id
    job_lock = threading.Lock()

    def progress(step: str, detail: str) -> None:
        with job_lock:
            job["events"] = (job["events"] + [{"t": round(time.time() - job["started"], 1),
                                               "step": str(step)[:80], "detail": str(detail)[:300]}])[-MAX_EVENTS:]
            _write(path, job)

    def run() -> None:
        try:
            result = func(ctx, progress, **args)
            outcome: dict[str, Any] = {"state": "done", "result": result}
        except OpError as err:
            outcome = {"state": "failed", "error": err.message, "code": err.code}
        except Exception as err:  # recorded, never lost; the agent log has the traceback
            import logging

            logging.getLogger("mailstead.agent").exception("job %s failed", job_id)
            outcome = {"state": "failed", "error": f"{type(err).__name__}: the job failed unexpectedly; "
                                                   "see the agent log (journalctl -u mailstead-agent)",
                       "code": "internal"}
        with job_lock:
            job.update(outcome, finished=time.time())
            _write(path, job)
        with _lock:
            if _running.get(kind) == job_id:
                del _running[kind]
        _prune(folder, kind)

    threading.Thread(target=run, name=f"job-{job_id}", daemon=True).start()
    return _public(job)


def _prune(folder: Path, kind: str) -> None:
    files = sorted(folder.glob(f"*-{kind}-*.json"))
    for old in files[:-KEEP]:
        safefs.remove(old)


JOB_ID = re.compile(r"[0-9]{20}-[a-z0-9_]{1,40}-[0-9a-f]{8}")


def status(ctx: Context, job_id: str) -> dict[str, Any]:
    if not JOB_ID.fullmatch(job_id or ""):
        raise OpError("bad_args", "not a job id", "job_id")
    job = _read(jobs_dir(ctx) / f"{job_id}.json")
    if job is None:
        raise OpError("not_found", f"no job {job_id[:60]}", "job_id")
    return _public(job)


def latest(ctx: Context, kind: str) -> dict[str, Any] | None:
    files = sorted(jobs_dir(ctx).glob(f"*-{kind}-*.json"))
    for path in reversed(files):
        job = _read(path)
        if job is not None:
            return _public(job)
    return None


@privileged(web=True, timeout=10.0)
def job_status(ctx: Context, job_id: str) -> dict[str, Any]:
    """A job's state (running, done, failed, interrupted), progress events and result."""
    return status(ctx, job_id)


@privileged(web=True, timeout=10.0)
def job_latest(ctx: Context, kind: str) -> dict[str, Any]:
    """The newest job of `kind` (to resume watching after a reload), or {"job": null}."""
    _job_op(kind)
    return {"job": latest(ctx, kind)}
