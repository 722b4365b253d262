"""Each health check's verdicts on real inputs (listening and closed ports, certificates
made here, files, thresholds), the bounded history, and exactly one alert per change of
state through a local SMTP sink and a local webhook receiver."""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import ExitStack

import pytest

from portal import checks
from portal.agent import jobs, registry as ops
from portal.checks import CheckResult, history
from portal.checks import privileged as agentops
from portal.checks.env import CheckEnv
from tests.conftest import free_port
from tests.support.feeds import publish, serve
from tests.support.smtp import SmtpSink, send_to_smtp_port

from .checks_support import HookServer, make_cert, serving, write_settings

checks.load_all()
DOMAIN, HOST = "example.test", "mail.example.test"


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state"
    path.mkdir()
    return path


def env_for(state, **kw):
    ctx = ops.Context(docker=ops.docker_factory(f"unix://{state}/no-docker.sock"), state_dir=state,
                      update_dir=state.parent / "update", send_mail=send_to_smtp_port)
    return CheckEnv(ctx, **kw)


def run(check_id, state, **kw):
    result = checks.run_one(check_id, env_for(state, **kw))
    assert result.id == check_id and result.status in ("ok", "warn", "fail")
    if result.status != "ok":
        assert result.fix or "unknown" in result.message, result  # every problem says what to do
    return result


def set_up(state, ports=None, **extra):
    ports = ports or {name: free_port() for name in ("smtp", "submissions", "submission", "imaps", "pop3s", "dav")}
    write_settings(state, domain=DOMAIN, mail_host=HOST, publish_addresses="127.0.0.1", stack_ports=ports, **extra)
    return ports


def test_check_result_refuses_an_unknown_status():
    with pytest.raises(ValueError, match="status must be one of"):
        CheckResult("x", "bad", "m", "f")


def test_every_check_is_registered_with_a_title():
    assert list(checks.CHECKS) == ["disk", "memory", "backup", "verify", "updates",
                                   "containers", "ports", "tls", "dns", "dnsbl", "queue", "upgrade"]


def test_before_setup_the_stack_checks_say_so(state):
    for cid in ("containers", "ports", "tls", "queue"):
        r = run(cid, state)
        assert r.status == "warn" and "setup is not finished" in r.message and "domain" in r.message


# -- ports ------------------------------------------------------------------------------------

def test_ports_listening_and_closed(state):
    ports = set_up(state)
    with ExitStack() as stack:
        for port in ports.values():
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", port))
            s.listen()
        r = run("ports", state)
        assert r.status == "ok" and "6 ports listening" in r.message
        closed = free_port()
        set_up(state, {**ports, "imaps": closed})
        r = run("ports", state)
        assert r.status == "fail" and f"imaps (127.0.0.1:{closed})" in r.message and "smtp" not in r.message


# -- TLS -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, setup_done, status, words", [
    ({"days": 60}, True, "ok", "valid for mail.example.test"),
    ({"days": 10}, True, "warn", "expires in"),
    ({"days": 5, "start_days": -10}, True, "fail", "expired on"),
    ({"days": 60, "start_days": 2}, True, "fail", "not valid before"),
    ({"days": 60, "self_signed": True}, True, "warn", "self-signed"),
    ({"days": 60, "self_signed": True}, False, "ok", "valid for"),  # the bootstrap certificate during setup
    ({"days": 60, "names": ["other.example.test"]}, True, "fail", "not for mail.example.test"),
    ({"days": 60, "names": ["*.example.test"]}, True, "ok", "valid for *.example.test"),
])
def test_tls_certificate_verdicts(state, tmp_path, kw, setup_done, status, words):
    names = kw.pop("names", [HOST, f"mta-sts.{DOMAIN}"])
    cert, key = make_cert(tmp_path / "tls", names, **kw)
    set_up(state, tls_cert=str(cert), tls_key=str(key), setup_complete="1" if setup_done else "0")
    r = run("tls", state)
    assert (r.status, words in r.message) == (status, True), r


def test_tls_missing_certificate_fails(state, tmp_path):
    set_up(state, tls_cert=str(tmp_path / "nope.pem"), tls_key=str(tmp_path / "nope.key"))
    r = run("tls", state)
    assert r.status == "fail" and "no readable certificate" in r.message and "cert-issue" in r.fix


# -- disk, memory ----------------------------------------------------------------------------------

def test_disk_thresholds(state):
    import shutil

    usage = shutil.disk_usage(state)
    pct = 100 * usage.free / usage.total
    assert run("disk", state, disk_min_free_percent=0, disk_min_free_bytes=0).status == "ok"
    r = run("disk", state, disk_min_free_percent=pct + 1, disk_min_free_bytes=usage.free + 2 ** 30)
    assert r.status == "warn" and "getting full" in r.message
    r = run("disk", state, disk_min_free_percent=2 * pct + 10, disk_min_free_bytes=2 * usage.free + 2 ** 31)
    assert r.status == "fail" and "almost full" in r.message
    # Either threshold alone is not enough to warn (a big disk at 9 % still has room).
    assert run("disk", state, disk_min_free_percent=pct + 1, disk_min_free_bytes=0).status == "ok"


@pytest.mark.parametrize("avail_kb, status", [(8_000_000, "ok"), (1_500_000, "warn"), (300_000, "fail")])
def test_memory_thresholds(state, tmp_path, avail_kb, status):
    info = tmp_path / "meminfo"
    info.write_text(f"MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:   {avail_kb} kB\n")
    assert run("memory", state, meminfo=info).status == status
    assert run("memory", state, meminfo=tmp_path / "missing").status == "warn"


# -- backups -------------------------------------------------------------------------------------------

def write_backup_state(state, **parts):
    (state / "backup-state.json").write_text(json.dumps(parts))


def test_backup_and_verification_outcomes(state):
    assert run("backup", state).status == "warn" and "no backup has run yet" in run("backup", state).message
    now = time.time()
    write_backup_state(state, last_backup={"at": now - 3600, "ok": True, "error": None},
                       last_verify={"at": "2026-01-01T00:00:00+00:00", "ok": False,
                                    "error": "3 messages differ from the manifest"})
    assert run("backup", state).status == "ok"
    r = run("verify", state)
    assert r.status == "fail" and "3 messages differ" in r.message
    write_backup_state(state, last_backup={"at": now - 50 * 3600, "ok": True, "error": None})
    r = run("backup", state)
    assert r.status == "warn" and "50 days" not in r.message and "2 days ago" in r.message
    write_backup_state(state, last_backup={"at": now - 60, "ok": False, "error": "sftp: connection refused"})
    r = run("backup", state)
    assert r.status == "fail" and "sftp: connection refused" in r.message
    (state / "backup-state.json").write_text("{not json")
    assert run("backup", state).status == "fail"


# -- updates ----------------------------------------------------------------------------------

def test_updates_warn_without_a_feed_then_on_a_feed_unreadable_for_days(state, tmp_path, feed_key):
    from portal.core import store
    from portal.update import privileged as upd

    r = run("updates", state)
    assert r.status == "warn" and "no update feed is set" in r.message and "Updates page" in r.fix
    port = free_port()  # nothing listens there
    store.write_settings(state, {"update_feed_url": f"http://127.0.0.1:{port}/feed/"})
    ctx = env_for(state).ctx
    ctx.update_keyring = feed_key
    out = upd.check_feed(ctx)
    assert not out["ok"] and out["failing_since"] == out["at"]
    r = checks.run_one("updates", CheckEnv(ctx))
    assert r.status == "ok" and "could not be read" in r.message and "retried daily" in r.message
    # Still failing 4 days later (the first failure's time is kept across checks).
    doc = json.loads((state / upd.CHECK_FILE).read_text())
    doc["failing_since"] = "2026-01-01T00:00:00+00:00"
    (state / upd.CHECK_FILE).write_text(json.dumps(doc))
    assert upd.check_feed(ctx)["failing_since"] == "2026-01-01T00:00:00+00:00"
    r = checks.run_one("updates", CheckEnv(ctx))
    assert r.status == "warn" and "since 2026-01-01" in r.message and r.fix


def test_updates_warn_when_the_running_version_is_a_month_behind(state, tmp_path, feed_key):
    from portal.core import store
    from portal.update import privileged as upd

    os_release = tmp_path / "os-release"
    os_release.write_text('IMAGE_VERSION="0.2.0"\n')
    built = time.time() - 40 * 86400
    os.utime(os_release, (built, built))
    with serve(tmp_path / "www") as url:
        store.write_settings(state, {"update_feed_url": url})
        ctx = env_for(state).ctx
        ctx.update_keyring, ctx.os_release, ctx.update_dir = feed_key, os_release, tmp_path / "update"
        now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        publish(tmp_path / "www" / "feed", ["0.3.0"], feed_key.parent,
                {"version": "0.3.0", "built": now, "notes": [], "slot_bytes": 1})
        assert upd.check_feed(ctx)["available"]
        r = checks.run_one("updates", CheckEnv(ctx))
        assert r.status == "warn" and "0.2.0 is 40 days older than 0.3.0" in r.message
        # Built this week: only "available".
        os.utime(os_release, (time.time() - 86400, time.time() - 86400))
        r = checks.run_one("updates", CheckEnv(ctx))
        assert r.status == "ok" and "0.3.0 is available" in r.message
        # The last update was rolled back: said until the next one, not warned (it sent its own alert).
        from portal.update import state as upd_state
        ctx.update_dir.mkdir()
        upd_state.add_history(ctx.update_dir, "rolled_back", **{"from": "0.2.0", "to": "0.2.1", "by": "health",
                                                                "message": "0.2.1 did not come up healthy"})
        r = checks.run_one("updates", CheckEnv(ctx))
        assert r.status == "ok" and "0.2.1 was rolled back" in r.message


# -- DNS drift (the latest dns_check job) ----------------------------------------------------------------

def write_dns_job(state, job_state, result=None, error=None, age=0.0):
    folder = state / "jobs"
    folder.mkdir(exist_ok=True)
    started = time.time() - age
    job_id = f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(started))}-dns_check-0000{int(age) % 10000:04d}"
    (folder / f"{job_id}.json").write_text(json.dumps({
        "id": job_id, "kind": "dns_check", "state": job_state, "agent": jobs._BOOT, "started": started,
        "finished": started + 1, "events": [], "result": result, "error": error}))


def test_dns_drift_from_the_latest_check(state):
    r = run("dns", state)
    assert r.status == "warn" and "not been checked" in r.message
    write_dns_job(state, "done", {"required_ok": True, "results": [
        {"name": "example.test", "type": "MX", "verdict": "ok", "required": True}]}, age=3600 * 60)
    assert run("dns", state).status == "warn"  # too old
    write_dns_job(state, "done", {"required_ok": False, "results": [
        {"name": "example.test", "type": "MX", "verdict": "wrong", "required": True},
        {"name": "_dmarc.example.test", "type": "TXT", "verdict": "missing", "required": False}]}, age=60)
    r = run("dns", state)
    assert r.status == "fail" and "example.test MX (wrong)" in r.message and "_dmarc" not in r.message
    write_dns_job(state, "failed", error="no authoritative server answered", age=30)
    assert "no authoritative server answered" in run("dns", state).message
    write_dns_job(state, "done", {"required_ok": True, "results": []}, age=10)
    assert run("dns", state).status == "ok"


# -- containers and queue without docker -----------------------------------------------------------------

def test_containers_and_queue_when_docker_is_down(state):
    set_up(state)
    for cid in ("containers", "queue"):
        r = run(cid, state)
        assert r.status == "fail" and "docker" in r.message and "systemctl start docker" in r.fix


def test_a_check_that_raises_is_a_failed_check(state, monkeypatch):
    monkeypatch.setitem(checks.CHECKS, "boom", ("Boom", lambda env: 1 / 0))
    r = checks.run_one("boom", env_for(state))
    assert r.status == "fail" and "ZeroDivisionError" in r.message


def test_a_hung_check_is_reported_within_the_round_timeout(state, monkeypatch):
    monkeypatch.setitem(checks.CHECKS, "slow", ("Slow", lambda env: time.sleep(3) or CheckResult("slow", "ok", "")))
    t0 = time.monotonic()
    (r,) = checks.run_all(env_for(state), only=["slow"], timeout=0.5)
    assert time.monotonic() - t0 < 2 and r.status == "fail" and "no answer within 0.5 s" in r.message


# -- history and alerts ---------------------------------------------------------------------------------------

def test_history_is_bounded_per_check(state, monkeypatch):
    monkeypatch.setattr(history, "KEEP", 3)
    for i in range(7):
        history.record(state, [CheckResult("disk", "ok", f"round {i}"), CheckResult("memory", "ok", "m")])
    rows = history.history(state, "disk", 100)
    assert [r["message"] for r in rows] == ["round 6", "round 5", "round 4"]
    assert len(history.history(state, "memory", 100)) == 3


def test_history_keeps_the_fix_and_upgrades_an_older_table(state):
    """The dashboard shows each check's latest fix from the history; a table made
    before the fix column existed gets it (its old rows with an empty fix)."""
    import sqlite3

    with sqlite3.connect(state / "state.db") as c:
        c.execute("CREATE TABLE health_history (id INTEGER PRIMARY KEY AUTOINCREMENT, check_id TEXT NOT NULL, "
                  "at REAL NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL)")
        c.execute("INSERT INTO health_history (check_id, at, status, message) VALUES ('disk', 1, 'ok', 'old')")
    history.record(state, [CheckResult("disk", "warn", "low", "delete old files")])
    assert [(r["message"], r["fix"]) for r in history.history(state, "disk", 10)] == [
        ("low", "delete old files"), ("old", "")]


@pytest.fixture
def alerting(state):
    with serving(SmtpSink()) as sink, serving(HookServer()) as hook:
        set_up(state, {"smtp": sink.port}, admin_address=f"admin@{DOMAIN}",
               alert_webhook_url=f"http://127.0.0.1:{hook.port}/hooks/secret-token",
               alert_webhook_private="1")  # the receiver is on loopback: allowed here, refused by default
        low_memory(state, False)
        yield sink, hook


def low_memory(state, low: bool) -> None:
    """The fault the alert tests flip: the memory check reads <state>/meminfo (for
    /proc/meminfo), 8 % available (a warning) or 50 %."""
    available = 80_000 if low else 500_000
    (state / "meminfo").write_text(f"MemTotal: 1000000 kB\nMemAvailable: {available} kB\n")


def health(state):
    env = env_for(state, meminfo=state / "meminfo")
    return agentops.health_round(env.ctx, env=env, only=["memory", "disk"])


def test_exactly_one_alert_per_change_of_state(state, alerting):
    sink, hook = alerting
    first = health(state)
    assert first["changes"] == [] and sink.messages == [] and hook.posts == []  # all ok, nothing to say

    low_memory(state, True)
    out = health(state)
    assert [c["id"] for c in out["changes"]] == ["memory"] and out["alerts"]["mail"] == f"sent to admin@{DOMAIN}"
    assert out["alerts"]["webhook"] == "sent (HTTP 204)"
    for _ in range(3):  # still the same state: no more alerts
        assert health(state)["changes"] == []
    assert len(sink.messages) == 1 and len(hook.posts) == 1
    mail = sink.messages[0]
    assert mail["to"] == [f"admin@{DOMAIN}"] and mail["from"] == f"mailstead@{DOMAIN}"
    assert mail["message"]["Subject"] == f"[Mailstead {HOST}] WARNING: memory warn"
    body = mail["message"].get_payload(decode=True).decode()
    assert "memory: ok -> warn" in body and "What to do: restart the stack (mailstead deploy)" in body
    post = hook.posts[0]
    assert post["path"] == "/hooks/secret-token" and post["type"] == "application/json"
    assert post["json"]["changes"][0] == {"id": "memory", "old": "ok", "new": "warn",
                                          "message": "memory is low: 0.1 GiB available of 1.0 GiB (8 %)",
                                          "fix": "restart the stack (mailstead deploy) or give the machine more "
                                                 "memory; see `docker stats`"}

    low_memory(state, False)
    out = health(state)
    assert [(c["old"], c["new"]) for c in out["changes"]] == [("warn", "ok")]
    assert len(sink.messages) == 2 and "RESOLVED" in sink.messages[1]["message"]["Subject"]
    assert len(hook.posts) == 2
    timeline = [r["status"] for r in history.history(state, "memory", 100)]
    assert timeline == ["ok", "warn", "warn", "warn", "warn", "ok"]


def test_a_failing_webhook_or_mail_is_reported_never_raised_nor_leaks_the_url(state, alerting, caplog):
    sink, hook = alerting
    hook.answer = 500
    low_memory(state, True)
    out = health(state)
    assert out["alerts"] == {"mail": f"sent to admin@{DOMAIN}", "webhook": "failed: HTTP 500"}
    port = free_port()
    set_up(state, {"smtp": free_port()}, alert_webhook_url=f"http://127.0.0.1:{port}/hooks/secret-token",
           alert_webhook_private="1")
    low_memory(state, False)
    out = health(state)
    assert out["alerts"]["mail"].startswith("failed: 127.0.0.1:") and "refused" in out["alerts"]["mail"].lower()
    assert out["alerts"]["webhook"] == f"failed: cannot connect to 127.0.0.1 port {port} (Connection refused)"
    assert "secret-token" not in json.dumps(out) and "secret-token" not in caplog.text


# -- the webhook: no redirects, no private targets unless allowed, resolved once ---------------

def test_a_webhook_redirect_is_not_followed_and_names_where_it_led(state, alerting):
    """A receiver that answers 302 towards an internal address: reported as a failure
    naming the Location's host; nothing is sent there (urllib would follow it as a GET)."""
    sink, hook = alerting
    with serving(HookServer()) as internal:
        hook.answer, hook.location = 302, f"http://localhost:{internal.port}/internal/admin?x=1"
        low_memory(state, True)
        out = health(state)
    assert out["alerts"]["webhook"] == ("failed: HTTP 302: 127.0.0.1 redirects to localhost, and redirects are "
                                        "not followed; give the URL it redirects to")
    assert len(hook.posts) == 1 and internal.posts == [] and internal.gets == []


@pytest.fixture
def fake_dns(monkeypatch):
    """hooks.example.test resolves to 127.0.0.1 (a name whose DNS points at this machine,
    as an attacker's would); every lookup of it is counted."""
    real = socket.getaddrinfo
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "hooks.example.test":
            asked.append(host)
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_webhook_name_that_resolves_to_loopback_is_refused_unless_the_owner_allows_it(
        state, tmp_path, monkeypatch, fake_dns):
    cert, key = make_cert(tmp_path / "hook-tls", ["hooks.example.test"], self_signed=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the receiver's certificate is trusted: only the address is wrong
    with serving(SmtpSink()) as sink, serving(HookServer(tls=(cert, key))) as hook:
        url = f"https://hooks.example.test:{hook.port}/hooks/secret-token"
        set_up(state, {"smtp": sink.port}, admin_address=f"admin@{DOMAIN}", alert_webhook_url=url)
        low_memory(state, True)
        out = health(state)
        assert hook.posts == [], "the webhook reached an address on this machine"
        assert out["alerts"]["webhook"] == (
            "failed: hooks.example.test resolves to 127.0.0.1, a loopback address; only public addresses are "
            "reached unless the owner allows private ones (as root: mailstead alerts-private on)")

        ops.REGISTRY["alerts_private"].run_checked(env_for(state).ctx, {"allow": True})
        fake_dns.clear()
        low_memory(state, False)
        out = health(state)
        assert out["alerts"]["webhook"] == "sent (HTTP 204)"
        assert fake_dns == ["hooks.example.test"]  # resolved once; the connection went to that address
        assert hook.posts[0]["host"] == f"hooks.example.test:{hook.port}"  # TLS and Host: the name, not the address


@pytest.mark.parametrize("url, kind", [
    ("http://127.0.0.1:8080/x", "loopback"), ("http://localhost/x", "loopback"), ("https://10.1.2.3/x", "private"),
    ("https://[fe80::1]/x", "link-local"), ("https://169.254.169.254/latest", "link-local"),
    ("https://[::ffff:192.168.1.1]/x", "private"), ("https://0.0.0.0/x", "unspecified"),
    ("https://240.0.0.1/x", "reserved"), ("https://100.64.0.1/x", "non-public"),
])
def test_configuring_a_webhook_at_a_private_address_is_refused_unless_allowed(state, url, kind):
    ctx = env_for(state).ctx
    set_up(state)
    with pytest.raises(ops.OpError) as err:
        ops.REGISTRY["alerts_configure"].run_checked(ctx, {"webhook_url": url})
    assert err.value.field == "alert_webhook_url" and f"names a {kind} address" in err.value.message
    assert "mailstead alerts-private on" in err.value.message
    assert ops.REGISTRY["alerts_private"].run_checked(ctx, {"allow": True}) == {"allow_private": True}
    assert ops.REGISTRY["alerts_configure"].run_checked(ctx, {"webhook_url": url})["webhook"] is True
    ops.REGISTRY["alerts_private"].run_checked(ctx, {"allow": False})
    with pytest.raises(ops.OpError):
        ops.REGISTRY["alerts_configure"].run_checked(ctx, {"webhook_url": url})


def test_no_admin_address_is_said(state):
    set_up(state)
    low_memory(state, True)
    out = health(state)
    assert out["alerts"]["mail"].startswith("not sent: admin_address is not set")
    assert out["alerts"]["webhook"] == "not configured"


def test_first_round_failure_alerts_first_round_success_does_not(state):
    changes = history.record(state, [CheckResult("disk", "ok", "fine"), CheckResult("tls", "fail", "expired")])
    assert [c["id"] for c in changes] == ["tls"]


def test_health_operations_through_a_real_agent(start_agent, tmp_path):
    from portal.agent.client import AgentClient, AgentError

    st = tmp_path / "st"
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(st)})
    client = AgentClient(str(agent.socket), timeout=60)
    out = client.call("health_run", alert=False)
    assert [r["id"] for r in out["results"]] == list(checks.CHECKS)
    assert out["summary"]["status"] in ("warn", "fail") and out["alerts"] == {"mail": "off", "webhook": "off"}
    hist = client.call("health_history", check="disk", limit=5)
    assert len(hist["history"]) == 1 and hist["checks"]["disk"] == "Free disk space"
    with pytest.raises(AgentError, match="check: unknown check 'nope'"):
        client.call("health_history", check="nope")
    assert os.path.exists(st / "state.db")


@pytest.mark.parametrize("args, words", [
    ({"webhook_url": "ftp://hooks.example.com/x"}, "alert_webhook_url: must start with https://"),
    ({"webhook_url": "http://hooks.example.com/x"}, "alert_webhook_url: must use https://"),
    ({"webhook_url": "https://a b"}, "alert_webhook_url: must be one URL without spaces"),
    ({"webhook_url": "https:///nohost"}, "alert_webhook_url: must start with https:// and name a host"),
    ({"dnsbl_zones": "zen.spamhaus.org,not a zone"}, "dnsbl_zones: 'not a zone' is not a DNS zone"),
    ({"dnsbl_zones": "localhost"}, "dnsbl_zones: 'localhost' is not a DNS zone"),
    ({"dnsbl_zones": ",".join(f"z{i}.example" for i in range(11))}, "dnsbl_zones: give at most 10"),
])
def test_alert_settings_are_checked_naming_the_field(state, args, words):
    ctx = env_for(state).ctx
    with pytest.raises(ops.OpError) as err:
        ops.REGISTRY["alerts_configure"].run_checked(ctx, args)
    assert err.value.code == "invalid" and str(err.value).startswith(words), str(err.value)
    from tests.support.statedb import read_settings as read_settings_table

    assert "alert_webhook_url" not in read_settings_table(state / "state.db")  # nothing stored


def test_alert_settings_stored_and_a_test_alert_sent(state, alerting):
    sink, hook = alerting
    ctx = env_for(state).ctx
    out = ops.REGISTRY["alerts_configure"].run_checked(ctx, {"webhook_url": f"http://127.0.0.1:{hook.port}/t",
                                                 "dnsbl_zones": "Zen.Spamhaus.org., bl.spamcop.net,zen.spamhaus.org"})
    assert out == {"webhook": True, "dnsbl_zones": ["zen.spamhaus.org", "bl.spamcop.net"]}
    sent = ops.REGISTRY["alerts_test"].run_checked(ctx, {})
    assert sent == {"mail": f"sent to admin@{DOMAIN}", "webhook": "sent (HTTP 204)"}
    assert len(sink.messages) == 1 and hook.posts[0]["path"] == "/t"
    assert ops.REGISTRY["alerts_configure"].run_checked(ctx, {})["dnsbl_zones"][0] == "zen.spamhaus.org"  # defaults
