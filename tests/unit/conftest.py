from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import Headers

from portal.web import create_app
from tests.conftest import TEST_TOKEN, csrf_token
from tests.support.agent import ThreadAgent

BASE = "https://localhost"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def token_file(state_dir: Path) -> Path:
    path = state_dir / "setup-token"
    path.write_text(TEST_TOKEN + "\n")
    path.chmod(0o400)
    return path


@pytest.fixture
def thread_agent(state_dir: Path, tmp_path: Path) -> Iterator[ThreadAgent]:
    """The agent for `state_dir`, in a thread of the test process."""
    run = tmp_path / "agent-run"
    run.mkdir()
    agent = ThreadAgent(state_dir, run / "agent.sock")
    yield agent
    agent.stop()


@pytest.fixture
def agent(state_dir: Path, start_agent: Callable[..., Any]) -> Any:
    """The agent for `state_dir` as the appliance runs it: its own process (see thread_agent
    for the faster one in a thread)."""
    return start_agent(env={"MAILSTEAD_STATE_DIR": str(state_dir)})


@pytest.fixture
def make_app(state_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Flask]:
    """make_app(**config) -> an app whose agent serves `state_dir` (a thread agent,
    unless the test gives its own AGENT_SOCKET)."""
    def make(**overrides: Any) -> Flask:
        if "AGENT_SOCKET" not in overrides:
            overrides["AGENT_SOCKET"] = str(request.getfixturevalue("thread_agent").socket)
        config = {
            "TESTING": True,
            "WEB_DIR": str(tmp_path / "web"),
            "TEST_STATE_DIR": str(state_dir),
            "RUN_DIR": str(tmp_path / "run"),
            **overrides,
        }
        return create_app(config)

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask], token_file: Path) -> Flask:
    return make_app()


class HttpsClient(FlaskClient):
    """Talks HTTPS with a same-origin Referer, as the browser does through nginx
    (Flask-WTF checks the Referer on HTTPS). A request's own Referer wins."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        headers = Headers(kwargs.pop("headers", None) or {})
        headers.setdefault("Referer", BASE + "/")
        if args and isinstance(args[0], str):
            kwargs.setdefault("base_url", BASE)
        return super().open(*args, headers=headers, **kwargs)


def https_client(app: Flask) -> FlaskClient:
    app.test_client_class = HttpsClient
    return app.test_client()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return https_client(app)


def unlock(client: FlaskClient, token: str = TEST_TOKEN) -> Any:
    """Pass the token gate; returns the POST response."""
    page = client.get("/setup/token")
    assert page.status_code == 200, page.text
    return client.post("/setup/token", data={"csrf_token": csrf_token(page.text), "token": token})


@pytest.fixture
def unlocked(client: FlaskClient) -> FlaskClient:
    response = unlock(client)
    assert response.status_code == 302, response.text
    return client


@pytest.fixture
def rig(make_app: Callable[..., Flask], token_file: Path, state_dir: Path,
        start_agent: Callable[..., Any]) -> Callable[..., Any]:
    """rig(state) -> an app in that state with a real agent and a client
    (states and helpers: tests/unit/test_fuzz_forms.py build_rig). The agent starts
    at the first call, with its scheduler only for the "maintenance" state."""
    from tests.unit.test_fuzz_forms import build_rig

    agents: list[Any] = []

    def make(state: str, **config: Any) -> Any:
        if not agents:
            env = {"MAILSTEAD_STATE_DIR": str(state_dir)}
            if state == "maintenance":
                env["MAILSTEAD_SCHEDULER"] = "1"
            agents.append(start_agent(env=env))
        return build_rig(state, make_app, state_dir, agents[0], **config)

    return make


@pytest.fixture(scope="session")
def feed_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real gpg signing key for update feeds (tests/support/feeds.py); its exported
    public keyring (the key's gpg home is the keyring's folder)."""
    from tests.support.feeds import make_key, stop_agent

    home = tmp_path_factory.mktemp("feed-key") / "home"
    try:
        yield make_key(home, "Mailstead test feed <feed@example.test>")
    finally:
        stop_agent(home)
