"""CSRF tokens and sessions across the whole portal, with a real agent:
- every POST endpoint refuses a missing token, a token from another session and a
  replayed token after a state change (the portal rotates it), and stores nothing;
- expired sessions: the setup session's lifetime, the admin session's idle and
  absolute timeouts, and a setup session once setup is finished;
- direct GET and POST requests to a later wizard step (or any of its sub-pages)
  before the earlier steps are done go to the first unfinished step and store nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from portal.web import auth, wizard
from tests.unit.conftest import https_client, unlock
from tests.unit.test_fuzz_forms import ACME, ADMIN, BASE_SETTINGS, DNS_PUSH, FORMS, Rig, csrf_of, step_order
from tests.support.admin import sign_in

MESSAGE = "The form expired or was submitted twice"


def post_rules(app: Flask, prefix: str) -> list[str]:
    """Every POST URL under `prefix` (a concrete kind for the jobs routes)."""
    out = []
    for rule in app.url_map.iter_rules():
        if "POST" in (rule.methods or ()) and rule.rule.startswith(prefix):
            out.append(rule.rule.replace("<kind>", "dns_check").replace("<job>", "backup"))
    return sorted(out)


STATE_PREFIXES = {"at:deploy": ("/setup", "/jobs"), "dashboard": ("/admin", "/logout", "/jobs"),
                  "login": ("/login",), "token": ("/setup/token",)}


OWN_PAGE = {"at:deploy": "/setup/deploy", "dashboard": "/admin/mailboxes/", "login": "/login",
            "token": "/setup/token"}


def refused(response: Any) -> None:
    assert response.status_code == 400 and MESSAGE in response.text, (response.status_code, response.text[:500])


@pytest.mark.parametrize("state", sorted(STATE_PREFIXES))
def test_every_post_without_a_token_is_refused_and_stores_nothing(rig: Callable[..., Rig], state: str) -> None:
    r = rig(state)
    urls = [u for p in STATE_PREFIXES[state] for u in post_rules(r.app, p)]
    assert urls
    before = r.stored()
    for url in urls:
        refused(r.client.post(url, data={"domain": "attacker.example", "address": ADMIN, "to": ADMIN}))
        refused(r.client.post(url, data={"csrf_token": ""}))
    assert r.stored() == before


@pytest.mark.parametrize("state", sorted(STATE_PREFIXES))
def test_a_token_from_another_session_is_refused(rig: Callable[..., Rig], state: str) -> None:
    r = rig(state)
    other = https_client(r.app)  # the same appliance, another browser
    if state == "dashboard":
        sign_in(other, ADMIN)
    elif state.startswith("at:"):
        assert unlock(other).status_code == 302
    stolen = csrf_of(other.get(OWN_PAGE[state]).text)
    assert stolen
    urls = [u for p in STATE_PREFIXES[state] for u in post_rules(r.app, p)]
    before = r.stored()
    for url in urls:
        prefixes = {"", "create-", "reset-", "quota-", "alias-", "unalias-", "delete-", "backup-"}
        refused(r.client.post(url, data={f"{p}csrf_token": stolen for p in prefixes}))
    assert r.stored() == before


# A state change, then the same request again with the old token.
REPLAYS = [
    ("at:domain", "/setup/domain", "/setup/domain", {**BASE_SETTINGS, "domain": "example.net",
                                                     "mail_host": "mail.example.net"}, {"domain": "attacker.example",
                                                                                        "mail_host": ""}),
    ("at:dns", "/setup/dns", "/setup/dns/push-config", DNS_PUSH, {"rfc2136_server": "198.51.100.66"}),
    ("at:dns", "/setup/dns", "/setup/dns", {"accept_problems": "y", "dns_continue": "Continue"}, {}),
    ("at:certs", "/setup/certs", "/setup/certs/settings", ACME, {"acme_contact": "evil@attacker.example"}),
    ("at:certs", "/setup/certs", "/setup/certs", {"accept_self_signed": "y", "continue_self_signed": "Continue"}, {}),
    ("dashboard", "/admin/mailboxes/", "/admin/mailboxes/alias",
     {"alias-source": f"info@{BASE_SETTINGS['domain']}", "alias-destination": "a@elsewhere.example"},
     {"alias-source": f"sales@{BASE_SETTINGS['domain']}"}),
    ("dashboard", "/admin/mailboxes/", "/admin/mailboxes/quota",
     {"quota-address": f"bob@{BASE_SETTINGS['domain']}", "quota-quota_mb": "2048"}, {"quota-quota_mb": "1"}),
    ("dashboard", "/admin/dns", "/admin/dns/push-config", DNS_PUSH, {"rfc2136_key_name": "attacker"}),
    ("dashboard", "/admin/certs", "/admin/certs/settings", ACME, {"acme_challenge": "dns-01"}),
    ("dashboard", "/admin/health/", "/admin/health/alerts",
     {"alert_webhook_url": "https://hooks.example.com/a", "dnsbl_zones": "zen.spamhaus.org"},
     {"alert_webhook_url": "https://attacker.example/x"}),
    ("maintenance", "/admin/schedules/", "/admin/schedules/update", {"update-cron": "0 1 1 1 *"},
     {"update-cron": "* * * * *"}),
    ("maintenance", "/admin/updates/", "/admin/updates/settings",
     {"auto": "y", "window_hour": "5", "time_zone": "", "feed_url": ""}, {"window_hour": "6"}),
]


@pytest.mark.parametrize(("state", "page", "action", "data", "change"), REPLAYS,
                         ids=[f"{s} {a}" for s, _p, a, _d, _c in REPLAYS])
def test_a_replayed_token_after_a_state_change_is_refused(rig: Callable[..., Rig], state: str, page: str,
                                                          action: str, data: dict[str, str],
                                                          change: dict[str, str]) -> None:
    r = rig(state)
    token = csrf_of(r.client.get(page).text)
    names = {"csrf_token"} | {k.split("-")[0] + "-csrf_token" for k in data if "-" in k}
    first = r.client.post(action, data={**data, **{n: token for n in names}})
    assert first.status_code == 303, (first.status_code, first.text[:3000])
    after = r.stored()
    replay = {**data, **change, **{n: token for n in names}}
    refused(r.client.post(action, data=replay))
    r.client.get(page)  # a fresh form exists now: the old token still fails
    refused(r.client.post(action, data=replay))
    assert r.stored() == after


def test_replayed_login_and_logout(rig: Callable[..., Rig]) -> None:
    r = rig("login")
    assert r.totp is not None
    token = csrf_of(r.client.get("/login").text)
    form = {"csrf_token": token, "address": ADMIN, "password": "correct horse battery staple", "code": r.totp.at(time.time() + 30)}
    # (the next time step's code: admin_setup has just spent the current one)
    assert r.client.post("/login", data=form).status_code == 303
    home = r.client.get("/admin/")
    logout_token = csrf_of(home.text)
    refused(r.client.post("/login", data=form))  # the pre-login token is dead
    assert r.client.post("/logout", data={"csrf_token": logout_token}).status_code == 303
    assert r.client.get("/admin/").status_code == 302  # signed out
    refused(r.client.post("/logout", data={"csrf_token": logout_token}))


# -- expired sessions --------------------------------------------------------------------------

def test_setup_session_expires_with_its_lifetime(rig: Callable[..., Rig]) -> None:
    r = rig("at:domain", PERMANENT_SESSION_LIFETIME=1)
    page = r.client.get("/setup/domain")
    assert page.status_code == 200
    before = r.stored()
    time.sleep(2.2)  # (signatures carry whole seconds: age >= 2 > 1)
    assert r.client.get("/setup/domain").headers["Location"] == "/setup/token"
    response = r.client.post("/setup/domain", data={**BASE_SETTINGS, "domain": "example.net",
                                                    "csrf_token": csrf_of(page.text)})
    assert response.status_code in (303, 400)  # the old form's token went with the session
    assert r.stored() == before


@pytest.mark.parametrize(("seen_ago", "auth_ago", "words"), [
    (auth.IDLE_TIMEOUT + 5, auth.IDLE_TIMEOUT + 5, "15 minutes without activity"),
    (10, auth.ABSOLUTE_TIMEOUT + 5, "after 8 hours"),
])
def test_expired_admin_session_stores_nothing(rig: Callable[..., Rig], seen_ago: float, auth_ago: float,
                                              words: str) -> None:
    r = rig("dashboard")
    page = r.client.get("/admin/mailboxes/")
    token = csrf_of(page.text)
    before = r.stored()
    with r.client.session_transaction() as s:
        s["seen"] = time.time() - seen_ago
        s["auth_at"] = time.time() - auth_ago
    response = r.client.post("/admin/mailboxes/quota", data={"quota-csrf_token": token, "quota-quota_mb": "1",
                                                             "quota-address": f"bob@{BASE_SETTINGS['domain']}"})
    assert response.status_code == 303 and response.headers["Location"].startswith("/login")
    login = r.client.get(response.headers["Location"])
    assert words in login.text
    assert r.client.get("/admin/mailboxes/").headers["Location"].startswith("/login")  # the session is gone
    assert r.stored() == before


def test_setup_session_after_setup_is_finished(rig: Callable[..., Rig]) -> None:
    """An unlocked wizard tab left open while setup was finished elsewhere."""
    r = rig("at:domain")
    token = csrf_of(r.client.get("/setup/domain").text)
    r2 = rig("dashboard")  # same state dir: setup now complete
    assert r2.client.get("/admin/").status_code in (200, 409)
    before = r.stored()
    for path in ("/setup/domain", "/setup/admin", "/setup/deploy", "/setup/restore", "/setup/restore/done", "/",
                 "/admin/", "/admin/mailboxes/"):
        response = r.client.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith("/login"), path
    response = r.client.post("/setup/domain", data={**BASE_SETTINGS, "domain": "attacker.example",
                                                    "csrf_token": token})
    assert response.status_code in (303, 400)
    assert "finished" in r.client.get("/setup/token").text.lower()
    assert r.stored() == before


# -- later steps before earlier ones --------------------------------------------------------------

def later_urls(app: Flask, after: int) -> list[tuple[str, str]]:
    """(method, url) of every page of the steps ordered after `after`."""
    blueprints = {s.endpoint.partition(".")[0]: s.order for s in wizard.all_steps()}
    out = []
    for rule in app.url_map.iter_rules():
        bp = rule.endpoint.partition(".")[0]
        if blueprints.get(bp, 0) > after:
            for method in sorted((rule.methods or set()) & {"GET", "POST"}):
                out.append((method, rule.rule))
    return sorted(out)


@pytest.mark.parametrize("current", ["domain", "admin", "dns", "certs"])
def test_later_steps_go_to_the_first_unfinished_step(rig: Callable[..., Rig], current: str) -> None:
    r = rig(f"at:{current}")
    first = next(s for s in wizard.all_steps() if s.id == current)
    target = f"/setup/{current}"
    token = csrf_of(r.client.get(target).text)
    before = r.stored()
    urls = later_urls(r.app, step_order(current))
    assert len(urls) >= 5
    for method, url in urls:
        if method == "GET":
            response = r.client.get(url)
        else:
            response = r.client.post(url, data={"csrf_token": token, "accept_problems": "y",
                                                "accept_self_signed": "y", "continue_self_signed": "Continue",
                                                "to": ADMIN, **{k: v for k, v in ACME.items()}})
        assert response.status_code in (302, 303), (method, url, response.status_code)
        assert response.headers["Location"] == target, (method, url, response.headers["Location"], first)
    assert r.stored() == before


def test_every_form_of_the_fuzz_list_is_covered_here_too() -> None:
    """The replay list names real forms (a rename would silently skip them)."""
    actions = {f.action for f in FORMS}
    assert all(a in actions for _s, _p, a, _d, _c in REPLAYS)
