"""recipes/radicale/templates/mailstead_dovecot_auth.py: radicale's login against
dovecot's auth service, with a stand-in dovecot on a socketpair (no network) and
the two radicale names the plugin uses stubbed (radicale is not in the test venv;
the integration tier runs the plugin in the real container)."""

from __future__ import annotations

import base64
import importlib.util
import logging
import re
import socket
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "recipes" / "radicale" / "templates" / "mailstead_dovecot_auth.py"
USERS = {"alice@example.org": "alice's password"}


@dataclass
class FakeDovecot:
    """Answers like dovecot's auth service: `pipelined` as 2.3 did, else as 2.4
    (VERSION only, the rest after the client's VERSION)."""

    pipelined: bool = False
    mechanisms: tuple[bytes, ...] = (b"PLAIN", b"LOGIN")
    hang_up_after_version: bool = False
    connections: int = 0
    auth_lines: list[list[bytes]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        assert address == ("dovecot", 12345)
        client, server = socket.socketpair()
        client.settimeout(timeout)
        self.connections += 1
        thread = threading.Thread(target=self.serve, args=(server,))
        thread.start()
        self.threads.append(thread)
        return client

    def serve(self, sock: socket.socket) -> None:
        with sock, sock.makefile("rb") as reader:
            sock.sendall(b"VERSION\t1\t3\n")
            if self.hang_up_after_version:
                return
            if not self.pipelined:
                assert reader.readline().startswith(b"VERSION\t1\t")
                assert reader.readline().startswith(b"CPID\t")
            mechs = b"".join(b"MECH\t%s\tplaintext\n" % m for m in self.mechanisms)
            sock.sendall(mechs + b"SPID\t7\nCUID\t1\nCOOKIE\t00ff\nDONE\n")
            if self.pipelined:
                assert reader.readline().startswith(b"VERSION\t1\t")
                assert reader.readline().startswith(b"CPID\t")
            line = reader.readline()
            if not line:
                return
            fields = line.rstrip(b"\n").split(b"\t")
            self.auth_lines.append(fields)
            assert fields[0] == b"AUTH" and fields[2] == b"PLAIN"
            params = dict(f.split(b"=", 1) if b"=" in f else (f, b"") for f in fields[3:])
            _authz, login, password = base64.b64decode(params[b"resp"]).split(b"\0")
            user = login.decode().lower()
            if USERS.get(user) == password.decode():
                sock.sendall(b"OK\t%s\tuser=%s\n" % (fields[1], user.encode()))
            else:
                sock.sendall(b"FAIL\t%s\tuser=%s\n" % (fields[1], user.encode()))

    def join(self) -> None:
        for thread in self.threads:
            thread.join(5)


class Config:
    def get(self, section: str, option: str) -> object:
        return {("auth", "dovecot_host"): "dovecot", ("auth", "dovecot_port"): 12345}[(section, option)]


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    radicale, auth, log = (types.ModuleType(n) for n in ("radicale", "radicale.auth", "radicale.log"))

    class BaseAuth:
        def __init__(self, configuration: object) -> None:
            self.configuration = configuration

    auth.BaseAuth = BaseAuth  # type: ignore[attr-defined]
    log.logger = logging.getLogger("radicale")  # type: ignore[attr-defined]
    radicale.auth, radicale.log = auth, log  # type: ignore[attr-defined]
    for name, module in (("radicale", radicale), ("radicale.auth", auth), ("radicale.log", log)):
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("mailstead_dovecot_auth", PLUGIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dovecot(monkeypatch: pytest.MonkeyPatch) -> FakeDovecot:
    fake = FakeDovecot()
    monkeypatch.setattr(socket, "create_connection", fake.connect)
    yield fake
    fake.join()


def login(plugin: types.ModuleType, user: str, password: str, environ: dict | None = None,
          auth: object | None = None) -> str:
    auth = auth or plugin.Auth(Config())
    assert auth.get_external_login(environ or {"REMOTE_ADDR": "172.18.0.1"}) == ()
    return auth._login(user, password)


@pytest.mark.parametrize("pipelined", [False, True], ids=["dovecot-2.4", "dovecot-2.3"])
def test_good_password_logs_in_as_dovecots_user(plugin, dovecot, pipelined):
    dovecot.pipelined = pipelined
    assert login(plugin, "Alice@Example.org", USERS["alice@example.org"]) == "alice@example.org"
    fields = dovecot.auth_lines[0]
    assert b"service=radicale" in fields and b"secured" in fields


def test_wrong_password_and_unknown_user_fail(plugin, dovecot):
    assert login(plugin, "alice@example.org", "not it") == ""
    assert login(plugin, "nobody@example.org", "whatever") == ""
    assert dovecot.connections == 2


def test_client_address_comes_from_nginx_header(plugin, dovecot):
    auth = plugin.Auth(Config())
    login(plugin, "alice@example.org", "x", {"HTTP_X_FORWARDED_FOR": "203.0.113.7", "REMOTE_ADDR": "172.18.0.1"},
          auth)
    login(plugin, "alice@example.org", "y", {"HTTP_X_FORWARDED_FOR": "a\tb", "REMOTE_ADDR": "172.18.0.1"}, auth)
    login(plugin, "alice@example.org", "z", {"HTTP_X_FORWARDED_FOR": "2001:db8::1"}, auth)
    rips = [[f for f in fields if f.startswith(b"rip=")] for fields in dovecot.auth_lines]
    assert rips == [[b"rip=203.0.113.7"], [b"rip=172.18.0.1"], [b"rip=2001:db8::1"]]


def test_success_is_remembered_briefly_failure_is_not(plugin, dovecot, monkeypatch):
    auth = plugin.Auth(Config())
    good = USERS["alice@example.org"]
    assert login(plugin, "alice@example.org", good, auth=auth) == "alice@example.org"
    assert login(plugin, "alice@example.org", good, auth=auth) == "alice@example.org"
    assert dovecot.connections == 1
    assert login(plugin, "alice@example.org", "wrong", auth=auth) == ""
    assert login(plugin, "alice@example.org", "wrong", auth=auth) == ""
    assert dovecot.connections == 3
    now = plugin.time.monotonic()
    monkeypatch.setattr(plugin.time, "monotonic", lambda: now + plugin.CACHE_SECONDS + 1)
    assert login(plugin, "alice@example.org", good, auth=auth) == "alice@example.org"
    assert dovecot.connections == 4


@pytest.mark.parametrize("user, password", [
    ("", "x"), ("alice@example.org", ""), ("alice\t@example.org", "x"), ("alice@example.org\n", "x"),
    ("alice@example.org", "pass\0word"),
])
def test_impossible_logins_never_reach_dovecot(plugin, dovecot, user, password):
    assert login(plugin, user, password) == ""
    assert dovecot.connections == 0


def test_broken_or_missing_dovecot_is_a_failed_login_and_a_log_line(plugin, dovecot, monkeypatch, caplog):
    dovecot.hang_up_after_version = True
    assert login(plugin, "alice@example.org", USERS["alice@example.org"]) == ""
    dovecot.hang_up_after_version = False
    dovecot.mechanisms = (b"LOGIN",)
    assert login(plugin, "alice@example.org", USERS["alice@example.org"]) == ""

    def refused(address: tuple[str, int], timeout: float) -> socket.socket:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    assert login(plugin, "alice@example.org", USERS["alice@example.org"]) == ""
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("dovecot:12345" in e for e in errors), errors
    # The hang-up shows as whichever the client meets first: EOF, or a write into a closed socket.
    assert re.search("connection closed|Broken pipe|Connection reset", errors[0]), errors[0]
    assert "PLAIN" in errors[1] and "refused" in errors[2]
    assert not any(USERS["alice@example.org"] in r.getMessage() for r in caplog.records)
