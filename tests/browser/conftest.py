"""Browser tests: Debian's chromium (never `playwright install`) against a real
gunicorn serving HTTPS on loopback, with a real agent behind it."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from portal.agent.firstboot import make_certificate
from tests.conftest import REPO, TEST_TOKEN, free_port, launch_agent, launch_gunicorn, retry, stop_process

ARTIFACTS = REPO / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        ],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    # The portal's certificate is self-signed, as the appliance's bootstrap one is.
    return {**browser_context_args, "ignore_https_errors": True, "viewport": {"width": 1100, "height": 760}}


@dataclass
class Portal:
    url: str
    state_dir: Path
    token: str


@contextlib.contextmanager
def running_portal(root: Path) -> Iterator[Portal]:
    """gunicorn (TLS, loopback) and an agent sharing the state folder root/state,
    with a fresh setup token; no docker (the agent's docker socket does not exist)."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    state, run = root / "state", root / "run"
    state.mkdir()
    run.mkdir()
    (state / "setup-token").write_text(TEST_TOKEN + "\n")
    from tests.support import statedb as db

    db.write_settings(state / "state.db", {"dns_allow_private": "1"})  # loopback stands in for the internet

    cert_pem, key_pem = make_certificate("localhost", [ipaddress.ip_address("127.0.0.1")],
                                         now=dt.datetime.now(dt.timezone.utc))
    cert, key = root / "tls.crt", root / "tls.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)

    agent = launch_agent(run, env={"MAILSTEAD_STATE_DIR": str(state)})

    port = free_port()
    env = {**os.environ, "MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_RUN_DIR": str(run),
           "MAILSTEAD_AGENT_SOCKET": str(agent.socket)}
    web_log = root / "gunicorn.log"
    web = launch_gunicorn("--bind", f"127.0.0.1:{port}", "--certfile", str(cert), "--keyfile", str(key),
                          env=env, log=web_log)
    url = f"https://127.0.0.1:{port}"
    try:
        def healthy() -> None:
            if web.poll() is not None:
                raise AssertionError(f"gunicorn exited: {web_log.read_text()}")
            with requests.get(f"{url}/healthz", verify=str(cert), timeout=2) as r:
                r.raise_for_status()

        retry(healthy, 30, f"gunicorn at {url}")
        yield Portal(url=url, state_dir=state, token=TEST_TOKEN)
    finally:
        stop_process(web)
        agent.stop()
        print(f"gunicorn log ({web_log}):\n{web_log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def portal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    with running_portal(tmp_path_factory.mktemp("portal")) as portal:
        yield portal


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
