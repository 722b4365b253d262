"""Health checks against a real mail stack on the host's docker engine: all green
when it runs, a stopped container detected at the next round (one alert, by
webhook and by mail once postfix is back), green again after it is started."""

from __future__ import annotations

import email
import imaplib
import json
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import appdb as db
from portal.agent import registry as ops
from portal.checks import privileged as agentops, load_all
from portal.checks.env import CheckEnv
from portal.stack.accounts import Accounts
from portal.stack.deploy import service_states
from portal.stack.dovecot_keys import DovecotKeys
from tests.conftest import retry
from tests.unit.checks_support import HookServer, serving

from .stackharness import DOMAIN, Stack, start_stack

PROJECT, PORT_BASE = "mstest-i6a", 31000
ADMIN, PASSWORD = f"admin@{DOMAIN}", "checks-correct-horse-battery"
STACK_CHECKS = ["containers", "ports", "tls", "queue"]


def appliance_settings(stack: Stack, **extra: str) -> None:
    """The harness's stack as the appliance's state.db describes it (what the checks read)."""
    s = stack.settings
    db.write_settings(s.state_dir / "state.db", {
        "domain": s.domain, "mail_host": s.hostname, "publish_addresses": ",".join(s.publish_addresses),
        "stack_ports": json.dumps(s.ports), "stack_project": s.project, "stack_subnet": s.subnet, "tls_cert": str(s.tls_cert),
        "tls_key": str(s.tls_key), "admin_address": ADMIN, **extra})


def check_env(stack: Stack) -> CheckEnv:
    ctx = ops.Context(docker=ops.docker_factory("unix:///var/run/docker.sock"), state_dir=stack.settings.state_dir)
    return CheckEnv(ctx)


def make_stack(state: Path, project: str = PROJECT, port_base: int = PORT_BASE) -> Stack:
    return start_stack(state, project, port_base)  # loads (or builds) the images


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = make_stack(tmp_path_factory.mktemp("checks"))
    try:
        s.deploy()
        Accounts(s.settings.accounts_db).create_mailbox(ADMIN, PASSWORD, keys=DovecotKeys(s.client, s.settings.project))
        yield s
    finally:
        s.down()


def health(stack: Stack) -> dict[str, Any]:
    env = check_env(stack)
    return agentops.health_round(env.ctx, env=env, only=STACK_CHECKS)


def statuses(out: dict[str, Any]) -> dict[str, str]:
    return {r["id"]: r["status"] for r in out["results"]}


def all_healthy(stack: Stack) -> None:
    bad = {s: f"{st.status}/{st.health}" for s, st in service_states(stack.client, PROJECT).items() if not st.ok}
    assert not bad, f"not healthy: {bad}"


def admin_headers(stack: Stack) -> list[email.message.Message]:
    """The headers of every message in the admin's INBOX."""
    ctx = ssl.create_default_context(cafile=str(stack.settings.cert_path))
    ctx.check_hostname = False
    with imaplib.IMAP4_SSL("127.0.0.1", stack.port("imaps"), ssl_context=ctx) as imap:
        imap.login(ADMIN, PASSWORD)
        imap.select("INBOX", readonly=True)
        _typ, data = imap.search(None, "ALL")
        found = []
        for num in data[0].split():
            _typ, msg = imap.fetch(num, "(BODY.PEEK[HEADER])")
            found.append(email.message_from_bytes(msg[0][1]))
        return found


def test_checks_see_a_running_stack_then_a_stopped_container(stack: Stack) -> None:
    load_all()
    with serving(HookServer()) as hook:
        appliance_settings(stack, alert_webhook_url=f"http://127.0.0.1:{hook.port}/alerts",
                           alert_webhook_private="1")  # the receiver is on loopback: allowed for the test
        first = health(stack)
        assert statuses(first) == {c: "ok" for c in STACK_CHECKS}, first["results"]
        assert first["changes"] == [] and hook.posts == []
        assert first["seconds"] < 5, first["seconds"]

        stack.container("postfix").stop(timeout=10)
        try:
            down = health(stack)
            got = {r["id"]: r for r in down["results"]}
            assert got["containers"]["status"] == "fail" and "postfix is exited" in got["containers"]["message"]
            assert got["ports"]["status"] == "fail" and f"smtp (127.0.0.1:{stack.port('smtp')})" in got["ports"]["message"]
            assert got["queue"]["status"] == "fail"
            assert {c["id"] for c in down["changes"]} == {"containers", "ports", "queue"}
            assert down["alerts"]["webhook"] == "sent (HTTP 204)" and len(hook.posts) == 1
            assert down["alerts"]["mail"].startswith("failed:")  # postfix itself is down: said, not raised
            assert health(stack)["changes"] == [] and len(hook.posts) == 1  # still down: no new alert
        finally:
            stack.container("postfix").start()
        retry(lambda: all_healthy(stack), 120, "postfix healthy again")

        back = health(stack)
        assert statuses(back) == {c: "ok" for c in STACK_CHECKS}, back["results"]
        assert back["alerts"] == {"mail": f"sent to {ADMIN}", "webhook": "sent (HTTP 204)"}
        assert len(hook.posts) == 2 and {c["new"] for c in hook.posts[1]["json"]["changes"]} == {"ok"}

    def arrived() -> email.message.Message:
        found = [m for m in admin_headers(stack) if "RESOLVED" in m["Subject"] and "containers ok" in m["Subject"]]
        assert found, [m["Subject"] for m in admin_headers(stack)]
        return found[-1]
    alert = retry(arrived, 60, "the recovery alert in the admin's INBOX")
    # Handed to postfix inside the stack, not sent to port 25 from docker's gateway: signed
    # with the domain's keys, and scanned as local mail rather than scored as a stranger's.
    tags = [dict(t.strip().split("=", 1) for t in "".join(v.split()).split(";") if "=" in t)
            for v in alert.get_all("DKIM-Signature", [])]
    signed = sorted(f"{t['d']} {t['a']}" for t in tags)
    assert signed == [f"{DOMAIN} ed25519-sha256", f"{DOMAIN} rsa-sha256"], alert.items()
    assert alert["X-Spam"] is None, alert.items()  # (and so in the INBOX, not filed into Junk)


def test_queue_counts_messages_postfix_holds(stack: Stack) -> None:
    from portal.checks import run_one

    load_all()
    appliance_settings(stack)
    env = check_env(stack)
    assert run_one("queue", env).message.startswith("0 message(s) queued")
    # A message for a domain whose servers do not answer (the test's knot refuses
    # every zone but its own, so the stack's resolver says SERVFAIL) stays in the
    # queue, deferred. (`.invalid` would bounce at once: unbound says NXDOMAIN.)
    stack.exec("postfix", "sh", "-c", "printf 'Subject: stuck\\n\\nstuck\\n' | "
                                      "sendmail -f root@example.test someone@nowhere.example")
    try:
        def queued() -> None:
            r = run_one("queue", CheckEnv(env.ctx, queue_warn=1, queue_fail=5))
            assert r.status == "warn" and r.message.startswith("1 message(s) queued"), r
        retry(queued, 60, "the message in postfix's queue")
        r = run_one("queue", CheckEnv(env.ctx, queue_warn=1, queue_fail=1))
        assert r.status == "fail" and "postqueue -p" in r.fix
    finally:
        stack.exec("postfix", "postsuper", "-d", "ALL")


def test_the_scheduled_health_job_in_a_real_agent_sees_a_stopped_container(stack: Stack, tmp_path: Path) -> None:
    """The agent's own scheduler runs health_run: a stopped container shows at its next
    run, and several runs in the same state make one webhook alert, not one per run."""
    from portal.agent.client import AgentClient
    from tests.conftest import launch_agent

    load_all()
    with serving(HookServer()) as hook:
        appliance_settings(stack, alert_webhook_url=f"http://127.0.0.1:{hook.port}/alerts",
                           alert_webhook_private="1")  # the receiver is on loopback: allowed for the test
        state = stack.settings.state_dir
        agent = launch_agent(tmp_path, "--docker-host", "unix:///var/run/docker.sock",
                             env={"MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_SCHEDULER": "1"})
        try:
            client = AgentClient(str(agent.socket), timeout=30)
            client.call("schedule_set", job="health", cron="*/2 * * * * *")

            def containers_now(status: str, after: float) -> None:
                rows = client.call("health_history", check="containers", limit=1)["history"]
                assert rows and rows[0]["at"] > after and rows[0]["status"] == status, rows

            t0 = time.time()
            retry(lambda: containers_now("ok", t0), 30, "a scheduled round with the stack up")
            posts_before = len(hook.posts)
            stack.container("dovecot").stop(timeout=10)
            try:
                t1 = time.time()
                retry(lambda: containers_now("fail", t1), 30, "the scheduled round that sees dovecot stopped")

                def rounds_since(after: float, at_least: int) -> bool:
                    rows = client.call("health_history", check="containers", limit=50)["history"]
                    assert len([r for r in rows if r["at"] > after]) >= at_least, rows
                    return True

                retry(lambda: rounds_since(t1, 3), 30, "two more scheduled rounds in the same state")
                down = [p for p in hook.posts[posts_before:]
                        if any(c["id"] == "containers" and c["new"] == "fail" for c in p["json"]["changes"])]
                assert len(down) == 1, hook.posts
                rounds = [r for r in client.call("health_history", check="containers", limit=50)["history"]
                          if r["at"] > t1]
                assert len(rounds) >= 2 and all(r["status"] == "fail" for r in rounds)
                assert "dovecot is exited" in rounds[0]["message"]
                runs = client.call("schedule_runs", job="health", limit=5)["runs"]
                assert runs and all(r["outcome"] == "ok" for r in runs), runs
            finally:
                stack.container("dovecot").start()
            retry(lambda: all_healthy(stack), 120, "dovecot healthy again")
            client.call("schedule_set", job="health", cron="default")
        finally:
            agent.stop()
