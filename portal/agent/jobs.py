"""Long operations as background jobs with progress (deploy, certificate issue, DNS check).

The web process starts a job with `job_start(kind)` and polls `job_status(id)`
(or `job_latest(kind)` after a reload): the agent runs the job's function in a
thread and records each progress event in `<state>/jobs/<id>.json` (written
whole, then renamed), so a page reload, a second browser tab or the CLI see the
same progress. A job whose agent died (killed, rebooted) is reported as
`interrupted`; starting the kind again runs it anew (the operations are safe
to repeat). At most one job of a kind runs at a time: starting a running kind
returns the running job.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portal.agent.ops import Context, OpError, operation

Progress = Callable[[str, str], None]
JobFunc = Callable[[Context, Progress], dict[str, Any]]

# kind -> function(ctx, progress) -> result; filled by the modules that own the work.
KINDS: dict[str, JobFunc] = {}
KEEP = 20  # finished job files kept per kind
MAX_EVENTS = 500

_lock = threading.Lock()
_running: dict[str, str] = {}  # kind -> job id, in this agent process
_BOOT = f"{os.getpid()}-{time.time_ns()}"  # tells this agent's jobs from a dead agent's


def job_kind(name: str) -> Callable[[JobFunc], JobFunc]:
    def register(func: JobFunc) -> JobFunc:
        KINDS[name] = func
        return func
    return register


def jobs_dir(ctx: Context) -> Path:
    return ctx.state_dir / "jobs"


def _write(path: Path, job: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(job, sort_keys=True))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if job.get("state") == "running" and job.get("agent") != _BOOT:
        job["state"] = "interrupted"
        job["error"] = ("the agent stopped while this ran (restart or power loss); "
                        "start it again — it is safe to repeat")
    return job


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k != "agent"}


def start(ctx: Context, kind: str) -> dict[str, Any]:
    func = KINDS.get(kind)
    if func is None:
        raise OpError("bad_args", f"kind: unknown job '{kind[:40]}'; known: {', '.join(sorted(KINDS))}")
    folder = jobs_dir(ctx)
    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
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
            result = func(ctx, progress)
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
        old.unlink(missing_ok=True)


def status(ctx: Context, job_id: str) -> dict[str, Any]:
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise OpError("bad_args", "job_id: not a job id")
    job = _read(jobs_dir(ctx) / f"{job_id}.json")
    if job is None:
        raise OpError("not_found", f"job_id: no job {job_id[:60]}")
    return _public(job)


def latest(ctx: Context, kind: str) -> dict[str, Any] | None:
    files = sorted(jobs_dir(ctx).glob(f"*-{kind}-*.json"))
    for path in reversed(files):
        job = _read(path)
        if job is not None:
            return _public(job)
    return None


@operation("job_start")
def job_start(ctx: Context, kind: str) -> dict[str, Any]:
    """Start a long operation in the background (or return the one of this kind already running)."""
    return start(ctx, kind)


@operation("job_status")
def job_status(ctx: Context, job_id: str) -> dict[str, Any]:
    """A job's state (running, done, failed, interrupted), progress events and result."""
    return status(ctx, job_id)


@operation("job_latest")
def job_latest(ctx: Context, kind: str) -> dict[str, Any]:
    """The newest job of `kind` (to resume watching after a reload), or {"job": null}."""
    if kind not in KINDS:
        raise OpError("bad_args", f"kind: unknown job '{kind[:40]}'; known: {', '.join(sorted(KINDS))}")
    return {"job": latest(ctx, kind)}
