"""Wizard framework: steps as data, routing hook, persistent progress, sessions."""

from __future__ import annotations

from collections.abc import Callable

from typing import Any

import pytest
from flask import Blueprint, Flask, url_for
from flask.testing import FlaskClient
from itsdangerous import URLSafeTimedSerializer

from portal.web import wizard
from tests.support import appdb as db
from portal.web.wizard import Step, all_steps, next_unfinished, redirect_target
from tests.conftest import OS_PRETTY_NAME, csrf_token
from tests.unit.conftest import https_client, unlock

COOKIE = "__Host-mailstead"
A = Step("a", "bp.a", 10, "A")
B = Step("b", "bp.b", 20, "B")
C = Step("c", "bp.c", 30, "C")


def test_steps_are_data_and_domain_comes_first(app: Flask) -> None:
    assert wizard.ordered(all_steps())[0].id == "domain"
    assert len({s.id for s in all_steps()}) == len(all_steps())
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert all(s.endpoint in endpoints for s in all_steps())


def test_next_unfinished_follows_order_not_list_position() -> None:
    assert next_unfinished([C, A, B], set()) == A
    assert next_unfinished([C, A, B], {"a"}) == B
    assert next_unfinished([C, A, B], {"a", "b", "c"}) is None


@pytest.mark.parametrize(
    ("endpoint", "has_session", "done", "expected"),
    [
        ("static", False, set(), None),
        ("healthz", False, set(), None),
        ("setup.token", False, set(), None),
        (None, False, set(), None),  # 404s stay 404s
        ("wizard.index", False, set(), "setup.token"),
        ("bp.b", False, {"a"}, "setup.token"),
        ("wizard.index", True, set(), "bp.a"),
        ("wizard.index", True, {"a"}, "bp.b"),
        ("wizard.index", True, {"a", "b", "c"}, "wizard.pending"),
        ("wizard.pending", True, {"a"}, "bp.b"),
        ("wizard.pending", True, {"a", "b", "c"}, None),
        ("bp.a", True, set(), None),
        ("bp.c", True, set(), "bp.a"),  # later than the first unfinished step
        ("bp.c", True, {"a"}, "bp.b"),
        ("bp.a", True, {"a", "b"}, None),  # finished steps can be revisited
        ("bp.b", True, {"a", "c"}, None),
        ("other.page", True, set(), None),
    ],
)
def test_redirect_target(endpoint: str | None, has_session: bool, done: set[str], expected: str | None) -> None:
    assert redirect_target(endpoint, has_session, [A, B, C], done) == expected


def test_hook_sends_later_steps_back(make_app: Callable[..., Flask], token_file: object,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    later = Blueprint("later", __name__)

    @later.route("/setup/later", methods=["GET", "POST"])
    def index() -> str:
        return "later step"

    monkeypatch.setattr(wizard, "STEPS", (*all_steps(), Step("later", "later.index", 99, "Later")))
    app = make_app()
    app.register_blueprint(later)
    client = https_client(app)
    unlock(client)
    response = client.get("/setup/later")
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/setup/domain")
    token = csrf_token(client.get("/setup/domain").text)
    response = client.post("/setup/later", data={"csrf_token": token})
    assert response.status_code == 303  # the browser follows with a GET
    assert response.headers["Location"].endswith("/setup/domain")
    with app.app_context():
        for s in all_steps():
            if s.id != "later":
                db.mark_step_done(s.id)
    assert client.get("/").headers["Location"].endswith("/setup/later")
    assert client.get("/setup/later").text == "later step"


def test_index_routes_to_next_step(app: Flask, unlocked: FlaskClient) -> None:
    assert unlocked.get("/").headers["Location"].endswith("/setup/domain")
    with app.app_context():
        db.mark_step_done("domain")
    with app.test_request_context():
        second_url = url_for(wizard.ordered(all_steps())[1].endpoint)
    assert unlocked.get("/").headers["Location"].endswith(second_url)
    with app.app_context():
        for s in all_steps():
            db.mark_step_done(s.id)
    assert unlocked.get("/").headers["Location"].endswith("/setup/next")
    assert unlocked.get("/setup/next").status_code == 200
    assert unlocked.get("/setup/domain").status_code == 200


def test_pending_page_before_steps_are_done_redirects(unlocked: FlaskClient) -> None:
    assert unlocked.get("/setup/next").headers["Location"].endswith("/setup/domain")


def test_progress_survives_a_new_app_instance(make_app: Callable[..., Flask], token_file: object) -> None:
    first = https_client(make_app())
    unlock(first)
    token = csrf_token(first.get("/setup/domain").text)
    first.post("/setup/domain", data={"csrf_token": token, "domain": "example.org",
                                      "mail_host": "mail.example.org", "public_ipv4": "8.8.8.8",
                                      "dns_resolvers": "9.9.9.9"})
    # A reboot: new app, new browser session.
    app = make_app()
    second = https_client(app)
    unlock(second)
    with app.test_request_context():
        second_url = url_for(wizard.ordered(all_steps())[1].endpoint)
    assert second.get("/").headers["Location"].endswith(second_url)
    page = second.get("/setup/domain")
    assert "example.org" in page.text
    assert "mail.example.org" in page.text


@pytest.mark.parametrize("value", ["garbage", "", "eyJzZXR1cCI6dHJ1ZX0.bad.sig", "x" * 4000])
def test_malformed_session_cookie_is_no_session(client: FlaskClient, value: str) -> None:
    client.set_cookie(COOKIE, value, domain="localhost")
    response = client.get("/setup/domain")
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/setup/token")
    assert client.get("/setup/token").status_code == 200


def test_session_signed_with_another_key_is_no_session(app: Flask, client: FlaskClient) -> None:
    forged = URLSafeTimedSerializer("not-the-key", salt="cookie-session").dumps({"setup": True})
    client.set_cookie(COOKIE, forged, domain="localhost")
    assert client.get("/setup/domain").status_code == 302


def test_session_from_before_a_key_change_is_no_session(make_app: Callable[..., Flask], token_file: object) -> None:
    client = https_client(make_app(SECRET_KEY="a" * 40))
    unlock(client)
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None
    other = https_client(make_app(SECRET_KEY="b" * 40))
    other.set_cookie(COOKIE, cookie.value, domain="localhost")
    assert other.get("/setup/domain").status_code == 302


def test_wizard_page_says_when_the_agent_is_unavailable(unlocked: FlaskClient, thread_agent: Any) -> None:
    thread_agent.stop()
    page = unlocked.get("/setup/domain")
    assert page.status_code == 503
    assert "mailstead-agent" in page.text and "not answering" in page.text


def test_wizard_page_shows_agent_status(make_app: Callable[..., Flask], token_file: object,
                                        start_agent: Callable[..., object]) -> None:
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(token_file.parent)})  # type: ignore[attr-defined]
    client = https_client(make_app(AGENT_SOCKET=str(agent.socket)))  # type: ignore[attr-defined]
    unlock(client)
    page = client.get("/setup/domain")
    assert page.status_code == 200
    assert OS_PRETTY_NAME in page.text
    assert "unavailable: " in page.text  # docker engine: the test points it nowhere
    assert "0.1.0" in page.text
