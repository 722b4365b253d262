"""Sign-in, sign-out and the gate after setup (real agent for admin_login)."""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from flask import Flask, url_for
from flask.testing import FlaskClient
from werkzeug.routing import IntegerConverter

from portal.web import auth
from tests.support import appdb as db
from tests.support.admin import allow_code_again, sign_in
from portal.agent.client import AgentClient
from tests.support.statedb import write_settings
from tests.conftest import csrf_token
from tests.unit.conftest import https_client, unlock

ADDRESS = "postmaster@example.com"
PASSWORD = "correct horse battery staple"


class Admin:
    def __init__(self, totp: pyotp.TOTP, codes: list[str], state_dir: Path) -> None:
        self.totp, self.codes, self.state_dir = totp, codes, state_dir

    def code(self) -> str:
        """A TOTP code that has not been used yet (tests have no 30 s to wait)."""
        allow_code_again(self.state_dir)
        return self.totp.now()


@pytest.fixture
def admin(agent: Any, state_dir: Path) -> Admin:
    write_settings(state_dir / "state.db", {"domain": "example.com", "mail_host": "mail.example.com"})
    client = AgentClient(str(agent.socket), timeout=10)
    totp = pyotp.TOTP(client.call("admin_totp_begin", address=ADDRESS)["secret"])
    codes = client.call("admin_setup", address=ADDRESS, password=PASSWORD, totp_code=totp.now())["recovery_codes"]
    write_settings(state_dir / "state.db", {"setup_complete": "1"})
    return Admin(totp, codes, state_dir)


@pytest.fixture
def done_app(make_app: Callable[..., Flask], token_file: Path, agent: Any, admin: Admin) -> Flask:
    return make_app(AGENT_SOCKET=str(agent.socket))


@pytest.fixture
def client(done_app: Flask) -> FlaskClient:
    return https_client(done_app)


def login(client: FlaskClient, code: str, password: str = PASSWORD, address: str = ADDRESS,
          next_url: str | None = None) -> Any:
    url = "/login" + (f"?next={next_url}" if next_url else "")
    page = client.get(url)
    return client.post(url, data={"csrf_token": csrf_token(page.text), "address": address,
                                  "password": password, "code": code})


def home(app: Flask) -> str:
    with app.test_request_context():
        return auth.home_url()


def sign_in_directly(client: FlaskClient, seen_ago: float = 0, auth_ago: float = 0) -> None:
    sign_in(client, ADDRESS, seen_ago=seen_ago, auth_ago=auth_ago)


# -- the gate --------------------------------------------------------------------------

def sample_url(app: Flask, rule: Any) -> str:
    args = {}
    for name in rule.arguments:
        converter = rule._converters[name]
        args[name] = 1 if isinstance(converter, IntegerConverter) else ("stack_deploy" if name == "kind" else "x")
    with app.test_request_context():
        return url_for(rule.endpoint, **args)


def gated_rules(app: Flask) -> list[Any]:
    return [r for r in app.url_map.iter_rules() if r.endpoint not in auth.PUBLIC_AFTER_SETUP]


def assert_gated(response: Any, url: str) -> None:
    assert response.status_code in (302, 303, 401, 403), (url, response.status_code, response.text[:300])
    if response.status_code in (302, 303):
        assert urlsplit(response.headers["Location"]).path == "/login", url


def test_every_page_needs_a_session_after_setup(make_app: Callable[..., Flask], token_file: Path,
                                               state_dir: Path) -> None:
    write_settings(state_dir / "state.db", {"setup_complete": "1", "domain": "example.com"})
    app = make_app()
    client = https_client(app)
    rules = gated_rules(app)
    assert {"domain.index", "admin.index", "wizard.index", "jobs.latest", "jobs.start", "auth.logout",
            "dashboard.home"} <= {r.endpoint for r in rules} | {"dashboard.home"}
    for rule in rules:
        url = sample_url(app, rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if method == "GET":
                response = client.get(url)
            else:
                token = csrf_token(client.get("/login").text)
                response = client.open(url, method=method, data={"csrf_token": token})
            assert_gated(response, f"{method} {url}")


def test_every_page_needs_a_session_even_with_a_setup_session(make_app: Callable[..., Flask], token_file: Path,
                                                              state_dir: Path) -> None:
    app = make_app()
    client = https_client(app)
    unlock(client)
    write_settings(state_dir / "state.db", {"setup_complete": "1"})
    for rule in gated_rules(app):
        if "GET" in rule.methods:
            assert_gated(client.get(sample_url(app, rule)), rule.rule)


def test_public_pages_after_setup(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    for url in ("/static/portal.css", "/static/password.js"):
        with client.get(url) as response:
            assert response.status_code == 200
    assert "Setup is finished" in client.get("/setup/token").text
    page = client.get("/login")
    assert page.status_code == 200 and 'id="login-form"' in page.text
    for name in ("address", "password", "code"):
        assert f'<label for="{name}">' in page.text


def test_redirect_keeps_the_local_path(client: FlaskClient) -> None:
    response = client.get("/setup/domain?x=1")
    assert response.status_code == 302
    assert parse_qs(urlsplit(response.headers["Location"]).query)["next"] == ["/setup/domain?x=1"]


def test_jobs_answer_401_json(client: FlaskClient) -> None:
    response = client.get("/jobs/stack_deploy")
    assert response.status_code == 401 and response.json["login"] == "/login"


def test_before_setup_login_says_not_finished(make_app: Callable[..., Flask], token_file: Path) -> None:
    client = https_client(make_app())
    page = client.get("/login")
    assert page.status_code == 200 and 'id="setup-not-finished"' in page.text
    assert client.get("/setup/domain").headers["Location"].endswith("/setup/token")  # the wizard's gate


# -- signing in ------------------------------------------------------------------------------

def test_login_with_totp(done_app: Flask, client: FlaskClient, admin: Admin) -> None:
    response = login(client, admin.code())
    assert response.status_code == 303, response.text
    assert response.headers["Location"] == home(done_app)
    with client.session_transaction() as session:
        assert session["admin"] == ADDRESS
        assert abs(session["auth_at"] - time.time()) < 10 and session["seen"] == session["auth_at"]
        assert "setup" not in session
        assert "csrf_token" not in session  # a new form token after signing in
    assert client.get(response.headers["Location"]).status_code == 200


@pytest.mark.parametrize(("password", "code_kind"), [
    ("wrong password!", "totp"), (PASSWORD, "wrong"), (PASSWORD, "recovery-bad"),
])
def test_wrong_login_is_refused_with_a_message(client: FlaskClient, admin: Admin, password: str,
                                               code_kind: str) -> None:
    code = {"totp": admin.code(), "wrong": "000000" if admin.totp.now() != "000000" else "111111",
            "recovery-bad": "AAAA-BBBB-CCCC-DDDD"}[code_kind]
    response = login(client, code, password=password)
    assert response.status_code == 403
    assert 'id="login-error"' in response.text
    assert "address, password or code is not right" in response.text
    assert PASSWORD not in response.text
    with client.session_transaction() as session:
        assert "admin" not in session


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("address", "", "Enter the administrator"), ("address", "nobody", "name@domain"),
    ("password", "", "Enter your password"), ("code", "", "Enter the 6-digit code"),
    ("code", "12;rm -rf", "A code is 6 digits"),
])
def test_empty_or_malformed_fields_are_told_on_the_field(client: FlaskClient, field: str, value: str,
                                                          problem: str) -> None:
    values = {"address": ADDRESS, "password": PASSWORD, "code": "123456", field: value}
    page = client.get("/login")
    response = client.post("/login", data={"csrf_token": csrf_token(page.text), **values})
    assert response.status_code == 200
    assert f'id="{field}-error"' in response.text and problem in html.unescape(response.text)


def test_recovery_code_signs_in_once(done_app: Flask, client: FlaskClient, admin: Admin) -> None:
    response = login(client, admin.codes[0])
    assert response.status_code == 303
    with client.session_transaction() as session:
        session.clear()
    again = login(client, admin.codes[0])
    assert again.status_code == 403


def test_lockout_message_on_the_page(client: FlaskClient, admin: Admin) -> None:
    for _ in range(4):
        assert login(client, "123456", password="wrong password!").status_code == 403
    response = login(client, "123456", password="wrong password!")
    assert response.status_code == 429
    assert "try again after" in response.text
    assert login(client, admin.code()).status_code == 429  # locked even with the right password


def test_login_is_rate_limited(make_app: Callable[..., Flask], token_file: Path, agent: Any,
                               admin: Admin) -> None:
    client = https_client(make_app(AGENT_SOCKET=str(agent.socket), LOGIN_RATE_LIMIT="3 per minute"))
    for _ in range(3):
        page = client.get("/login")
        assert client.post("/login", data={"csrf_token": csrf_token(page.text)}).status_code == 200
    page = client.get("/login")
    assert client.post("/login", data={"csrf_token": csrf_token(page.text)}).status_code == 429


@pytest.mark.parametrize(("target", "expected"), [
    ("/setup/dns", "/setup/dns"), ("/admin/x?y=1", "/admin/x?y=1"),
    ("//evil.example/", None), ("https://evil.example/", None), ("/\\evil.example", None),
    ("javascript:alert(1)", None), ("", None), ("/ok\nSet-Cookie: x", None), ("evil", None),
])
def test_safe_next(target: str, expected: str | None) -> None:
    assert auth.safe_next(target) == expected


def test_login_goes_to_next_but_never_elsewhere(done_app: Flask, client: FlaskClient, admin: Admin) -> None:
    response = login(client, admin.code(), next_url="//evil.example/")
    assert response.headers["Location"] == home(done_app)
    with client.session_transaction() as session:
        session.clear()
    response = login(client, admin.code(), next_url="/jobs/stack_deploy")
    assert response.headers["Location"] == "/jobs/stack_deploy"


# -- the session ----------------------------------------------------------------------------

def test_wizard_pages_lead_to_the_dashboard_after_setup(done_app: Flask, client: FlaskClient) -> None:
    sign_in_directly(client)
    for url in ("/", "/setup/domain", "/setup/admin", "/setup/next"):
        response = client.get(url)
        assert response.status_code == 302 and response.headers["Location"] == home(done_app), url


def test_activity_keeps_the_session(client: FlaskClient) -> None:
    sign_in_directly(client, seen_ago=14 * 60)
    assert client.get("/jobs/stack_deploy").status_code != 401
    with client.session_transaction() as session:
        assert time.time() - session["seen"] < 10


def test_idle_timeout(client: FlaskClient) -> None:
    sign_in_directly(client, seen_ago=15 * 60 + 5)
    response = client.get("/setup/domain")
    assert response.status_code == 302 and urlsplit(response.headers["Location"]).path == "/login"
    with client.session_transaction() as session:
        assert "admin" not in session
    page = client.get(response.headers["Location"]).text
    assert "15 minutes without activity" in page


def test_absolute_timeout(client: FlaskClient) -> None:
    sign_in_directly(client, seen_ago=1, auth_ago=8 * 3600 + 5)
    assert client.get("/jobs/stack_deploy").status_code == 401
    assert "after 8 hours" in client.get("/login").text


def test_logout_needs_csrf_and_clears_the_session(client: FlaskClient) -> None:
    page = client.get("/login")  # its form token stays in the session
    sign_in_directly(client)
    assert client.post("/logout").status_code == 400
    with client.session_transaction() as session:
        assert session["admin"] == ADDRESS
    response = client.post("/logout", data={"csrf_token": csrf_token(page.text)})
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    with client.session_transaction() as session:
        assert "admin" not in session
    assert "You are signed out" in client.get("/login").text
    assert client.get("/jobs/stack_deploy").status_code == 401


def test_gate_does_not_touch_state_db_for_static(make_app: Callable[..., Flask], token_file: Path,
                                                 state_dir: Path) -> None:
    client = https_client(make_app())
    with client.get("/static/portal.css") as response:
        assert response.status_code == 200
    assert client.get("/healthz").status_code == 200
    assert not (state_dir / "state.db").exists()


def test_db_helper_sees_setup_complete(done_app: Flask) -> None:
    with done_app.test_request_context():
        assert db.get_setting("setup_complete") == "1" and auth.setup_complete()
