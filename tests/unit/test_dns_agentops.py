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
