"""The command line maps each command to an agent operation that exists, with typed arguments."""

from __future__ import annotations

import io

import pytest

from portal import cli
from portal.agent import ops, server  # noqa: F401  (server registers every operation)


def parse(argv: list[str]):
    return cli.request(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv, op, args", [
    (["dns-records"], "dns_records", {"dnssec": False}),
    (["dns-records", "--zone", "--dnssec"], "dns_records", {"dnssec": True}),
    (["dns-check"], "dns_check", {}),
    (["dns-push", "--dry-run"], "dns_push", {"dry_run": True}),
    (["net-check", "--smtp-host", "127.0.0.1", "--smtp-port", "2525"], "net_check",
     {"smtp_host": "127.0.0.1", "smtp_port": 2525}),
    (["acme-configure", "--directory", "https://ca.example.test/dir", "--contact", "a@example.test",
      "--challenge", "dns-01", "--reuse-key"], "acme_configure",
     {"directory": "https://ca.example.test/dir", "contact": "a@example.test", "challenge": "dns-01",
      "include_apex": False, "reuse_key": True, "ca_bundle": "", "caa_issuer": ""}),
    (["cert-issue"], "cert_issue", {}),
    (["cert-renew", "--force"], "cert_renew", {"force": True}),
    (["cert-status"], "cert_status", {}),
    (["status"], "health_run", {"alert": True}),
    (["status", "--no-alert", "--json"], "health_run", {"alert": False}),
    (["status", "--versions"], "status", {}),
    (["schedule-list"], "schedule_list", {}),
    (["schedule-set", "backup", "15 2 * * *"], "schedule_set", {"job": "backup", "cron": "15 2 * * *"}),
    (["schedule-runs", "health", "--limit", "5"], "schedule_runs", {"job": "health", "limit": 5}),
    (["alerts-configure", "--webhook-url", "https://hooks.example.test/x"], "alerts_configure",
     {"webhook_url": "https://hooks.example.test/x", "dnsbl_zones": ""}),
    (["alerts-test"], "alerts_test", {}),
])
def test_commands_map_to_registered_operations(argv, op, args):
    got_op, got_args = parse(argv)
    assert (got_op, got_args) == (op, args)
    # The arguments pass the operation's own type checks (no drift between CLI and agent).
    assert ops.validate_args(ops.REGISTRY[op], got_args) == args


def test_tsig_secret_comes_from_stdin_not_the_command_line(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("c2VjcmV0c2VjcmV0c2VjcmV0\n"))
    op, args = parse(["dns-configure-push", "192.0.2.53", "mailstead-key", "--secret-stdin",
                      "--algorithm", "hmac-sha512"])
    assert op == "dns_configure_push"
    assert args == {"server": "192.0.2.53", "key_name": "mailstead-key", "port": 53,
                    "algorithm": "hmac-sha512", "secret": "c2VjcmV0c2VjcmV0c2VjcmV0"}
    ops.validate_args(ops.REGISTRY[op], args)


def test_every_command_names_a_registered_operation():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # the subcommand table
    for name in commands:
        if name in ("mailbox-create", "mailbox-reset-password", "mailbox-password", "dns-configure-push"):
            continue  # these read a password or secret; covered above and in test_stack_agentops
        argv = [name] + {"mailbox-delete": ["a@example.test"], "mailbox-rename": ["a@example.test", "b@example.test"],
                         "alias-add": ["x@example.test", "a@example.test"],
                         "alias-remove": ["x@example.test", "a@example.test"],
                         "schedule-set": ["backup", "0 3 * * *"]}.get(name, [])
        op, _ = parse(argv)
        assert op in ops.REGISTRY, f"{name} -> {op} is not an agent operation"


def test_long_operations_get_long_timeouts():
    assert cli.LONG_OPS["cert_issue"] >= 300 and cli.LONG_OPS["stack_deploy"] >= 600


def test_status_prints_the_checks_and_fails_when_one_fails(start_agent, tmp_path, capsys):
    """`mailstead status` runs the health checks in a real agent; --versions keeps the old output."""
    import json

    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(tmp_path / "state")})
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "backup-state.json").write_text(json.dumps(
        {"last_backup": {"at": "2026-01-01T00:00:00+00:00", "ok": False, "error": "target unreachable"}}))
    code = cli.main(["--socket", str(agent.socket), "status", "--no-alert"])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] backup      the last backup" in out and "target unreachable" in out
    assert "-> see the backup's log" in out and "[WARN] containers" in out
    assert out.rstrip().splitlines()[-1].endswith(" s)") and "failed" in out.splitlines()[-1]
    assert cli.main(["--socket", str(agent.socket), "status", "--versions"]) == 0
    versions = json.loads(capsys.readouterr().out)
    assert versions["portal"] and versions["os"] == "Mailstead Test OS 1.0 (pytest)"
