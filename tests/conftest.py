"""Fixtures and helpers shared by the unit, integration and browser tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from mailstead_vm import free_port  # noqa: E402  (re-exported for the tiers' fixtures)
TEST_TOKEN = "test-setup-token-0123456789abcdefghijklmnopqrstuvwx"
OS_PRETTY_NAME = "Mailstead Test OS 1.0 (pytest)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "browser" in parts:
            item.add_marker(pytest.mark.browser)


def retry(fn: Callable[[], object], timeout: float, what: str) -> object:
    """Call fn until it returns without raising; fail with the last error after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported below
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; last error: {exc!r}") from exc
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """Terminate a server the tests started; kill it if it does not exit in time."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_gunicorn(*bind: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """gunicorn serving portal.web.wsgi:app as mailstead-web does (one worker, four threads).

    `bind` gives the listener (`--bind ...`, plus `--certfile`/`--keyfile` for https).
    The caller waits for it to answer and stops it (stop_process). The web's own folder
    (its session key) is next to the log unless `env` names one: never the host's."""
    env = {"MAILSTEAD_WEB_DIR": str(log.parent / "web"), **env}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *bind,
             "--workers", "1", "--threads", "4", "--access-logfile", "-", "portal.web.wsgi:app"],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)  # fmt: skip


@dataclass
class AgentProcess:
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        stop_process(self.proc)
        return self.proc.returncode


def connectable(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))


def launch_agent(directory: Path, *extra: str, allow_uid: int | None = None,
                 env: dict[str, str] | None = None, mail_to_smtp_port: bool = False) -> AgentProcess:
    """Start `python -m portal.agent.server` with its socket, log and os-release in
    `directory`; return once the socket accepts connections. The caller stops it.
    `mail_to_smtp_port`: the appliance's own mail goes to the stack settings' smtp port
    (tests/support/agent_main.py), where a test's SmtpSink catches it."""
    os_release = directory / "os-release"
    os_release.write_text(f'NAME="Mailstead Test"\nPRETTY_NAME="{OS_PRETTY_NAME}"\n')
    sock, log = directory / "agent.sock", directory / "agent.log"
    args = [
        sys.executable, "-m", "tests.support.agent_main" if mail_to_smtp_port else "portal.agent.server",
        "--socket", str(sock),
        "--allow-uid", str(os.getuid() if allow_uid is None else allow_uid),
        "--os-release", str(os_release),
        # No docker engine is needed: this socket never exists.
        "--docker-host", f"unix://{directory}/no-docker.sock",
        "--timeout", "5",
        *extra,
    ]
    with open(log, "wb") as log_file:
        # The scheduler only where a test asks for it (MAILSTEAD_SCHEDULER=1): it writes to the state dir.
        # Never the host's /var/lib/mailstead: a state folder of the test's unless it gives one.
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "MAILSTEAD_SCHEDULER": "0",
                                     "MAILSTEAD_STATE_DIR": str(directory / "state"), **(env or {})})
    agent = AgentProcess(sock, proc, log)

    def up() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}: {agent.log_text()}")
        connectable(sock)

    try:
        retry(up, 15, f"agent socket {sock}")
    except BaseException:
        agent.stop()
        raise
    return agent


@pytest.fixture
def start_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., AgentProcess]]:
    """Start an agent (see launch_agent) in a fresh temporary directory; stopped at teardown."""
    started: list[AgentProcess] = []

    def start(*extra: str, allow_uid: int | None = None, env: dict[str, str] | None = None,
              mail_to_smtp_port: bool = False) -> AgentProcess:
        agent = launch_agent(tmp_path_factory.mktemp("agent"), *extra, allow_uid=allow_uid, env=env,
                             mail_to_smtp_port=mail_to_smtp_port)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html)
    assert match, f"no csrf_token field in page:\n{html[:2000]}"
    return match.group(1)
