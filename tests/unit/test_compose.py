"""The compose file is built from checked values through a YAML serializer: a hostile
value for any setting is either refused naming that setting, or the rendered compose
parses to exactly the expected services, mounts, ports and privileges.

(The review that led here rendered `fe80::1%]\\n  privileged: true` from dns_servers
into every service, and a tls_cert of '/:/host #' into a bind mount of the host's /.)
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from portal.core import store
from portal.core.errors import MailsteadError
from portal.core.settings import SETTINGS, SettingsError
from portal.stack.render import render
from portal.stack.settings import SERVICES
from portal.stack.store import load_settings

BASE = {"domain": "example.org", "mail_host": "mail.example.org", "public_ipv4": "192.0.2.10",
        "dns_resolvers": "192.0.2.53"}
SECRETS = {"redis_password": "r" * 32, "rspamd_controller_password": "c" * 32}
HOSTILE_PARTS = ["\n", "\r\n", "\x00", "#", "%", ":", "..", "/", "]", "[", "'", '"', "{", "}", "&", "*", "!",
                 " ", "\t", "\\", "privileged: true", "  pid: host", "/:/host", ":ro #", "fe80::1%", "0.0.0.0",
                 "::1", "127.0.0.1", "${HOME}", "$(id)", "`id`", "\u202e", "é", "x" * 300]
# Per service: the only keys it may have (no depends_on: all start at once), and what its capabilities are.
ALLOWED_KEYS = {"restart", "networks", "dns", "logging", "image", "container_name", "hostname", "entrypoint",
                "ports", "volumes", "tmpfs", "healthcheck", "cap_drop", "cap_add", "security_opt",
                "user", "sysctls"}
CAPS = {"postfix": None, "dovecot": None, "rspamd": ["CHOWN", "KILL", "SETUID", "SETGID"], "redis": None,
        "radicale": ["CHOWN", "DAC_READ_SEARCH", "SETUID", "SETGID"], "unbound": None}
MOUNT_TARGETS = {
    "postfix": {"/etc/mailstead/postfix", "/var/spool/postfix", "/var/lib/mailstead-accounts", "/etc/mailstead/tls",
                "/etc/mailstead/tls/cert.pem", "/etc/mailstead/tls/key.pem"},
    "dovecot": {"/etc/mailstead/dovecot", "/var/mail", "/var/lib/mailstead-accounts", "/etc/mailstead/tls",
                "/etc/mailstead/tls/cert.pem", "/etc/mailstead/tls/key.pem"},
    "rspamd": {"/etc/mailstead/rspamd", "/var/lib/rspamd", "/run/mailstead-dkim"},
    "redis": {"/etc/mailstead/redis", "/var/lib/redis"},
    "radicale": {"/etc/mailstead/radicale", "/var/lib/radicale/collections"},
    "unbound": {"/etc/mailstead/unbound"},
}

hostile = st.one_of(
    st.lists(st.sampled_from(HOSTILE_PARTS), min_size=1, max_size=6).map("".join),
    st.tuples(st.sampled_from(["example.org", "192.0.2.1", "/var/lib/mailstead/tls/x.pem", "25", "mailstead"]),
              st.lists(st.sampled_from(HOSTILE_PARTS), min_size=1, max_size=3).map("".join)).map("".join),
    st.text(max_size=40),
    st.just("x" * 5000),
)


def fresh(state: Path) -> None:
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    store.write_settings(state, BASE)


def check_compose(state: Path) -> None:
    """The rendered compose parses to exactly the expected shape."""
    s = load_settings(state)
    files = render(s, SECRETS)
    for name, f in files.items():
        text = f.content.decode("utf-8")
        assert "\x00" not in text, name
    spec = yaml.safe_load(files["compose.yaml"].content)
    assert set(spec) == {"name", "networks", "volumes", "services"}
    assert set(spec["services"]) == set(SERVICES)
    assert set(spec["volumes"]) == {"mail", "spool", "rspamd", "redis", "dav"}
    assert spec["networks"] == {"mailstead": {"name": spec["name"], "ipam": {"config": [
        {"subnet": s.subnet, "ip_range": s.dynamic_range}]}}}
    addresses = set(s.publish_addresses)
    for name, svc in spec["services"].items():
        assert set(svc) <= ALLOWED_KEYS, (name, set(svc) - ALLOWED_KEYS)
        fixed = {"unbound": s.resolver_address, "dovecot": s.dovecot_address}
        assert svc["networks"] == ({"mailstead": {"ipv4_address": fixed[name]}} if name in fixed else ["mailstead"])
        assert svc["container_name"] == f"{spec['name']}-{name}"
        assert svc["dns"] == [s.resolver_address]
        assert svc.get("sysctls", {}) == ({"net.ipv4.ip_unprivileged_port_start": 53} if name == "unbound" else {})
        assert svc.get("cap_add") == CAPS[name], name
        assert "privileged" not in svc and "pid" not in svc and "network_mode" not in svc
        for mount in svc["volumes"]:
            assert mount["target"] in MOUNT_TARGETS[name], (name, mount)
            if mount["type"] == "bind":
                assert mount.get("read_only") is True, (name, mount)
                source = mount["source"]
                assert source.startswith("./") or Path(source).is_relative_to(state) or source in (
                    str(s.tls_cert), str(s.tls_key)), (name, source)
                assert ":" not in source and "\n" not in source
            else:
                assert mount["type"] == "volume" and mount["source"] in spec["volumes"]
        for port in svc.get("ports", []):
            assert set(port) == {"target", "published", "host_ip", "protocol"}
            assert port["published"].isdigit() and port["protocol"] == "tcp"
            assert port["host_ip"] in (addresses if name != "radicale" else {"127.0.0.1"})


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_a_hostile_value_is_refused_naming_the_setting_or_renders_safely(key: str, tmp_path: Path) -> None:
    state = tmp_path / "state"

    @hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(value=hostile)
    def check(value: str) -> None:
        fresh(state)
        # Through the agent's store: refused naming the key, or stored normalized.
        try:
            store.write_settings(state, {key: value})
        except SettingsError as err:
            assert err.field == key, (key, value, err)
        else:
            try:
                check_compose(state)
            except MailsteadError as err:  # a finer rule where the value is used: still named
                assert err.field in (key, "hostname" if key == "mail_host" else key), (key, value, err)
        # Written behind the agent's back (a damaged file, an old backup): refused where used.
        fresh(state)
        with sqlite3.connect(state / "state.db") as conn:
            conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
        try:
            check_compose(state)
        except MailsteadError as err:
            assert err.field in (key, "domain", "hostname", "mail_host"), (key, value, err)

    check()


@pytest.mark.parametrize("key, value", [
    ("dns_servers", "fe80::1%]\n  privileged: true\n  pid: host"),
    ("publish_addresses", "fe80::1%]\n  privileged: true"),
    ("tls_cert", "/x:/usr/bin/tini:ro #"),
    ("tls_key", "/:/host #"),
    ("stack_project", "mailstead\n  privileged: true"),
    ("stack_ports", json.dumps({"smtp": "25\n  privileged: true"})),
])
def test_the_reviewed_attacks_are_refused_naming_the_setting(key: str, value: str, tmp_path: Path) -> None:
    fresh(tmp_path)
    with pytest.raises(SettingsError) as err:
        store.write_settings(tmp_path, {key: value})
    assert err.value.field == key
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
    with pytest.raises(SettingsError) as err:
        load_settings(tmp_path)
    assert err.value.field == key and "set it again" in err.value.message


def test_the_compose_file_is_yaml_from_a_serializer(tmp_path: Path) -> None:
    fresh(tmp_path)
    store.write_settings(tmp_path, {"publish_addresses": "127.0.0.1,::1", "dns_servers": "192.0.2.53"})
    check_compose(tmp_path)
    text = render(load_settings(tmp_path), SECRETS)["compose.yaml"].content.decode()
    assert text.startswith("# Mailstead mail stack ") and "&id" not in text and "*id" not in text
    assert not (Path(__file__).resolve().parents[2] / "recipes" / "compose.yaml.j2").exists()


def test_the_stack_resolver_and_dovecot_sit_at_fixed_addresses_outside_dockers_range(tmp_path: Path) -> None:
    fresh(tmp_path)
    store.write_settings(tmp_path, {"stack_subnet": "10.77.0.0/16", "dns_servers": "192.0.2.53, 198.51.100.53"})
    s = load_settings(tmp_path)
    assert (s.subnet, s.dynamic_range, s.resolver_address) == ("10.77.0.0/16", "10.77.0.0/17", "10.77.255.254")
    assert s.dovecot_address == "10.77.255.253"
    check_compose(tmp_path)
    files = render(s, SECRETS)
    unbound = files["unbound/unbound.conf"].content.decode()
    assert "interface: 10.77.255.254\n" in unbound and "access-control: 10.77.0.0/16 allow\n" in unbound
    assert [line.strip() for line in unbound.splitlines() if "forward-addr" in line] == [
        "forward-addr: 192.0.2.53", "forward-addr: 198.51.100.53"]
    assert 'nameserver = ["10.77.255.254:53"];' in files["rspamd/override.d/options.inc"].content.decode()
    # What dovecot's sieve sends: postfix relays it for dovecot's address alone, and
    # rspamd takes it as local mail (signs it), as it does no other stack address.
    assert 'local_addrs = ["127.0.0.0/8", "::1", "10.77.255.253/32"];' in (
        files["rspamd/override.d/options.inc"].content.decode())
    assert "\nmailstead_sieve_clients = 10.77.255.253/32\n" in files["postfix/main.cf"].content.decode()
    assert "submission_host = postfix:10025\n" in files["dovecot/dovecot.conf"].content.decode()
    # No forwarders: unbound resolves from the root itself.
    store.write_settings(tmp_path, {"dns_servers": ""})
    assert "forward-zone" not in render(load_settings(tmp_path), SECRETS)["unbound/unbound.conf"].content.decode()


@pytest.mark.parametrize("value, hint", [
    ("8.8.8.0/24", "private IPv4 network"), ("172.31.53.1/24", "host part all zeros"),
    ("10.0.0.0/8", "/16 to /26"), ("10.0.0.0/27", "/16 to /26"), ("fd00::/64", "private IPv4 network"),
    ("127.0.0.0/16", "private IPv4 network"), ("10.1.0.0/255.255.0.0", "write it as 10.1.0.0/16"),
])
def test_a_bad_stack_subnet_is_refused_naming_the_fix(value: str, hint: str, tmp_path: Path) -> None:
    fresh(tmp_path)
    with pytest.raises(SettingsError) as err:
        store.write_settings(tmp_path, {"stack_subnet": value})
    assert err.value.field == "stack_subnet" and hint in err.value.message


def test_dns_servers_are_ipv4_while_the_stack_network_is(tmp_path: Path) -> None:
    fresh(tmp_path)
    with pytest.raises(SettingsError) as err:
        store.write_settings(tmp_path, {"dns_servers": "192.0.2.53, 2001:db8::53"})
    assert err.value.field == "dns_servers" and "IPv4" in err.value.message


class Engine:
    """What the docker SDK's client.version() answers (only the field the deploy reads)."""

    def __init__(self, api: object) -> None:
        self.api = api

    def version(self) -> dict[str, object]:
        if isinstance(self.api, Exception):
            raise self.api
        return {"ApiVersion": self.api}


@pytest.mark.parametrize("api, expected", [
    ("1.44", True), ("1.45", True), ("1.50", True), ("2.0", True),
    ("1.41", False), ("1.43", False), ("", False), (None, False), ("one", False),
    (ConnectionError("engine gone"), False),
])
def test_the_deploy_knows_whether_the_engine_paces_starting_checks(api: object, expected: bool) -> None:
    from portal.stack.deploy import engine_start_interval

    assert engine_start_interval(Engine(api)) is expected


def test_healthy_services_are_checked_once_a_minute_where_the_engine_paces_starting_checks(
        tmp_path: Path) -> None:
    from dataclasses import replace

    fresh(tmp_path)
    settings = load_settings(tmp_path)

    def checks(s: object) -> dict[str, dict[str, object]]:
        doc = yaml.safe_load(render(s, SECRETS)["compose.yaml"].content)
        return {name: svc["healthcheck"] for name, svc in doc["services"].items()}

    # Older engines: their first check waits a whole interval, so every check is 5 s apart.
    old = checks(settings)
    assert {(c["interval"], c["retries"]) for c in old.values()} == {("5s", 5)}, old
    # docker 25+: starting services every 5 s (a start interval, named: docker 26 takes an
    # unset one as the interval), then once a minute.
    new = checks(replace(settings, engine_start_interval=True))
    assert {(c["interval"], c["start_interval"], c["retries"]) for c in new.values()} == {("60s", "5s", 3)}, new
    assert all("start_interval" not in c for c in old.values()), old
    # The start period, which forgives a slow start, is the same on both.
    assert {s: c["start_period"] for s, c in new.items()} == {s: c["start_period"] for s, c in old.items()}
    assert new["rspamd"]["start_period"] == "600s" and new["postfix"]["start_period"] == "300s"
    with pytest.raises(SettingsError) as err:
        replace(settings, engine_start_interval="yes").validate()
    assert err.value.field == "engine_start_interval"
