"""portal.dns.privileged called as the agent does (registry + argument checks), state in a tmp dir."""

from __future__ import annotations

import base64
import json
import sqlite3
import stat
from pathlib import Path

import pytest

from portal.agent.registry import REGISTRY, Context, OpError
from portal.dns import privileged as agentops
from tests.support.statedb import read_settings as read_settings_table

SECRET = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "state.db") as c:
        c.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        # public addresses as data only (never contacted); production rules apply: global addresses
        c.executemany("INSERT INTO settings VALUES (?, ?)",
                      [("domain", "example.org"), ("public_ipv4", "9.9.9.10")])
    return Context(state_dir=state)


def test_registered() -> None:
    for name in ("dns_records", "dns_check", "dns_push", "dns_configure_push", "net_check"):
        assert REGISTRY[name].func.__module__ == agentops.__name__


def call(ctx: Context, name: str, **args: object) -> dict:
    result = REGISTRY[name].run_checked(ctx, args)
    json.dumps(result)  # JSON-able
    return result


def test_dns_records(ctx: Context) -> None:
    result = call(ctx, "dns_records")
    assert result["domain"] == "example.org"
    assert any(line.split()[:4] == ["@", "IN", "MX", "10"] for line in result["zone"].splitlines())
    types = {(row["name"], row["type"]) for row in result["table"]}
    assert ("mailstead-rsa._domainkey.example.org", "TXT") in types and ("example.org", "MX") in types
    assert (ctx.state_dir / "secrets" / "dkim" / "mailstead-rsa.key").exists()  # keys made on demand
    assert "mx: mail.example.org" in result["mta_sts_policy"]
    assert any("TLSA" in note for note in result["notes"])


def test_private_public_ip_refused(ctx: Context) -> None:
    with sqlite3.connect(ctx.state_dir / "state.db") as c:
        c.execute("UPDATE settings SET value='10.0.0.5' WHERE key='public_ipv4'")
    with pytest.raises(OpError) as err:
        call(ctx, "dns_records")
    assert err.value.code == "invalid" and "public_ipv4" in str(err.value)


def test_configure_push_stores_secret_privately(ctx: Context) -> None:
    result = call(ctx, "dns_configure_push", server="127.0.0.1", key_name="Mailstead-Key", secret=SECRET,
                  algorithm="hmac-sha512", port=5353)
    assert SECRET not in json.dumps(result)
    path = ctx.state_dir / "secrets" / "rfc2136.key"
    assert path.read_text().strip() == SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    values = read_settings_table(ctx.state_dir / "state.db")
    assert (values["rfc2136_server"], values["rfc2136_port"], values["rfc2136_key_name"],
            values["rfc2136_algorithm"]) == ("127.0.0.1", "5353", "mailstead-key", "hmac-sha512")
    assert SECRET not in json.dumps(values)


@pytest.mark.parametrize(("args", "field"), [
    ({"secret": "not base64!"}, "rfc2136_secret"),
    ({"algorithm": "hmac-md5"}, "rfc2136_algorithm"),
    ({"key_name": ""}, "rfc2136_key_name"),
    ({"server": "not a host"}, "rfc2136_server"),
    ({"port": 0}, "rfc2136_port"),
])
def test_configure_push_refuses(ctx: Context, args: dict, field: str) -> None:
    full = {"server": "ns.example.net", "key_name": "k", "secret": SECRET, **args}
    with pytest.raises(OpError) as err:
        call(ctx, "dns_configure_push", **full)
    assert err.value.code == "invalid" and field in str(err.value)
    assert full["secret"] not in str(err.value)
    assert not (ctx.state_dir / "secrets" / "rfc2136.key").exists()


def test_push_not_configured(ctx: Context) -> None:
    with pytest.raises(OpError) as err:
        call(ctx, "dns_push", dry_run=True)
    assert err.value.code == "not_configured" and "dns_configure_push" in str(err.value)


def test_check_needs_resolvers(ctx: Context) -> None:
    with pytest.raises(OpError) as err:
        call(ctx, "dns_check")
    assert "dns_resolvers" in str(err.value)


def test_argument_types_checked(ctx: Context) -> None:
    with pytest.raises(OpError) as err:
        call(ctx, "dns_push", dry_run="yes")
    assert err.value.code == "bad_args"


# -- net_check: port 25 of a public mail server, ok or not, never the banner ---------------

@pytest.mark.parametrize("host, words", [
    ("127.0.0.1", "127.0.0.1 is a loopback address"),
    ("10.0.0.1", "10.0.0.1 is a private address"),
    ("169.254.169.254", "169.254.169.254 is a link-local address"),
    ("::1", "::1 is a loopback address"),
    ("localhost", "'localhost' is not a host name"),
    ("mx.example.net:2525", "'mx.example.net:2525' is not a host name"),
    ("mx example.net", "is not a host name"),
])
def test_net_check_greets_no_local_address_and_no_other_port(ctx: Context, host: str, words: str) -> None:
    with sqlite3.connect(ctx.state_dir / "state.db") as c:  # configured: only the host can be refused
        c.execute("INSERT INTO settings VALUES ('dns_resolvers', '127.0.0.1')")
    with pytest.raises(OpError) as err:
        call(ctx, "net_check", smtp_host=host, timeout=1.0)
    assert err.value.code == "invalid" and err.value.field == "smtp_host" and words in err.value.message
    with pytest.raises(OpError) as err:  # the port is not an argument any more: always 25
        REGISTRY["net_check"].run_checked(ctx, {"smtp_port": 22})
    assert err.value.code == "bad_args" and "smtp_port" in err.value.message


def test_a_name_that_resolves_to_this_machine_is_not_greeted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name whose DNS points at a local address is refused before any connection."""
    import socket

    from portal.dns.netcheck import smtp_outbound_check

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **kw: real(
        "127.0.0.1" if host == "mx.attacker.example" else host, port, *a, **kw))
    connected = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **kw: connected.append(a) or (_ for _ in ()).throw(OSError()))
    result = smtp_outbound_check("mx.attacker.example", timeout=1.0)
    assert result.status == "error" and "resolves to 127.0.0.1, a loopback address" in result.message
    assert connected == []


def test_the_greeting_says_ok_or_not_and_never_returns_what_the_server_said() -> None:
    import socketserver
    import threading

    from portal.dns.netcheck import smtp_outbound_check

    said = {"text": b"220 internal-db.corp ESMTP secret-version-4.2\r\n"}

    class Greeter(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(said["text"])

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            port = server.server_address[1]
            ok = smtp_outbound_check("127.0.0.1", timeout=2, port=port, allow_private=True)
            assert ok.status == "ok" and ok.message == f"outbound port {port} is open (127.0.0.1 greets with 220)"
            said["text"] = b"SSH-2.0-OpenSSH_9.2p1 internal\r\n"
            other = smtp_outbound_check("127.0.0.1", timeout=2, port=port, allow_private=True)
            assert other.status == "error" and "not with an SMTP greeting" in other.message
            for result in (ok, other):
                assert "secret" not in str(result.as_dict()) and "OpenSSH" not in str(result.as_dict())
            refused = smtp_outbound_check("127.0.0.1", timeout=2, port=port)  # by default: no local address
            assert refused.status == "error" and "loopback address" in refused.message
        finally:
            server.shutdown()
