"""App factory and configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask

from portal.web import config
from tests.conftest import REPO
from tests.unit.conftest import https_client


def test_import_touches_no_disk(tmp_path: Path) -> None:
    state = tmp_path / "state-not-created"
    env = {**os.environ, "MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_RUN_DIR": str(tmp_path / "run")}
    code = (
        "import portal, portal.web.config, portal.web.token, portal.web.wizard, portal.web.steps.domain, "
        "portal.agent.server, portal.agent.client, portal.agent.firstboot, portal.cli, portal.web.state, "
        "portal.core.store, portal.core.safefs"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, env=env, cwd=REPO)
    assert not state.exists()
    assert not (tmp_path / "run").exists()


def test_creating_app_creates_no_database(make_app: Callable[..., Flask], state_dir: Path) -> None:
    make_app(SECRET_KEY="k" * 40, AGENT_SOCKET="/nonexistent/agent.sock")
    assert list(state_dir.iterdir()) == []


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAILSTEAD_WEB_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("MAILSTEAD_RUN_DIR", str(tmp_path / "r"))
    cfg = config.build()
    assert cfg["SECRET_KEY_FILE"] == str(tmp_path / "w" / "secret_key")
    # The web process knows no path of the agent's state: it asks the agent.
    assert not any(k in cfg for k in ("STATE_DIR", "DB_PATH", "TOKEN_PATH"))
    assert cfg["AGENT_SOCKET"] == str(tmp_path / "r" / "agent.sock")
    assert cfg["RATELIMIT_STORAGE_URI"] == "memory://"


def test_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAILSTEAD_WEB_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("MAILSTEAD_AGENT_SOCKET", str(tmp_path / "env.sock"))
    cfg = config.build({"WEB_DIR": str(tmp_path / "mine")})
    assert cfg["WEB_DIR"] == str(tmp_path / "mine")
    assert cfg["SECRET_KEY_FILE"] == str(tmp_path / "mine" / "secret_key")
    assert cfg["AGENT_SOCKET"] == str(tmp_path / "env.sock")


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in config.ENV.values():
        monkeypatch.delenv(var, raising=False)
    cfg = config.build()
    assert cfg["SECRET_KEY_FILE"] == "/var/lib/mailstead-web/secret_key"
    assert cfg["AGENT_SOCKET"] == "/run/mailstead/agent.sock"


def test_session_cookie_settings(app: Flask) -> None:
    assert app.config["SESSION_COOKIE_SECURE"] is True
    assert app.config["SESSION_COOKIE_HTTPONLY"] is True
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Strict"
    assert app.config["PERMANENT_SESSION_LIFETIME"] == timedelta(minutes=30)


def test_secret_key_created_once_with_mode_0600(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    """The session key is in the web process's own folder, never in the agent's state."""
    first = make_app()
    web_dir = tmp_path / "web"
    key_file = web_dir / "secret_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert first.config["SECRET_KEY"] == key_file.read_text().strip()
    assert len(first.config["SECRET_KEY"]) >= 64
    second = make_app()
    assert second.config["SECRET_KEY"] == first.config["SECRET_KEY"]
    assert [p.name for p in web_dir.iterdir()] == ["secret_key"]  # no temp files left


def test_explicit_secret_key_writes_no_file(make_app: Callable[..., Flask], state_dir: Path) -> None:
    app = make_app(SECRET_KEY="s" * 40)
    assert app.config["SECRET_KEY"] == "s" * 40
    assert not (state_dir / "secret_key").exists()


def test_healthz_needs_no_session(app: Flask) -> None:
    response = https_client(app).get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"


def test_security_headers(app: Flask) -> None:
    response = https_client(app).get("/setup/token")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"


def test_static_css_is_served(app: Flask) -> None:
    response = https_client(app).get("/static/portal.css")
    assert response.status_code == 200
    assert "font-family" in response.text
    response.close()


def test_proxy_headers_are_honoured(app: Flask) -> None:
    seen: dict[str, str | None] = {}

    @app.after_request
    def capture(response):  # type: ignore[no-untyped-def]
        from flask import request

        seen["addr"], seen["scheme"] = request.remote_addr, request.scheme
        return response

    app.test_client().get(
        "/healthz", headers={"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}
    )
    assert seen == {"addr": "198.51.100.7", "scheme": "https"}


def test_unknown_page_is_a_friendly_404(app: Flask) -> None:
    response = https_client(app).get("/no-such-page")
    assert response.status_code == 404
    assert "There is no page at this address" in response.text
