"""The maintenance scheduler: cron parsing, recorded runs, and a real agent process
whose jobs persist across a restart and whose missed runs coalesce into one."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time

import pytest

from portal.agent import scheduler
from portal.agent import registry as ops
from portal.agent.client import AgentClient, AgentError
from tests.conftest import retry


# -- cron text -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0 3 * * *", "*/5 * * * *", "17 5,17 * * *", "30 4 * * 0", "0 9 * * mon-fri",
                                  "0 0 1 */2 *", "*/10 * * * * *"])
def test_valid_schedules_parse(text):
    assert scheduler.parse_cron(text).get_next_fire_time(None, dt.datetime.now(dt.timezone.utc))


@pytest.mark.parametrize("text, words", [
    ("", "5 fields"), ("0 3 * *", "got 4"), ("61 * * * *", "not a valid schedule"),
    ("0 25 * * *", "not a valid schedule"), ("0 3 * * funday", "not a valid schedule"),
    ("0 3 32 * *", "not a valid schedule"), ("x" * 300, "at most 200"), ("0 3 * * 5-7", "cannot end on Sunday"),
])
def test_bad_schedules_name_the_field_and_give_an_example(text, words):
    with pytest.raises(scheduler.CronError) as err:
        scheduler.parse_cron(text)
    assert str(err.value).startswith("cron: ") and words in str(err.value)


@pytest.mark.parametrize("dow, weekday", [("0", 6), ("7", 6), ("1", 0), ("6", 5), ("sun", 6)])
def test_day_of_week_numbers_follow_cron_not_apscheduler(dow, weekday):
    """cron's 0 (and 7) is Sunday; APScheduler's own 0 is Monday. A weekly job set
    for Sunday must not run on Monday."""
    trigger = scheduler.parse_cron(f"30 4 * * {dow}", timezone=dt.timezone.utc)
    fire = trigger.get_next_fire_time(None, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert fire.weekday() == weekday and (fire.hour, fire.minute) == (4, 30)


def test_default_schedules_are_those_of_the_issue():
    assert {j: s.cron for j, s in scheduler.JOBS.items()} == {
        "backup": "0 3 * * *", "verify": "30 4 * * 0", "cert_renew": "17 5,17 * * *",
        "health": "*/5 * * * *", "dns_check": "40 6 * * *", "update": "0 4 * * *"}
    for spec in scheduler.JOBS.values():
        scheduler.parse_cron(spec.cron)
        assert 0 < spec.grace


# -- runs -------------------------------------------------------------------------------

@pytest.fixture
def in_process(tmp_path, monkeypatch):
    ctx = ops.Context(docker=ops.docker_factory(f"unix://{tmp_path}/none.sock"), state_dir=tmp_path / "state")
    monkeypatch.setattr(scheduler, "_ctx", ctx)
    monkeypatch.setattr(scheduler, "HEALTH_AFTER", set())  # no real health round after these fakes
    return ctx


def test_a_backup_or_verify_run_is_followed_by_a_health_round(in_process, monkeypatch):
    """So a failed backup or a verification mismatch is alerted at once (the round
    alerts on a change of state), not up to 5 minutes later."""
    rounds = []
    registry = dict(ops.REGISTRY)
    ops.privileged(name="t_fail", registry=registry)(lambda ctx: (_ for _ in ()).throw(ops.OpError("failed", "target: down")))
    ops.privileged(name="health_run", registry=registry)(lambda ctx: rounds.append(ctx) or {"summary": {}})
    monkeypatch.setattr(scheduler, "REGISTRY", registry)
    monkeypatch.setattr(scheduler, "HEALTH_AFTER", {"backup", "verify", "cert_renew"})
    assert scheduler.run_operation("t_fail", {}, job="verify")["outcome"] == "failed"
    assert rounds == [in_process]
    scheduler.run_operation("t_fail", {}, job="backup")
    scheduler.run_operation("t_fail", {}, job="dns_check")  # its result is checked by the next round
    assert len(rounds) == 2


def test_missing_operation_is_recorded_as_not_available_yet(in_process):
    out = scheduler.run_operation("no_such_op_yet", {}, job="update")
    assert out["outcome"] == "skipped" and "not available yet" in out["message"]
    (run,) = scheduler.runs(in_process.state_dir, "update")
    assert run["outcome"] == "skipped" and run["op"] == "no_such_op_yet" and run["seconds"] >= 0


def test_each_run_records_outcome_and_duration(in_process, monkeypatch):
    calls = []

    def slow_ok(ctx):
        calls.append(ctx)
        time.sleep(0.2)
        return {"renewed": False}

    def broken(ctx):
        raise ops.OpError("invalid", "domain: is not set yet")

    registry = dict(ops.REGISTRY)
    ops.privileged(name="t_ok", registry=registry)(slow_ok)
    ops.privileged(name="t_fail", registry=registry)(broken)
    monkeypatch.setattr(scheduler, "REGISTRY", registry)
    assert scheduler.run_operation("t_ok", {}, job="cert_renew")["outcome"] == "ok"
    assert scheduler.run_operation("t_fail", {}, job="cert_renew")["outcome"] == "failed"
    newest, oldest = scheduler.runs(in_process.state_dir, "cert_renew")
    assert (oldest["outcome"], newest["outcome"]) == ("ok", "failed")
    assert oldest["seconds"] >= 0.2 and "renewed=False" in oldest["message"]
    assert newest["message"] == "invalid: domain: is not set yet"
    assert calls == [in_process]


def test_unexpected_exceptions_are_recorded_not_raised(in_process, monkeypatch):
    registry = dict(ops.REGISTRY)
    ops.privileged(name="t_bug", registry=registry)(lambda ctx: 1 / 0)
    monkeypatch.setattr(scheduler, "REGISTRY", registry)
    out = scheduler.run_operation("t_bug", {}, job="health")
    assert out["outcome"] == "failed" and out["message"].startswith("ZeroDivisionError")


def test_a_job_already_running_is_not_run_twice(in_process, monkeypatch):
    import threading

    gate = threading.Event()
    registry = dict(ops.REGISTRY)
    ops.privileged(name="t_wait", registry=registry)(lambda ctx: {"waited": gate.wait(5)})
    monkeypatch.setattr(scheduler, "REGISTRY", registry)
    first = threading.Thread(target=scheduler.run_operation, args=("t_wait", {}), kwargs={"job": "backup"})
    first.start()
    retry(lambda: (_ for _ in ()).throw(AssertionError("not yet")) if "backup" not in scheduler._running else None,
          5, "the first run to start")
    assert scheduler.run_operation("t_wait", {}, job="backup")["outcome"] == "skipped"
    gate.set()
    first.join()
    assert [r["outcome"] for r in scheduler.runs(in_process.state_dir, "backup")] == ["ok", "skipped"]


def test_runs_table_is_bounded(in_process, monkeypatch):
    monkeypatch.setattr(scheduler, "KEEP_RUNS", 5)
    for _ in range(12):
        scheduler.run_operation("no_such_op_yet", {}, job="verify")
    scheduler.run_operation("no_such_op_yet", {}, job="backup")
    conn = sqlite3.connect(in_process.state_dir / "state.db")
    counts = dict(conn.execute("SELECT job, COUNT(*) FROM scheduler_runs GROUP BY job").fetchall())
    conn.close()
    assert counts == {"verify": 5, "backup": 1}


# -- a real agent -------------------------------------------------------------------------

def agent_env(state):
    return {"MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_SCHEDULER": "1"}


def test_jobs_persist_across_an_agent_restart(start_agent, tmp_path):
    state = tmp_path / "state"
    agent = start_agent(env=agent_env(state))
    client = AgentClient(str(agent.socket))
    listed = {j["job"]: j for j in client.call("schedule_list")["jobs"]}
    assert set(listed) == set(scheduler.JOBS)
    assert listed["backup"]["cron"] == "0 3 * * *" and listed["backup"]["next_run"]
    assert listed["health"]["cron"] == "*/5 * * * *"
    changed = client.call("schedule_set", job="backup", cron="15 2 * * *")
    assert changed["cron"] == "15 2 * * *" and "T02:15:00" in changed["next_run"]
    assert agent.stop() == 0

    again = start_agent(env=agent_env(state))
    client = AgentClient(str(again.socket))
    listed = {j["job"]: j for j in client.call("schedule_list")["jobs"]}
    assert listed["backup"]["cron"] == "15 2 * * *"  # the owner's schedule, not the default
    assert listed["verify"]["cron"] == "30 4 * * sun" and listed["cert_renew"]["cron"] == "17 5,17 * * *"
    # The schedules are plain data in state.db (job, crontab text, next run): nothing pickled.
    conn = sqlite3.connect(state / "state.db")
    rows = dict(conn.execute("SELECT job, cron FROM schedules").fetchall())
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert rows["backup"] == "15 2 * * *" and set(rows) == set(scheduler.JOBS)
    assert "scheduler_jobs" not in tables
    assert client.call("schedule_set", job="backup", cron="default")["cron"] == "0 3 * * *"
    # The daily update window is the update_window operation (no feed is set here: nothing to install).
    ran = client.call("schedule_run_now", job="update")
    assert ran["outcome"] == "ok" and "no update feed is set" in ran["message"], ran
    assert client.call("schedule_runs", job="update")["runs"][0]["outcome"] == "ok"
    assert len(client.call("schedule_list")["jobs"]) == len(scheduler.JOBS)


@pytest.mark.parametrize("job, cron, words", [
    ("backup", "61 3 * * *", "cron: '61 3 * * *' is not a valid schedule"),
    ("backup", "every day", "cron: a schedule has 5 fields"),
    ("nightly", "0 3 * * *", "job: unknown job 'nightly'"),
])
def test_bad_schedule_is_refused_naming_the_field(start_agent, tmp_path, job, cron, words):
    agent = start_agent(env=agent_env(tmp_path / "state"))
    client = AgentClient(str(agent.socket))
    with pytest.raises(AgentError) as err:
        client.call("schedule_set", job=job, cron=cron)
    assert err.value.code == "invalid" and str(err.value).startswith(words), str(err.value)
    assert {j["job"]: j["cron"] for j in client.call("schedule_list")["jobs"]}["backup"] == "0 3 * * *"


def test_schedule_runs_validates_its_arguments(start_agent, tmp_path):
    client = AgentClient(str(start_agent(env=agent_env(tmp_path / "state")).socket))
    with pytest.raises(AgentError, match="limit: give a number"):
        client.call("schedule_runs", job="backup", limit=0)
    assert client.call("schedule_runs", job="backup") == {"runs": []}


def test_missed_runs_coalesce_into_one_after_a_restart(start_agent, tmp_path):
    """Four fire times pass while the agent is down; back up, it runs the job once."""
    state = tmp_path / "state"
    agent = start_agent(env=agent_env(state))
    client = AgentClient(str(agent.socket))
    client.call("schedule_list")  # the scheduler is up
    now = dt.datetime.now()  # the scheduler's zone is the local one
    if now.second > 38:  # keep the four fire times inside one minute
        time.sleep(61 - now.second)
        now = dt.datetime.now()
    first = now.second + 6  # time enough to stop the agent before the first
    seconds = ",".join(str(first + 2 * i) for i in range(4))
    client.call("schedule_set", job="dns_check", cron=f"{seconds} {now.minute} {now.hour} * * *")
    assert agent.stop() == 0
    assert client_runs(state) == []  # stopped before the first fire time
    last_fire = now.replace(second=first + 6, microsecond=0)
    time.sleep(max(0.0, (last_fire - dt.datetime.now()).total_seconds()) + 1.5)

    again = start_agent(env=agent_env(state))
    client = AgentClient(str(again.socket))
    retry(lambda: _assert(len(client_runs(state)) >= 1), 20, "the missed run")
    time.sleep(3)  # any further catch-up run would show by now
    runs = client.call("schedule_runs", job="dns_check")["runs"]
    assert len(runs) == 1, runs
    # dns_check ran for real (a background job) and failed: no domain in this state.db.
    assert runs[0]["outcome"] == "failed" and "domain" in runs[0]["message"]
    nxt = {j["job"]: j for j in client.call("schedule_list")["jobs"]}["dns_check"]["next_run"]
    assert nxt and dt.datetime.fromisoformat(nxt).date() > now.date()  # next: tomorrow's window


def client_runs(state):
    if not (state / "state.db").exists():
        return []
    return scheduler.runs(state, "dns_check")


def _assert(cond):
    assert cond
