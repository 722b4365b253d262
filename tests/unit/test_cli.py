"""The command line maps each command to an agent operation that exists, with typed arguments."""

from __future__ import annotations

import io

import pytest

from portal import cli
from portal.agent import registry as ops, server  # noqa: F401  (server registers every operation)


def parse(argv: list[str]):
    """(operation name, arguments) for a command line."""
    op, args = cli.request(cli.build_parser().parse_args(argv))
    return op.name, args


@pytest.mark.parametrize("argv, op, args", [
    (["dns-records"], "dns_records", {"dnssec": False}),
    (["dns-records", "--zone", "--dnssec"], "dns_records", {"dnssec": True}),
    (["dns-check"], "dns_check", {}),
    (["dns-push", "--dry-run"], "dns_push", {"dry_run": True}),
    (["net-check", "--smtp-host", "mx.example.net"], "net_check", {"smtp_host": "mx.example.net"}),
    (["alerts-private", "on"], "alerts_private", {"allow": True}),
    (["alerts-private", "off"], "alerts_private", {"allow": False}),
    (["acme-configure", "--directory", "https://ca.example.test/dir", "--contact", "a@example.test",
      "--challenge", "dns-01", "--reuse-key"], "acme_configure",
     {"directory": "https://ca.example.test/dir", "contact": "a@example.test", "challenge": "dns-01",
      "include_apex": False, "reuse_key": True, "caa_issuer": ""}),
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
    (["backup", "configure", "--target", "local", "--path", "/srv/backup"], "backup_configure",
     {"target": "local", "path": "/srv/backup", "host": "", "port": 0, "user": "", "endpoint": "", "bucket": "",
      "region": "", "access_key_id": ""}),
    (["backup", "configure", "--target", "sftp", "--host", "backup.example.test", "--port", "2222",
      "--user", "mail", "--path", "repo"], "backup_configure",
     {"target": "sftp", "path": "repo", "host": "backup.example.test", "port": 2222, "user": "mail", "endpoint": "",
      "bucket": "", "region": "", "access_key_id": ""}),
    (["backup", "run"], "backup_run", {}),
    (["backup", "list"], "backup_list", {}),
    (["backup", "verify"], "backup_verify", {}),
    (["backup", "status"], "backup_state", {}),
    (["certs", "renew", "--force"], "cert_renew", {"force": True}),
    (["certs", "status"], "cert_status", {}),
    (["upgrade"], "update_status", {}),
    (["upgrade", "--check"], "update_check", {}),
    (["upgrade", "--now"], "update_install", {}),
    (["upgrade", "--rollback"], "update_rollback", {}),
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
    nested = {"backup": ["run"], "certs": ["renew"]}
    for name, sub in commands.items():
        if name in ("mailbox-create", "mailbox-reset-password", "mailbox-password", "dns-configure-push"):
            continue  # these read a password or secret; covered above and in test_stack_agentops
        if name in ("token", "setup", "restore", "settings-set"):
            continue  # local (token, setup) or several operations (restore): tested on their own
        if name in nested:
            for action in sub._subparsers._group_actions[0].choices:
                argv = [name, action] + (["--target", "local", "--path", "/x"] if action == "configure" else [])
                op, _ = parse(argv)
                assert op in ops.REGISTRY, f"{name} {action} -> {op} is not an agent operation"
            continue
        argv = [name] + {"mailbox-delete": ["a@example.test"], "mailbox-rename": ["a@example.test", "b@example.test"],
                         "alias-add": ["x@example.test", "a@example.test"],
                         "alias-remove": ["x@example.test", "a@example.test"],
                         "schedule-set": ["backup", "0 3 * * *"], "alerts-private": ["on"]}.get(name, [])
        op, _ = parse(argv)
        assert op in ops.REGISTRY, f"{name} -> {op} is not an agent operation"


def test_waits_come_from_the_declarations_and_jobs_are_followed():
    """No caller-side table of timeouts: long work is a job (the CLI follows it), the rest
    declares how long a caller waits."""
    assert ops.REGISTRY["stack_deploy"].job and ops.REGISTRY["cert_issue"].job
    assert ops.REGISTRY["stack_load_images"].timeout >= 900 and ops.REGISTRY["backup_list"].timeout >= 120
    assert not hasattr(cli, "LONG_OPS") and not hasattr(cli, "JOB_OPS")


def test_ca_bundle_is_sent_as_text_never_as_a_path(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    op, args = parse(["acme-configure", "--directory", "https://ca.example.test/dir", "--ca-bundle", str(bundle)])
    assert op == "acme_configure" and args["ca_bundle_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert str(bundle) not in repr(args)
    with pytest.raises(SystemExit, match="--ca-bundle: cannot read"):
        parse(["acme-configure", "--ca-bundle", str(tmp_path / "missing.pem")])


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


def test_s3_secret_is_read_from_stdin_never_argv(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("s3-secret-key-1234\n"))
    op, args = parse(["backup", "configure", "--target", "s3", "--endpoint", "https://s3.example.test",
                      "--bucket", "mail-backups", "--access-key-id", "AKIAEXAMPLE", "--secret-stdin"])
    assert op == "backup_configure" and args["secret_access_key"] == "s3-secret-key-1234"
    assert "password" not in args  # a new repository: the agent generates the password
    ops.validate_args(ops.REGISTRY[op], args)


def test_existing_repository_asks_for_the_sheet_password(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("correct-sheet-password\n"))
    _op, args = parse(["backup", "configure", "--target", "local", "--path", "/srv/b", "--existing",
                       "--secret-stdin"])
    assert args["password"] == "correct-sheet-password"
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    with pytest.raises(SystemExit) as stop:
        parse(["backup", "configure", "--target", "local", "--path", "/srv/b", "--existing", "--secret-stdin"])
    assert "recovery sheet" in str(stop.value)


def test_configure_without_a_target_names_the_option():
    with pytest.raises(SystemExit) as stop:
        parse(["backup", "configure"])
    assert "--target" in str(stop.value)


def test_token_is_shown_only_while_setup_is_unfinished(tmp_path, monkeypatch, capsys):
    from tests.support.statedb import write_settings

    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("MAILSTEAD_STATE_DIR", str(state))
    assert cli.main(["token"]) == 1
    assert "no setup token" in capsys.readouterr().err
    (state / "setup-token").write_text("tok-123-abc\n")
    (state / "tls").mkdir()
    (state / "tls" / "bootstrap.sha256").write_text("AB:CD:EF\n")
    assert cli.main(["token"]) == 0
    assert capsys.readouterr().out == "tok-123-abc\n"
    assert cli.main(["setup"]) == 0
    out = capsys.readouterr().out
    assert "Setup token: tok-123-abc" in out and "AB:CD:EF" in out and "https://" in out
    write_settings(state / "state.db", {"setup_complete": "1"})
    assert cli.main(["token"]) == 1
    assert "setup is finished" in capsys.readouterr().err
    assert cli.main(["setup"]) == 0
    out = capsys.readouterr().out
    assert "tok-123-abc" not in out and "Setup is finished" in out


def test_every_command_has_help(capsys):
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert sub.format_help().startswith("usage: mailstead " + name), name


def test_settings_set_goes_through_the_agents_checks(tmp_path, capsys):
    from tests.support.agent import ThreadAgent
    from portal.core import store

    agent = ThreadAgent(tmp_path / "state", tmp_path / "agent.sock")
    try:
        sock = str(agent.socket)
        assert cli.main(["--socket", sock, "settings-set", "dns_allow_private=yes", "dns_servers=10.0.2.2"]) == 0
        assert "dns_allow_private: 1" in capsys.readouterr().out
        assert store.read_settings(tmp_path / "state") == {"dns_allow_private": "1", "dns_servers": "10.0.2.2"}
        assert cli.main(["--socket", sock, "settings-set", "dns_servers=fe80::1%eth0"]) == 1
        assert "dns_servers" in capsys.readouterr().err
        assert cli.main(["--socket", sock, "settings-set", "no_such=1"]) == 1
        assert cli.main(["--socket", sock, "settings-set", "dns_servers="]) == 0
        assert store.read_settings(tmp_path / "state") == {"dns_allow_private": "1"}
    finally:
        agent.stop()
