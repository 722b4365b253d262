"""An agent for the tests: the real server and registry, in a thread of the test
process (fast: no interpreter start), with its socket and state in a folder of the
test's. For a separate process (the way the appliance runs it) use
tests.conftest.launch_agent / the `start_agent` fixture.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from portal.agent.client import AgentClient
from portal.agent.registry import Context, docker_factory
from portal.agent.server import AgentServer
from tests.support.smtp import send_to_smtp_port

OS_PRETTY_NAME = "Mailstead Test OS 1.0 (pytest)"


class ThreadAgent:
    """mailstead-agent serving `state_dir` on `socket` from a thread (no docker engine,
    no scheduler). `web_uids` makes those callers web callers (declared web ops only)."""

    def __init__(self, state_dir: Path, socket: Path, *, web_uids: tuple[int, ...] = (),
                 root_uids: tuple[int, ...] | None = None, **ctx: Any) -> None:
        self.state_dir, self.socket = Path(state_dir), Path(socket)
        os_release = self.socket.parent / "os-release"
        os_release.write_text(f'NAME="Mailstead Test"\nPRETTY_NAME="{OS_PRETTY_NAME}"\n')
        # No docker: the appliance's own mail goes over SMTP to the stack's smtp port
        # (an SmtpSink there, or nothing: "connection refused").
        self.ctx = Context(state_dir=self.state_dir, os_release=os_release,
                           docker=docker_factory(f"unix://{self.socket.parent}/no-docker.sock"),
                           send_mail=send_to_smtp_port)
        for key, value in ctx.items():
            setattr(self.ctx, key, value)
        roots = (os.getuid(),) if root_uids is None else root_uids
        self.server = AgentServer(str(self.socket), self.ctx, roots, conn_timeout=5, web_uids=web_uids)
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-agent", daemon=True)
        self.thread.start()

    def client(self, timeout: float = 10.0) -> AgentClient:
        return AgentClient(str(self.socket), timeout=timeout)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        return self.client().call(op, **args)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.socket.unlink(missing_ok=True)
