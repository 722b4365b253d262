"""Client for the agent socket: what the operation stubs (portal/agent/registry.py)
send their calls through, in the web process and the CLI.

`channel(timeout)` is the client for this process: inside a Flask app context the
app's AGENT_SOCKET, else the socket named by `use_socket` (the CLI's --socket) or
MAILSTEAD_AGENT_SOCKET, else /run/mailstead/agent.sock."""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from portal.core.errors import MailsteadError

MAX_RESPONSE = 1024 * 1024
DEFAULT_SOCKET = "/run/mailstead/agent.sock"


class AgentError(MailsteadError):
    """The agent refused or failed a call, or could not be reached: the error's
    code, field and message as the agent sent them."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, code=code)


_socket_override: str | None = None


def use_socket(path: str | None) -> None:
    """Send this process's calls to `path` (the CLI's --socket)."""
    global _socket_override
    _socket_override = path


def socket_path() -> str:
    flask = sys.modules.get("flask")
    if flask is not None and flask.has_app_context() and "AGENT_SOCKET" in flask.current_app.config:
        return str(flask.current_app.config["AGENT_SOCKET"])
    return _socket_override or os.environ.get("MAILSTEAD_AGENT_SOCKET") or DEFAULT_SOCKET


def channel(timeout: float) -> AgentClient:
    """The client this process talks to the agent with, waiting up to `timeout` s."""
    return AgentClient(socket_path(), timeout=timeout)


class AgentClient:
    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Run operation `op` with `args`; return its result or raise AgentError."""
        request = json.dumps({"op": op, "args": args}, separators=(",", ":")).encode() + b"\n"
        line = self._exchange(request)
        return self._parse(line)

    def _exchange(self, request: bytes) -> bytes:
        path = self.socket_path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(path)
                try:
                    sock.sendall(request)
                except BrokenPipeError:
                    pass  # the agent may have answered (and closed) already: read it
                with sock.makefile("rb") as reader:
                    return reader.readline(MAX_RESPONSE)
        except FileNotFoundError:
            raise AgentError("unavailable", f"no agent socket at {path}; is mailstead-agent running?") from None
        except ConnectionRefusedError:
            raise AgentError("unavailable", f"nothing listens on {path}; is mailstead-agent running?") from None
        except PermissionError:
            raise AgentError("unavailable", f"no permission to connect to {path}") from None
        except TimeoutError:
            raise AgentError("timeout", f"the agent did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise AgentError("unavailable", f"cannot talk to the agent at {path}: {exc.strerror or exc}") from None

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        if not line:
            raise AgentError("bad_response", "the agent closed the connection without answering")
        try:
            response = json.loads(line)
        except ValueError:
            raise AgentError("bad_response", "the agent sent an answer that is not JSON") from None
        if not isinstance(response, dict):
            raise AgentError("bad_response", "the agent sent an answer that is not a JSON object")
        if response.get("ok") is True:
            result = response.get("result")
            return result if isinstance(result, dict) else {"value": result}
        err = response.get("error") or {}
        field = err.get("field")
        raise AgentError(str(err.get("code", "error")), str(err.get("message", "the agent refused the call")),
                         field if isinstance(field, str) and field else None)
