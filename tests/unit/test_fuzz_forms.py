"""Every POST form of the wizard, the sign-in page and the dashboard (and the GET forms),
fuzzed with hypothesis through the test client and a real agent (no docker engine).

One field at a time gets a generated value (unicode incl. RTL, combining marks and
emoji; control characters and NUL; SQL and shell metacharacters; empty and
whitespace-only; huge strings, also beyond MAX_CONTENT_LENGTH; several values for one
name) while the others keep a plausible value. Checked for every answer: never a 5xx;
a body over the limit gets the 413 page; a field error is on the fuzzed field (or on
one the spec names as depending on it), page-level messages are fine; a refused
submit leaves state.db and accounts.db as they were.

The rig (`Rig`, `rig` fixture) is shared with test_a11y.py and test_csrf_session.py.
"""

from __future__ import annotations

import html
import re
import sqlite3
import time
from contextlib import closing
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings, strategies as st

from portal.web import wizard
from tests.support import appdb as db
from tests.support import settings as support
from portal.agent.client import AgentClient
from portal.stack.accounts import Accounts, NoKeys
from tests.conftest import TEST_TOKEN, AgentProcess
from tests.unit.conftest import https_client, unlock
from tests.support.admin import sign_in

DOMAIN = "example.org"
ADMIN = f"postmaster@{DOMAIN}"
PASSWORD = "correct horse battery staple"
TSIG_SECRET = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
BASE_SETTINGS = {"domain": DOMAIN, "mail_host": f"mail.{DOMAIN}", "public_ipv4": "9.9.9.10",
                 "public_ipv6": "", "dns_resolvers": "9.9.9.9"}
MAX_BODY = 64 * 1024
CSRF_RE = re.compile(r'<input[^>]* name="([a-z_]*-?csrf_token)"[^>]* value="([^"]+)"')


# -- the rig: an app in a given state, a real agent, a client -------------------------------

@dataclass
class Rig:
    app: Flask
    client: FlaskClient
    state_dir: Path
    agent: AgentProcess
    totp: pyotp.TOTP | None = None

    def agent_call(self, op: str, **args: Any) -> dict[str, Any]:
        return AgentClient(str(self.agent.socket), timeout=10).call(op, **args)

    def stored(self) -> dict[str, Any]:
        """What the appliance keeps: state.db's settings and progress, accounts.db's rows."""
        out: dict[str, Any] = {}
        with closing(db.connect(self.state_dir / "state.db")) as c:
            for table in ("settings", "wizard_progress"):
                out[table] = sorted(map(tuple, c.execute(f"SELECT * FROM {table}")))  # noqa: S608 - fixed names
        accounts = self.state_dir / "accounts" / "accounts.db"
        if accounts.exists():
            with sqlite3.connect(accounts) as c:
                for (table,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                    out[f"accounts.{table}"] = sorted(map(repr, c.execute(f'SELECT * FROM "{table}"')))
        secrets = self.state_dir / "secrets"
        # (admin-lockout.json counts failed sign-ins: it is meant to change)
        out["secrets"] = sorted(p.name for p in secrets.iterdir() if p.name != "admin-lockout.json"
                                ) if secrets.exists() else []
        return out


def write_settings(state: Path, values: dict[str, str], done_before: int | None = None) -> None:
    """The settings and, with `done_before`, the wizard steps before that order done."""
    support.write_settings(state, **values)
    if done_before is not None:
        support.mark_done(state, *(s.id for s in wizard.all_steps() if s.order < done_before))


def create_admin(call: Callable[..., dict[str, Any]], address: str = ADMIN) -> pyotp.TOTP:
    """The administrator through the agent's own operations; returns its TOTP."""
    totp = pyotp.TOTP(call("admin_totp_begin", address=address)["secret"])
    call("admin_setup", address=address, password=PASSWORD, totp_code=totp.now())
    return totp


def step_order(step_id: str) -> int:
    return next(s.order for s in wizard.all_steps() if s.id == step_id)


# The states a page can be seen in: "token" (locked wizard), "at:<step>" (unlocked,
# the steps before <step> done), "clients" (deployed, before Finish), "login" (setup
# complete, no session), "dashboard" (setup complete, signed in) and "maintenance" (the
# dashboard with the agent's scheduler running, every job moved to a far-off time;
# resolvers and mail ports on loopback, so a job that runs anyway stays on this machine).
STATES = ("token", "at:domain", "at:admin", "at:dns", "at:certs", "at:deploy", "clients", "login", "dashboard",
          "maintenance")
FAR_OFF = "0 0 1 1 *"
LOOPBACK_ONLY = {"dns_resolvers": "127.0.0.1:9", "publish_addresses": "127.0.0.1",
                 "stack_ports": '{"smtp": 9, "submission": 9, "submissions": 9, "imaps": 9, "pop3s": 9, "dav": 9}'}


def build_rig(state: str, make_app: Callable[..., Flask], state_dir: Path, agent: AgentProcess,
              **config: Any) -> Rig:
    app = make_app(AGENT_SOCKET=str(agent.socket), TOKEN_RATE_LIMIT="100000 per minute",
                   LOGIN_RATE_LIMIT="100000 per minute", **config)
    rig = Rig(app, https_client(app), state_dir, agent)
    if state == "token":
        return rig
    if state.startswith("at:"):
        step = state[3:]
        write_settings(state_dir, BASE_SETTINGS if step != "domain" else {}, step_order(step))
        if step == "domain":  # a saved valid domain step that a refused submit must keep
            write_settings(state_dir, BASE_SETTINGS, step_order("admin"))
            with sqlite3.connect(state_dir / "state.db") as c:
                c.execute("DELETE FROM wizard_progress")
        if step_order(step) > step_order("dns"):
            write_settings(state_dir, {"rfc2136_server": "192.0.2.53", "rfc2136_port": "53",
                                       "rfc2136_key_name": "mailstead-key", "rfc2136_algorithm": "hmac-sha256"})
        assert unlock(rig.client).status_code == 302
        return rig
    if state == "clients":
        write_settings(state_dir, {**BASE_SETTINGS, "stack_deployed": "1", "admin_address": ADMIN},
                       step_order("deploy"))
        assert unlock(rig.client).status_code == 302
        return rig
    write_settings(state_dir, {**BASE_SETTINGS, **(LOOPBACK_ONLY if state == "maintenance" else {})},
                   step_order("deploy"))
    if state == "maintenance":
        for job in rig.agent_call("schedule_list")["jobs"]:
            rig.agent_call("schedule_set", job=job["job"], cron=FAR_OFF)
    rig.totp = create_admin(rig.agent_call)
    write_settings(state_dir, {"setup_complete": "1", "stack_deployed": "1", "admin_address": ADMIN},
                   step_order("deploy") + 1)
    accounts = Accounts(state_dir / "accounts" / "accounts.db")
    accounts.add_domain(DOMAIN)
    accounts.create_mailbox(ADMIN, PASSWORD, 0, keys=NoKeys())
    accounts.create_mailbox(f"bob@{DOMAIN}", PASSWORD, 100, keys=NoKeys())
    if state in ("dashboard", "maintenance"):
        sign_in(rig.client, ADMIN)
    return rig


# -- reading pages ----------------------------------------------------------------------

class Page(HTMLParser):
    """The parts of a page the checks need: controls (id, name, type), ids, aria-invalid."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.controls: list[dict[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if tag in ("input", "select", "textarea"):
            self.controls.append({"tag": tag, **a})

    def field_errors(self) -> set[str]:
        """Names of the controls that carry an error (#<id>-error or aria-invalid)."""
        by_id = {c.get("id"): str(c.get("name")) for c in self.controls if c.get("id")}
        out = {by_id[i[:-6]] for i in self.ids if i.endswith("-error") and i[:-6] in by_id}
        return out | {str(c.get("name")) for c in self.controls if c.get("aria-invalid") == "true"}


def csrf_of(text: str) -> str | None:
    match = CSRF_RE.search(text)
    return html.unescape(match.group(2)) if match else None


# -- the forms ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Form:
    name: str
    state: str
    page: str  # GET: where the form (and a CSRF token) is
    action: str  # where it is sent
    fields: dict[str, str]  # plausible values; one at a time is fuzzed
    csrf: str | None = "csrf_token"  # the token's field name (None: a GET form)
    # fields that may show an error whichever field is fuzzed (their plausible value is
    # refused on purpose, e.g. a wrong TOTP code), and per fuzzed field the ones that depend on it
    also: frozenset[str] = frozenset()
    related: dict[str, frozenset[str]] = field(default_factory=dict)


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


DNS_PUSH = {"rfc2136_server": "192.0.2.53", "rfc2136_port": "53", "rfc2136_key_name": "mailstead-key",
            "rfc2136_secret": TSIG_SECRET, "rfc2136_algorithm": "hmac-sha256", "save_push_config": "Save"}
ACME = {"acme_ca": "letsencrypt-staging", "acme_directory": "", "acme_ca_bundle_pem": "",
        "acme_contact": ADMIN, "acme_challenge": "http-01", "save_acme": "Save"}
ACME_RELATED = {"acme_ca": _f("acme_directory", "acme_ca_bundle_pem")}
RESTORE_TARGET = {"target": "local", "path": "/nonexistent/mailstead-fuzz-backups", "host": "", "port": "",
                  "user": "", "key": "", "endpoint": "", "bucket": "", "region": "", "access_key_id": "",
                  "secret_access_key": "", "password": "abcd-efgh-jkmn-pqrs"}

FORMS = [
    Form("token", "token", "/setup/token", "/setup/token", {"token": "not-the-token"}),
    Form("domain", "at:domain", "/setup/domain", "/setup/domain", dict(BASE_SETTINGS),
         related={"domain": _f("mail_host")}),
    Form("admin", "at:admin", "/setup/admin", "/setup/admin",
         {"address": ADMIN, "password": PASSWORD, "password_confirm": PASSWORD, "totp_code": "000000"},
         also=_f("totp_code"), related={"password": _f("password_confirm"), "password_confirm": _f("password"),
                                         "address": _f("password")}),
    Form("admin saved", "at:admin", "/setup/admin", "/setup/admin/saved", {"junk": "x"}),
    Form("dns push config", "at:dns", "/setup/dns", "/setup/dns/push-config", DNS_PUSH),
    Form("dns push", "at:dns", "/setup/dns", "/setup/dns/push", {"push_dry_run": "Dry run"}),
    Form("dns continue", "at:dns", "/setup/dns", "/setup/dns", {"accept_problems": "", "dns_continue": "Continue"},
         also=_f("accept_problems")),
    Form("certs settings", "at:certs", "/setup/certs", "/setup/certs/settings", ACME, related=ACME_RELATED),
    Form("certs continue", "at:certs", "/setup/certs", "/setup/certs",
         {"accept_self_signed": "", "continue_self_signed": "Continue"}, also=_f("accept_self_signed")),
    Form("deploy start", "at:deploy", "/setup/deploy", "/setup/deploy/start", {"junk": ""}),
    Form("clients test", "clients", "/setup/deploy/clients", "/setup/deploy/clients/test", {"to": ADMIN}),
    Form("clients profile", "clients", "/setup/deploy/clients", "/setup/deploy/profile.mobileconfig",
         {"address": ADMIN}, csrf=None),
    Form("finish", "clients", "/setup/deploy/clients", "/setup/deploy/finish", {}),
    # The wizard's "Restore from a backup": no repository in the rig, so the plausible
    # target is refused on its path (and the agent names the field of any other refusal).
    Form("restore target", "at:domain", "/setup/restore", "/setup/restore", RESTORE_TARGET, also=_f("path")),
    Form("restore snapshot", "at:domain", "/setup/restore", "/setup/restore/snapshots", {"snapshot": "0123abcd"}),
    Form("restore start", "at:domain", "/setup/restore", "/setup/restore/start", {}),
    Form("login", "login", "/login", "/login", {"address": ADMIN, "password": PASSWORD, "code": "000000"}),
    Form("mailbox create", "dashboard", "/admin/mailboxes/", "/admin/mailboxes/create",
         {"create-address": f"carol@{DOMAIN}", "create-password": PASSWORD, "create-quota_mb": "0"},
         csrf="create-csrf_token"),
    Form("mailbox reset", "dashboard", "/admin/mailboxes/", "/admin/mailboxes/reset-password",
         {"reset-address": f"bob@{DOMAIN}", "reset-new_password": PASSWORD + "!"}, csrf="reset-csrf_token"),
    Form("mailbox quota", "dashboard", "/admin/mailboxes/", "/admin/mailboxes/quota",
         {"quota-address": f"bob@{DOMAIN}", "quota-quota_mb": "100"}, csrf="quota-csrf_token"),
    Form("mailbox delete", "dashboard", f"/admin/mailboxes/delete?address=bob@{DOMAIN}", "/admin/mailboxes/delete",
         {"delete-address": f"bob@{DOMAIN}", "delete-confirm": "y"}, csrf="delete-csrf_token"),
    Form("alias add", "dashboard", "/admin/mailboxes/", "/admin/mailboxes/alias",
         {"alias-source": f"info@{DOMAIN}", "alias-destination": "nobody@elsewhere.example"},
         csrf="alias-csrf_token", related={"alias-source": _f("alias-destination")}),
    Form("alias remove", "dashboard", "/admin/mailboxes/", "/admin/mailboxes/alias/remove",
         {"unalias-source": f"info@{DOMAIN}", "unalias-destination": "nobody@elsewhere.example"},
         csrf="unalias-csrf_token"),
    Form("logs", "dashboard", "/admin/logs/", "/admin/logs/", {"service": "postfix", "lines": "20"}, csrf=None),
    Form("dashboard dns push config", "dashboard", "/admin/dns", "/admin/dns/push-config", DNS_PUSH),
    Form("dashboard dns check", "dashboard", "/admin/dns", "/admin/dns/check", {"junk": ""}),
    Form("dashboard certs settings", "dashboard", "/admin/certs", "/admin/certs/settings", ACME,
         related=ACME_RELATED),
    Form("dashboard certs issue", "dashboard", "/admin/certs", "/admin/certs/issue", {"junk": ""}),
    Form("dashboard clients test", "dashboard", "/admin/clients/", "/admin/clients/test", {"to": ADMIN}),
    Form("dashboard clients profile", "dashboard", "/admin/clients/", "/admin/clients/profile.mobileconfig",
         {"address": ADMIN}, csrf=None),
    Form("health run", "dashboard", "/admin/health/", "/admin/health/run", {}),
    Form("alerts", "dashboard", "/admin/health/", "/admin/health/alerts",
         {"alert_webhook_url": "https://hooks.example.com/mailstead", "dnsbl_zones": "zen.spamhaus.org",
          "save_alerts": "Save"}),
    Form("alerts test", "dashboard", "/admin/health/", "/admin/health/alerts/test", {}),
    # S3 with a refused endpoint: the target is never created (a fuzzed local folder would be).
    Form("backup target", "dashboard", "/admin/backups/", "/admin/backups/target",
         {"target": "s3", "path": "mailstead", "endpoint": "ftp://s3.example.com", "bucket": "mailstead-backup",
          "region": "", "access_key_id": "AKIAEXAMPLE", "secret_access_key": "example-secret", "host": "",
          "port": "22", "user": "", "key": "", "password": "", "save_target": "Save"},
         also=_f("endpoint"), related={"target": _f("path", "host", "port", "user", "bucket", "access_key_id",
                                                    "secret_access_key", "region", "key")}),
    Form("backup run", "dashboard", "/admin/backups/", "/admin/backups/run", {}),
    Form("backup verify", "dashboard", "/admin/backups/", "/admin/backups/verify", {}),
    Form("backup restore", "dashboard", "/admin/backups/", "/admin/backups/restore",
         {"snapshot": "latest", "confirm": ""}, also=_f("confirm")),
    Form("schedule", "maintenance", "/admin/schedules/", "/admin/schedules/update",
         {"update-cron": FAR_OFF, "update-save": "Save"}, csrf="update-csrf_token"),
    Form("schedule run now", "maintenance", "/admin/schedules/", "/admin/schedules/update/run", {}),
    Form("update settings", "maintenance", "/admin/updates/", "/admin/updates/settings",
         {"auto": "y", "window_hour": "4", "time_zone": "", "feed_url": "", "save": "Save"}),
    Form("update check", "maintenance", "/admin/updates/", "/admin/updates/check", {}),
    Form("logout", "dashboard", "/admin/", "/logout", {}),
]

# -- values ---------------------------------------------------------------------------------

NASTY = [
    "", " ", "\t \n ", "\r\n", "\x00", "a\x00b", "\x1b[31mred", "\x7f\x08", "\u200b", "\ufeff",
    "'; DROP TABLE settings; --", "' OR '1'='1", "$(reboot)", "`id`", "a;rm -rf /", "a|b&c>d<e", "../../etc/passwd",
    "%00%0a", "${jndi:ldap://x}", "{{7*7}}", "<script>alert(1)</script>", "\" onfocus=\"alert(1)", "\\",
    "\u202eevil.example", "مرحبا@مثال.اختبار", "שלום", "e\u0301\u0302\u0303\u0304", "Z\u0351\u0352\u0353" * 20,
    "👍🏽🇩🇪👨‍👩‍👧", "bücher.example", "xn--bcher-kva.example", "ß", "İ", "\U0010fffd",
    "0", "-1", "99999999999999999999", "1e9", "NaN", "0x10", "y", "on", "true",
]
# surrogates cannot be sent in a form at all
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
HUGE = st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "é", "\x00", "👍", "a@"]),
                 st.sampled_from([2_000, 30_000, 70_000, 110_000]))
SCALAR = st.one_of(TEXT, st.sampled_from(NASTY), HUGE)
VALUES = st.one_of(SCALAR, st.lists(st.one_of(TEXT, st.sampled_from(NASTY)), min_size=2, max_size=3))


def get_token(rig: Rig, form: Form, cache: dict[str, str]) -> str:
    if (form.csrf or "") not in cache:
        page = rig.client.get(form.page)
        assert page.status_code < 500, (form.page, page.status_code, page.text[:2000])
        token = csrf_of(page.text)
        assert token, f"no CSRF token on {form.page} ({page.status_code})"
        cache[form.csrf or ""] = token
    return cache[form.csrf or ""]


def submit(rig: Rig, form: Form, data: dict[str, Any]) -> Any:
    if form.csrf is None:
        return rig.client.get(form.action, query_string=data)
    return rig.client.post(form.action, data=data)


def check_answer(rig: Rig, form: Form, fuzzed: str, data: dict[str, Any], response: Any,
                 before: dict[str, Any]) -> None:
    status = response.status_code
    where = f"{form.name}: {fuzzed}={str(data.get(fuzzed))[:80]!r} -> {status}"
    assert status < 500, f"{where}\n{response.text[:3000]}"
    if form.csrf is not None and (response.request.content_length or 0) > MAX_BODY:
        assert status == 413 and "Request too large" in response.text, where
    if status in (301, 302, 303):
        return  # accepted (a plausible value)
    if response.mimetype == "text/html":
        page = Page(response.text)
        allowed = {fuzzed} | form.also | form.related.get(fuzzed, frozenset())
        wrong = page.field_errors() - allowed
        assert not wrong, f"{where}: errors on {sorted(wrong)} for a value in {fuzzed}"
    assert rig.stored() == before, f"{where}: something stored changed"


FIELD_FORMS = [f for f in FORMS if f.fields]  # finish and logout: only their CSRF token (below)


@pytest.mark.parametrize("form", FIELD_FORMS, ids=[f.name for f in FIELD_FORMS])
@settings(max_examples=20, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_form_never_fails_and_errors_on_the_field(rig: Callable[..., Rig], form: Form, data: Any,
                                                         request: pytest.FixtureRequest) -> None:
    # One rig per form (hypothesis reuses function-scoped fixtures across examples).
    key = f"_fuzz_rig_{form.name}"
    if not hasattr(request.node, key):
        setattr(request.node, key, (rig(form.state), {}))
    the_rig, tokens = getattr(request.node, key)
    fuzzed = data.draw(st.sampled_from(sorted(form.fields)), label="field")
    value = data.draw(VALUES, label="value")
    values: dict[str, Any] = {**form.fields, fuzzed: value}
    if form.csrf is not None:
        values[form.csrf] = get_token(the_rig, form, tokens)
    before = the_rig.stored()
    response = submit(the_rig, form, values)
    check_answer(the_rig, form, fuzzed, values, response, before)
    if response.status_code in (301, 302, 303):
        tokens.clear()  # a state change rotates the token


@pytest.mark.parametrize("form", [f for f in FORMS if f.csrf is not None], ids=lambda f: f.name)
@settings(max_examples=5, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(token=st.one_of(SCALAR, st.lists(TEXT, min_size=2, max_size=2)))
def test_fuzzed_csrf_token_is_refused_and_changes_nothing(rig: Callable[..., Rig], form: Form, token: Any,
                                                          request: pytest.FixtureRequest) -> None:
    key = f"_csrf_rig_{form.name}"
    if not hasattr(request.node, key):
        setattr(request.node, key, rig(form.state))
    the_rig = getattr(request.node, key)
    before = the_rig.stored()
    data = {**form.fields, form.csrf: token}
    response = the_rig.client.post(form.action, data=data)
    if (response.request.content_length or 0) > MAX_BODY:
        assert response.status_code == 413, response.status_code
    else:
        assert response.status_code == 400 and "The form expired" in response.text, (form.name, response.status_code)
    assert the_rig.stored() == before


@pytest.mark.parametrize("size", [65 * 1024, 200 * 1024])
def test_oversized_bodies_get_the_413_page(rig: Callable[..., Rig], size: int) -> None:
    r = rig("at:domain")
    before = r.stored()
    for path in ("/setup/token", "/setup/domain", "/login"):
        response = r.client.post(path, data={"domain": "x" * size})
        assert response.status_code == 413 and "Request too large" in response.text, path
        assert 'role="alert"' in response.text or "<h1>" in response.text
    raw = r.client.post("/setup/domain", data=b"a" * size, content_type="application/octet-stream")
    assert raw.status_code in (400, 413)
    assert r.stored() == before


def test_nothing_stored_is_lost_when_the_domain_form_is_refused(rig: Callable[..., Rig]) -> None:
    """The explicit case behind the fuzzing: a saved domain survives a bad resubmit."""
    r = rig("at:domain")
    before = r.stored()
    token = csrf_of(r.client.get("/setup/domain").text)
    response = r.client.post("/setup/domain", data={**BASE_SETTINGS, "csrf_token": token, "domain": "bad domain;"})
    assert response.status_code == 200 and 'id="domain-error"' in response.text
    assert r.stored() == before
    assert dict(before["settings"])["domain"] == DOMAIN


def test_fuzz_uses_the_real_token(rig: Callable[..., Rig]) -> None:
    """The token form's plausible value is wrong; the right one still works afterwards."""
    r = rig("token")
    assert unlock(r.client, "wrong").status_code == 403
    assert unlock(r.client, TEST_TOKEN).status_code == 302
