"""The maintenance scheduler: APScheduler 3.x inside the agent process.

Schedules are plain data in the agent's state.db (table `schedules`: job id,
crontab text, the next fire time), so they survive an agent restart and a
reboot; the scheduler itself keeps its jobs in memory (APScheduler's
MemoryJobStore). Nothing is ever pickled or unpickled: an earlier version's
pickled job table (`scheduler_jobs`) is dropped unread at the agent's start.

Each job is a one-line call to an agent operation (`run_operation`): the same
operations the CLI and the dashboard use, all safe to run twice. Every job
coalesces missed runs into one: an agent that was down over several fire times
runs the job once when it is back, if the first missed time is within the
job's misfire grace time.

Each run's outcome and duration go to the `scheduler_runs` table (bounded:
KEEP_RUNS per job). Outcomes: ok, failed, skipped (the operation is not
available yet in this version, or the job is already running).

Schedules are crontab text, "minute hour day-of-month month day-of-week"
(day of week 0 or 7 = Sunday, as in cron; names like mon-fri work too).
An optional sixth field in front gives seconds (for tests and special cases).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portal.core.errors import MailsteadError
from portal.agent.registry import REGISTRY, Context, OpError, privileged

log = logging.getLogger("mailstead.scheduler")


@dataclass(frozen=True)
class JobSpec:
    op: str               # the agent operation (or background job kind) the job calls
    cron: str             # default schedule
    grace: int            # misfire grace time in seconds
    title: str


# The jobs and their defaults (issue 6). Times are in the owner's time zone (the
# setting time_zone; the appliance's local time when it is not set).
JOBS: dict[str, JobSpec] = {
    "backup": JobSpec("backup_run", "0 3 * * *", 6 * 3600, "Back up"),
    "verify": JobSpec("backup_verify", "30 4 * * 0", 24 * 3600, "Verify the latest backup by restoring it"),
    "cert_renew": JobSpec("cert_renew", "17 5,17 * * *", 6 * 3600, "Renew the certificate when due"),
    "health": JobSpec("health_run", "*/5 * * * *", 240, "Health checks"),
    "dns_check": JobSpec("dns_check", "40 6 * * *", 12 * 3600, "Check DNS for drift"),
    # The update window: the feed is checked daily, and a newer version installed
    # (then a reboot) when automatic updates are on (portal/update/privileged.py).
    "update": JobSpec("update_window", "0 4 * * *", 2 * 3600, "Update window: install a newer version"),
}

# Jobs whose outcome a health check reports: a health round follows each run, so
# a failed backup or a verification mismatch is alerted at once, not at the next
# 5-minute round (the round alerts only on a change of state).
HEALTH_AFTER = {"backup", "verify", "cert_renew"}

RUNS_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    job       TEXT PRIMARY KEY,
    cron      TEXT NOT NULL,
    next_run  REAL
);
CREATE TABLE IF NOT EXISTS scheduler_runs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    job      TEXT NOT NULL,
    op       TEXT NOT NULL,
    started  REAL NOT NULL,
    seconds  REAL NOT NULL,
    outcome  TEXT NOT NULL,
    message  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS scheduler_runs_job ON scheduler_runs (job, id);
"""
KEEP_RUNS = 200
JOB_WAIT = 6 * 3600  # longest wait for a background job (backup) started by a scheduled run
NOT_AVAILABLE = "not available yet: this version has no '{op}' operation"

_ctx: Context | None = None
_scheduler: Any = None
_running: set[str] = set()
_running_lock = threading.Lock()
_started = threading.Event()  # set once start() finished (or failed)
_start_error: str | None = None


class CronError(MailsteadError, ValueError):
    code = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message, field="cron")


_DOW = {"0": "sun", "1": "mon", "2": "tue", "3": "wed", "4": "thu", "5": "fri", "6": "sat", "7": "sun"}


def _cron_dow(field: str) -> str:
    """Cron's day of week (0 and 7 = Sunday) in APScheduler's terms (names; its numbers start at Monday)."""
    out = []
    for part in field.split(","):
        rng, slash, step = part.partition("/")
        ends = rng.split("-")
        if len(ends) > 2:
            raise CronError(f"day of week '{part[:20]}' is not a day, a range (mon-fri) or a list")
        names = [_DOW.get(e, e) for e in ends]
        if len(names) == 2 and names[1] == "sun" and names[0] != "sun":
            raise CronError(f"day of week '{part[:20]}': a range cannot end on Sunday; "
                            "write it as two parts, e.g. 5-6,0")
        out.append("-".join(names) + (slash + step if slash else ""))
    return ",".join(out)


def parse_cron(text: str, timezone: Any = None) -> Any:
    """A CronTrigger for crontab `text`; raises CronError saying what is wrong."""
    from apscheduler.triggers.cron import CronTrigger

    if not isinstance(text, str) or len(text) > 200:
        raise CronError("give a crontab schedule of at most 200 characters, e.g. '0 3 * * *'")
    fields = text.split()
    if len(fields) not in (5, 6):
        raise CronError(f"a schedule has 5 fields (minute hour day-of-month month day-of-week), "
                        f"e.g. '0 3 * * *' for 03:00 daily; got {len(fields)}")
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, dow = fields
    try:
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_cron_dow(dow), timezone=timezone)
    except CronError:
        raise
    except ValueError as exc:
        raise CronError(f"'{text[:60]}' is not a valid schedule ({exc}); e.g. '0 3 * * *' for 03:00 "
                        "daily or '*/5 * * * *' for every 5 minutes") from None


# -- runs ------------------------------------------------------------------------------

def _db(state_dir: Path) -> sqlite3.Connection:
    from portal.core import store

    conn = store.connect(state_dir)
    conn.executescript(RUNS_SCHEMA)
    return conn


# -- schedules (plain data: job, crontab text, next fire time) -------------------------

def stored_schedules(state_dir: Path) -> dict[str, tuple[str, float | None]]:
    """{job: (cron, next_run epoch or None)} for the known jobs whose stored cron parses."""
    conn = _db(state_dir)
    try:
        rows = conn.execute("SELECT job, cron, next_run FROM schedules").fetchall()
    finally:
        conn.close()
    out = {}
    for row in rows:
        if row["job"] not in JOBS:
            continue
        try:
            parse_cron(row["cron"])
        except CronError:
            log.warning("ignoring the stored schedule of %s: not a valid crontab text", row["job"])
            continue
        nxt = row["next_run"]
        out[row["job"]] = (row["cron"], float(nxt) if isinstance(nxt, (int, float)) else None)
    return out


def store_schedule(state_dir: Path, job: str, cron: str | None = None, next_run: Any = None) -> None:
    """Store a job's schedule (when `cron` is given) and its next fire time."""
    when = next_run.timestamp() if next_run is not None else None
    conn = _db(state_dir)
    try:
        with conn:
            if cron is not None:
                conn.execute("INSERT INTO schedules (job, cron, next_run) VALUES (?, ?, ?) "
                             "ON CONFLICT(job) DO UPDATE SET cron = excluded.cron, next_run = excluded.next_run",
                             (job, cron, when))
            else:
                conn.execute("UPDATE schedules SET next_run = ? WHERE job = ?", (when, job))
    finally:
        conn.close()


def record_run(state_dir: Path, job: str, op: str, started: float, seconds: float, outcome: str,
               message: str) -> None:
    conn = _db(state_dir)
    try:
        with conn:
            conn.execute("INSERT INTO scheduler_runs (job, op, started, seconds, outcome, message) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (job, op, started, round(seconds, 3), outcome, message[:500]))
            conn.execute("DELETE FROM scheduler_runs WHERE job = ? AND id NOT IN "
                         "(SELECT id FROM scheduler_runs WHERE job = ? ORDER BY id DESC LIMIT ?)",
                         (job, job, KEEP_RUNS))
    finally:
        conn.close()


def runs(state_dir: Path, job: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    conn = _db(state_dir)
    try:
        if job:
            rows = conn.execute("SELECT * FROM scheduler_runs WHERE job = ? ORDER BY id DESC LIMIT ?",
                                (job, limit)).fetchall()
        else:
            rows = conn.execute("SELECT * FROM scheduler_runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    finally:
        conn.close()
    return [{k: row[k] for k in ("job", "op", "started", "seconds", "outcome", "message")} for row in rows]


# -- the job function ------------------------------------------------------------------

def _call(ctx: Context, name: str, args: Mapping[str, Any]) -> tuple[str, str]:
    """Run operation `name` (a job operation as a background job); (outcome, message)."""
    from portal.agent import jobs

    op = REGISTRY.get(name)
    if op is None:
        return "skipped", NOT_AVAILABLE.format(op=name)
    if op.job:  # as a background job: progress and result kept (jobs.py)
        job = op.start(ctx, **args)
        deadline = time.monotonic() + JOB_WAIT
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.25)
            job = jobs.status(ctx, job["id"])
        if job["state"] == "done":
            return "ok", f"job {job['id']}"
        return "failed", f"job {job['id']} {job['state']}: {job.get('error') or 'still running'}"
    return "ok", _summary(op.run(ctx, **args))


def _summary(result: Any) -> str:
    """A run's result in one line: its message (when it has one), then its short values."""
    if isinstance(result, dict):
        keys = ", ".join(f"{k}={result[k]}" for k in sorted(result) if k != "message"
                         and isinstance(result[k], (bool, int, float, str)) and len(str(result[k])) < 40)
        message = " ".join(str(result.get("message") or "").split())[:200]
        return "; ".join(t for t in (message, keys) if t)[:300]
    return ""


def run_operation(name: str, args: Mapping[str, Any] | None = None, job: str = "") -> dict[str, Any]:
    """The scheduled jobs' one line: run agent operation `name` and record the run.
    Never raises (a failed run is recorded and must not stop the scheduler)."""
    ctx = _ctx or Context()
    job = job or name
    with _running_lock:
        if job in _running:  # max_instances=1 covers the scheduler; this also covers "run now"
            busy = True
        else:
            busy = False
            _running.add(job)
    started, t0 = time.time(), time.monotonic()
    if busy:
        outcome, message = "skipped", "the previous run is still going"
    else:
        try:
            outcome, message = _call(ctx, name, args or {})
        except OpError as err:
            outcome, message = "failed", f"{err.code}: {err.message}"
        except Exception as err:  # noqa: BLE001 - recorded; the traceback goes to the agent log
            log.exception("scheduled job %s (%s) failed", job, name)
            outcome, message = "failed", f"{type(err).__name__}: see the agent log (journalctl -u mailstead-agent)"
        finally:
            with _running_lock:
                _running.discard(job)
    seconds = time.monotonic() - t0
    try:
        record_run(ctx.state_dir, job, name, started, seconds, outcome, message)
    except sqlite3.Error as err:
        log.error("could not record the run of %s: %s", job, err)
    log.info("job=%s op=%s outcome=%s seconds=%.1f", job, name, outcome, seconds)
    if job in HEALTH_AFTER and not busy and "health_run" in REGISTRY:
        try:
            REGISTRY["health_run"].run(ctx)
        except Exception:  # noqa: BLE001 - the 5-minute round tries again
            log.exception("the health round after %s failed", job)
    return {"job": job, "outcome": outcome, "message": message, "seconds": round(seconds, 3)}


# -- the scheduler ---------------------------------------------------------------------

def _cron_text(trigger: Any) -> str:
    fields = {f.name: str(f) for f in trigger.fields}
    dow = fields["day_of_week"]
    text = " ".join([fields["minute"], fields["hour"], fields["day"], fields["month"], dow])
    return text if fields["second"] == "0" else f"{fields['second']} {text}"


def owner_timezone(state_dir: Path) -> Any:
    """The setting time_zone as a ZoneInfo; None (the appliance's local time) when unset
    or unknown to this system."""
    import zoneinfo

    from portal.core.store import read_settings

    name = read_settings(state_dir).get("time_zone", "").strip()
    try:
        return zoneinfo.ZoneInfo(name) if name else None
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        log.warning("the time zone %r is not known here: using the appliance's local time", name[:40])
        return None


def _add(scheduler: Any, job: str, cron: str, replace: bool, next_run_time: Any = None) -> None:
    spec = JOBS[job]
    extra = {"next_run_time": next_run_time} if next_run_time is not None else {}
    tz = owner_timezone(_ctx.state_dir) if _ctx is not None else None
    scheduler.add_job(run_operation, trigger=parse_cron(cron, tz), id=job, name=spec.title,
                      args=[spec.op, {}], kwargs={"job": job}, coalesce=True,
                      misfire_grace_time=spec.grace, max_instances=1, replace_existing=replace, **extra)


def make_scheduler() -> Any:
    from apscheduler.schedulers.background import BackgroundScheduler

    # The default job store is APScheduler's MemoryJobStore: nothing is pickled.
    return BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1},
                               executors={"default": {"type": "threadpool", "max_workers": 4}})


def _remember_next_run(event: Any) -> None:
    """After each run: store the job's next fire time (what a restart catches up from)."""
    scheduler, ctx = _scheduler, _ctx
    if scheduler is None or ctx is None or event.job_id not in JOBS:
        return
    job = scheduler.get_job(event.job_id)
    try:
        store_schedule(ctx.state_dir, event.job_id, next_run=job.next_run_time if job else None)
    except sqlite3.Error as err:
        log.error("could not store the next run of %s: %s", event.job_id, err)


def start(ctx: Context) -> Any:
    """Start the scheduler in this process (the agent's main()): each job on its stored
    schedule (the default if none is stored). A job whose stored next fire time passed
    while the agent was down runs once now, if that time is within its grace time."""
    global _ctx, _scheduler
    from datetime import datetime

    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED

    _ctx = ctx
    scheduler = make_scheduler()
    scheduler.start(paused=True)
    stored = stored_schedules(ctx.state_dir)
    now = time.time()
    for job, spec in JOBS.items():
        cron, next_run = stored.get(job, (spec.cron, None))
        catch_up = None
        if next_run is not None and next_run <= now and now - next_run <= spec.grace:
            catch_up = datetime.now().astimezone()
            log.info("job %s missed its run at %s: running it once now", job,
                     datetime.fromtimestamp(next_run).astimezone().isoformat(timespec="seconds"))
        _add(scheduler, job, cron, replace=False, next_run_time=catch_up)
        if job not in stored or catch_up is None:
            store_schedule(ctx.state_dir, job, cron, scheduler.get_job(job).next_run_time)
    scheduler.add_listener(_remember_next_run, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    _scheduler = scheduler
    scheduler.resume()
    _started.set()
    log.info("scheduler started: %s", ", ".join(f"{j.id}@{j.next_run_time:%Y-%m-%d %H:%M}"
                                                 for j in scheduler.get_jobs() if j.next_run_time))
    return scheduler


def start_in_background(ctx: Context) -> threading.Thread:
    """start(ctx) in a thread: the agent serves operations while APScheduler loads."""
    global _start_error

    def run() -> None:
        global _start_error
        try:
            start(ctx)
        except Exception as exc:  # noqa: BLE001 - the agent keeps serving; schedule_* say why
            log.exception("the scheduler did not start")
            _start_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        finally:
            _started.set()

    _started.clear()
    _start_error = None
    thread = threading.Thread(target=run, name="scheduler-start", daemon=True)
    thread.start()
    return thread


def shutdown() -> None:
    global _scheduler
    if _scheduler is not None:
        _scheduler.shutdown(wait=False)
        _scheduler = None


def _need_scheduler() -> Any:
    _started.wait(15)  # the agent just started: the scheduler is on its way
    if _start_error:
        raise OpError("unavailable", f"the scheduler could not start ({_start_error}); see the agent log "
                                     "(journalctl -u mailstead-agent) and restart mailstead-agent")
    if _scheduler is None:
        raise OpError("unavailable", "the scheduler is not running in this agent; restart mailstead-agent")
    return _scheduler


def _check_job(job: str) -> str:
    if job not in JOBS:
        raise OpError("invalid", f"unknown job '{job[:40]}'; choose one of {', '.join(JOBS)}", "job")
    return job


def schedule_of(job: str) -> dict[str, Any]:
    """A job's schedule and next run, for other areas' pages (None values when the
    scheduler is not running)."""
    scheduler = _scheduler
    j = scheduler.get_job(_check_job(job)) if scheduler is not None else None
    return {"job": job, "cron": _cron_text(j.trigger) if j else None, "default_cron": JOBS[job].cron,
            "timezone": str(j.trigger.timezone) if j else None,
            "next_run": j.next_run_time.isoformat(timespec="seconds") if j and j.next_run_time else None}


def set_schedule(ctx: Context, job: str, cron: str) -> dict[str, Any]:
    """Change a job's schedule (checked crontab text) and store it."""
    try:
        parse_cron(cron)
    except CronError as err:
        raise OpError("invalid", f"{err.message}", "cron") from None
    scheduler = _need_scheduler()
    _add(scheduler, _check_job(job), cron, replace=True)
    j = scheduler.get_job(job)
    store_schedule(ctx.state_dir, job, cron, j.next_run_time)
    return schedule_of(job)


def reschedule(ctx: Context) -> None:
    """Every job again on its schedule, in the time zone now set."""
    scheduler = _need_scheduler()
    stored = stored_schedules(ctx.state_dir)
    for job, spec in JOBS.items():
        cron = stored.get(job, (spec.cron, None))[0]
        _add(scheduler, job, cron, replace=True)
        store_schedule(ctx.state_dir, job, cron, scheduler.get_job(job).next_run_time)


# -- operations ------------------------------------------------------------------------

@privileged(web=True, timeout=20.0)
def schedule_list(ctx: Context) -> dict[str, Any]:
    """Each job: its schedule (crontab text), the next run and the last run's outcome."""
    scheduler = _need_scheduler()
    last = {}
    for job in JOBS:
        recent = runs(ctx.state_dir, job, 1)
        last[job] = recent[0] if recent else None
    out = []
    for job, spec in JOBS.items():
        j = scheduler.get_job(job)
        out.append({"job": job, "title": spec.title, "operation": spec.op,
                    "cron": _cron_text(j.trigger) if j else None, "default_cron": spec.cron,
                    "next_run": j.next_run_time.isoformat(timespec="seconds") if j and j.next_run_time else None,
                    "misfire_grace_seconds": spec.grace, "last_run": last[job]})
    return {"jobs": out}


@privileged(web=True, timeout=20.0)
def schedule_set(ctx: Context, job: str, cron: str) -> dict[str, Any]:
    """Change a job's schedule (crontab text; 'default' restores the default)."""
    _check_job(job)
    text = JOBS[job].cron if cron.strip() == "default" else cron.strip()
    out = set_schedule(ctx, job, text)
    return {"job": job, "cron": out["cron"], "next_run": out["next_run"]}


@privileged(web=True, timeout=10.0)
def schedule_runs(ctx: Context, job: str = "", limit: int = 20) -> dict[str, Any]:
    """The latest runs (newest first) of one job, or of all jobs when `job` is empty."""
    if job:
        _check_job(job)
    if not 1 <= limit <= KEEP_RUNS:
        raise OpError("invalid", f"give a number from 1 to {KEEP_RUNS}", "limit")
    return {"runs": runs(ctx.state_dir, job or None, limit)}


@privileged(web=True, timeout=120.0)
def schedule_run_now(ctx: Context, job: str) -> dict[str, Any]:
    """Run a job now, outside its schedule (recorded like a scheduled run)."""
    _check_job(job)
    return run_operation(JOBS[job].op, {}, job=job)
