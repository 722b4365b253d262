"""Background jobs in the agent: progress recorded, failures kept, a dead agent's job is 'interrupted'."""

from __future__ import annotations

import json
import threading

import pytest

from portal.agent import jobs
from portal.agent.registry import REGISTRY, Context, OpError, privileged
from tests.conftest import retry


@pytest.fixture
def ctx(tmp_path):
    return Context(state_dir=tmp_path)


def declare_job(monkeypatch, name, func):
    """A job operation declared the way the real ones are (in the real registry for this test)."""
    op = privileged(func, job=True, web=True, name=name, registry={})
    monkeypatch.setitem(REGISTRY, name, op)
    return op


@pytest.fixture
def kinds(monkeypatch):
    gate = threading.Event()

    def slow(ctx, progress):
        progress("one", "first")
        gate.wait(10)
        progress("two", "second")
        return {"answer": 42}

    def broken(ctx, progress):
        progress("try", "about to fail")
        raise OpError("deploy_failed", "dovecot: port 993 is taken")

    def crash(ctx, progress):
        raise RuntimeError("secret-detail-not-for-users")

    declare_job(monkeypatch, "t_slow", slow)
    declare_job(monkeypatch, "t_broken", broken)
    declare_job(monkeypatch, "t_crash", crash)
    return gate


def op(ctx, name, **args):
    """As the agent's server runs a call: a job operation starts its job."""
    return REGISTRY[name].invoke(ctx, args)


def finished(ctx, job_id):
    def done():
        job = op(ctx, "job_status", job_id=job_id)
        assert job["state"] != "running", job
        return job
    return retry(done, 10, f"job {job_id} to finish")


def test_progress_and_result(ctx, kinds):
    job = op(ctx, "t_slow")
    assert job["state"] == "running"
    again = op(ctx, "t_slow")
    assert again["id"] == job["id"]  # one job of a kind at a time
    retry(lambda: op(ctx, "job_status", job_id=job["id"])["events"] or (_ for _ in ()).throw(AssertionError()),
          5, "first progress event")
    kinds.set()
    done = finished(ctx, job["id"])
    assert done["state"] == "done" and done["result"] == {"answer": 42}
    assert [e["step"] for e in done["events"]] == ["one", "two"]
    assert op(ctx, "job_latest", kind="t_slow")["job"]["id"] == job["id"]
    assert "agent" not in done


def test_failures_are_recorded_in_plain_words(ctx, kinds):
    failed = finished(ctx, op(ctx, "t_broken")["id"])
    assert failed["state"] == "failed" and failed["error"] == "dovecot: port 993 is taken"
    crashed = finished(ctx, op(ctx, "t_crash")["id"])
    assert crashed["state"] == "failed" and "agent log" in crashed["error"]
    assert "secret-detail" not in json.dumps(crashed)


def test_a_dead_agents_job_is_interrupted(ctx, kinds):
    folder = ctx.state_dir / "jobs"
    folder.mkdir(exist_ok=True)
    (folder / "20260101000000000000-t_slow-deadbeef.json").write_text(json.dumps(
        {"id": "20260101000000000000-t_slow-deadbeef", "kind": "t_slow", "state": "running", "agent": "999-0",
         "started": 0, "finished": None, "events": [], "result": None, "error": None}))
    job = op(ctx, "job_latest", kind="t_slow")["job"]
    assert job["state"] == "interrupted" and "safe to repeat" in job["error"]


@pytest.mark.parametrize("name, args, field", [("job_latest", {"kind": "rm -rf /"}, "kind"),
                                               ("job_latest", {"kind": "status"}, "kind"),
                                               ("job_status", {"job_id": "../x"}, "job_id")])
def test_bad_arguments_name_the_field(ctx, name, args, field):
    with pytest.raises(OpError) as err:
        op(ctx, name, **args)
    assert err.value.field == field


def test_the_real_jobs_are_declared_jobs():
    from portal.agent.registry import load_all

    load_all()
    assert {"stack_deploy", "cert_issue", "dns_check", "backup_run", "setup_deploy"} <= set(jobs.kinds())
    assert all(load_all()[k].job for k in jobs.kinds())


def test_latest_is_the_last_started_even_within_one_second(tmp_path):
    """Two jobs of a kind started in the same second: job_latest is the second one
    (ids sorted by name once tied on the second, by their random suffix)."""
    import threading

    from portal.agent import jobs
    from portal.agent.registry import Context

    ctx = Context(state_dir=tmp_path / "state")
    gate = threading.Event()
    REGISTRY["t_same_second"] = privileged(lambda ctx, progress: gate.wait(5) and {}, job=True,
                                           name="t_same_second", registry={})
    try:
        started = []
        for _ in range(20):  # many pairs: a tie broken by the random suffix would lose about half
            first = jobs.start(ctx, "t_same_second")
            gate.set()
            while jobs.status(ctx, first["id"])["state"] == "running":
                pass
            gate.clear()
            second = jobs.start(ctx, "t_same_second")
            gate.set()
            while jobs.status(ctx, second["id"])["state"] == "running":
                pass
            gate.clear()
            started.append((second["id"], jobs.latest(ctx, "t_same_second")["id"]))
        assert all(a == b for a, b in started), started
    finally:
        del REGISTRY["t_same_second"]
