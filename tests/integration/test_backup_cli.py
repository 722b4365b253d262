"""`mailstead backup configure|run|list|verify` and `mailstead restore` against
real agents and real restic (a local folder target): progress printed, the
recovery sheet shown once, a fresh appliance restored from the sheet's password,
and failures exit non-zero with a message naming what to fix. Once the appliance has
an administrator, a restore asks for a fresh code at the console too."""

from __future__ import annotations

import io
import re
import time

import pyotp

from portal import cli
from portal.agent.registry import Context
from tests.support.statedb import read_setting, write_settings
from tests.conftest import launch_agent


def test_backup_then_restore_onto_a_fresh_state_with_the_cli(tmp_path, monkeypatch, capsys):
    old, repo = tmp_path / "old" / "state", tmp_path / "repo"
    # A compose project no test stack uses: only files are backed up (the stack tests cover volumes).
    write_settings(old / "state.db", {"domain": "example.test", "mail_host": "mail.example.test",
                                      "stack_project": "mstest-i6-cli-none"})
    from portal.admin.privileged import admin_setup, admin_totp_begin

    ctx = Context(state_dir=old)
    totp = pyotp.TOTP(admin_totp_begin.run(ctx, address="postmaster@example.test")["secret"])
    codes = admin_setup.run(ctx, address="postmaster@example.test", password="the admin's password",
                            totp_code=totp.now())["recovery_codes"]
    write_settings(old / "state.db", {"setup_complete": "1"})
    (old / "secrets" / "dkim").mkdir(parents=True)
    (old / "secrets" / "dkim" / "example.test.key").write_text("dkim private key\n")
    agent = launch_agent(tmp_path / "old", "--no-scheduler", env={"MAILSTEAD_STATE_DIR": str(old)})
    try:
        sock = ["--socket", str(agent.socket)]
        assert cli.main([*sock, "backup", "run"]) == 1  # not configured yet: says how
        assert "backup configure" in capsys.readouterr().err

        monkeypatch.setattr("sys.stdin", io.StringIO(codes[0] + "\n"))  # an administrator exists: asked
        assert cli.main([*sock, "backup", "configure", "--target", "local", "--path", str(repo),
                         "--secret-stdin"]) == 0
        out = capsys.readouterr().out
        assert "RECOVERY SHEET" in out and "not shown again" in out
        password = re.search(r"^Password:\s+(\S+)$", out, re.M).group(1)

        assert cli.main([*sock, "backup", "run"]) == 0
        run = capsys.readouterr()
        assert re.search(r"\[\s*[\d.]+ s\] upload:", run.err), run.err  # restic's progress, as it goes
        assert cli.main([*sock, "backup", "list"]) == 0
        listed = capsys.readouterr().out
        assert re.search(r"^[0-9a-f]{8}  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  Mailstead ", listed, re.M), listed
        assert cli.main([*sock, "backup", "verify"]) == 0
        assert '"ok": true' in capsys.readouterr().out
    finally:
        agent.stop()

    new = tmp_path / "new" / "state"
    new.mkdir(parents=True)
    (new / "setup-token").write_text("fresh-appliance-token\n")
    fresh = launch_agent(tmp_path / "new", "--no-scheduler", env={"MAILSTEAD_STATE_DIR": str(new)})
    try:
        sock = ["--socket", str(fresh.socket)]
        monkeypatch.setattr("sys.stdin", io.StringIO("not-the-password\n"))
        assert cli.main([*sock, "restore", "--target", "local", "--path", str(repo), "--secret-stdin",
                         "--yes"]) == 1
        assert "password:" in capsys.readouterr().err
        assert not (new / "secrets" / "dkim").exists()

        monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
        assert cli.main([*sock, "restore", "--target", "local", "--path", str(repo), "--secret-stdin",
                         "--yes"]) == 0
        done = capsys.readouterr()
        assert "files: putting back" in done.err and '"messages": 0' in done.out  # progress, then the result
        assert (new / "secrets" / "dkim" / "example.test.key").read_text() == "dkim private key\n"
        assert read_setting(new / "state.db", "mail_host") == "mail.example.test"
        assert not (new / "setup-token").exists()  # the restored appliance is set up: the token is gone
        assert cli.main([*sock, "restore", "--snapshot", "deadbeef", "--yes"]) == 1
        assert "--snapshot" in capsys.readouterr().err
        # Set up now (with the old administrator): a restore asks for a fresh code, refuses a spent one.
        monkeypatch.setattr("sys.stdin", io.StringIO(codes[0] + "\n"))
        assert cli.main([*sock, "restore", "--yes", "--secret-stdin"]) == 1
        assert "totp_code: that code is not right, or was used already" in capsys.readouterr().err
        monkeypatch.setattr("sys.stdin", io.StringIO(totp.at(time.time() + 30) + "\n"))
        assert cli.main([*sock, "restore", "--yes", "--secret-stdin"]) == 0
        assert '"messages": 0' in capsys.readouterr().out
    finally:
        fresh.stop()
