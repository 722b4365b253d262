"""The agent's admin operations through a real agent process: TOTP enrolment, admin
record, sign-in (password, TOTP, recovery codes), lockout backoff, pending mailboxes."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyotp

from portal.stack.accounts import verify_password
import pytest

from portal.admin import privileged as adminauth
from portal.agent.client import AgentClient, AgentError
from tests.support.statedb import write_settings

PASSWORD = "correct horse battery staple"
ADDRESS = "postmaster@example.com"


class Agent:
    def __init__(self, process: Any, state_dir: Path) -> None:
        self.process = process
        self.state_dir = state_dir
        self.client = AgentClient(str(process.socket), timeout=10)

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        return self.client.call(op, **args)

    def portal_state(self, **args: Any) -> dict[str, Any]:
        return self.client.call("portal_state", **args)

    def refused(self, op: str, **args: Any) -> AgentError:
        with pytest.raises(AgentError) as info:
            self.client.call(op, **args)
        return info.value

    def file(self, name: str) -> Path:
        return self.state_dir / "secrets" / name


@pytest.fixture
def agent(tmp_path: Path, start_agent: Callable[..., Any]) -> Agent:
    state = tmp_path / "state"
    state.mkdir()
    write_settings(state / "state.db", {"domain": "example.com"})
    return Agent(start_agent(env={"MAILSTEAD_STATE_DIR": str(state)}), state)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def enrol(agent: Agent, address: str = ADDRESS, password: str = PASSWORD) -> tuple[pyotp.TOTP, list[str]]:
    totp = pyotp.TOTP(agent("admin_totp_begin", address=address)["secret"])
    codes = agent("admin_setup", address=address, password=password, totp_code=totp.now())["recovery_codes"]
    return totp, codes


def allow_code_again(agent: Agent) -> None:
    """Forget which TOTP step was used last (a code works once; tests have no 30 s to wait)."""
    from tests.support.admin import allow_code_again as forget

    forget(agent.state_dir)


def test_totp_begin_keeps_one_pending_secret(agent: Agent) -> None:
    first = agent("admin_totp_begin", address=ADDRESS)
    assert len(first["secret"]) == 32 and pyotp.TOTP(first["secret"]).now().isdigit()
    assert first["uri"] == pyotp.TOTP(first["secret"]).provisioning_uri(name=ADDRESS, issuer_name="Mailstead")
    assert first["uri"].startswith("otpauth://totp/Mailstead:postmaster%40example.com?secret=")
    again = agent("admin_totp_begin", address="Admin@Example.com")
    assert again["secret"] == first["secret"]  # a reload shows the same QR code
    assert again["address"] == "admin@example.com"
    pending = agent.file("admin-totp.pending")
    assert mode(pending) == 0o600 and mode(pending.parent) == 0o700


@pytest.mark.parametrize(("address", "problem"), [
    ("", "address: address is required"),
    ("postmaster@example.org", "address: the administrator's address must be in your domain"),
    ("no-at-sign", "address: address needs an @"),
    ("a b@example.com", "address: address contains ' ' before the @"),
    ("x" * 300 + "@example.com", "address: address is"),
])
def test_bad_address_is_refused_naming_the_field(agent: Agent, address: str, problem: str) -> None:
    err = agent.refused("admin_totp_begin", address=address)
    assert err.code == "invalid" and str(err).startswith(problem)


@pytest.mark.parametrize(("password", "problem"), [
    ("short", "password: use at least 12 characters"),
    (ADDRESS, "password: must not be the address itself"),
    ("POSTMASTER", "password: use at least 12"),
    ("x" * 1025, "password: use at most 1024"),
    ("twelve chars\nmore", "password: must not contain line breaks"),
])
def test_bad_password_is_refused(agent: Agent, password: str, problem: str) -> None:
    totp = pyotp.TOTP(agent("admin_totp_begin", address=ADDRESS)["secret"])
    err = agent.refused("admin_setup", address=ADDRESS, password=password, totp_code=totp.now())
    assert err.code == "invalid" and str(err).startswith(problem)
    assert not agent.file("admin.json").exists()


def six_wrong_digits(secret: str) -> str:
    """Six digits that are none of the codes the agent accepts now (±1 step)."""
    totp = pyotp.TOTP(secret)
    accepted = {totp.at(time.time() + d * totp.interval) for d in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in accepted)


@pytest.mark.parametrize("code", ["six wrong digits", "12345", "abcdef", "", "1234567"])
def test_wrong_totp_code_is_refused(agent: Agent, code: str) -> None:
    secret = agent("admin_totp_begin", address=ADDRESS)["secret"]
    if code == "six wrong digits":
        code = six_wrong_digits(secret)
    err = agent.refused("admin_setup", address=ADDRESS, password=PASSWORD, totp_code=code)
    assert err.code == "invalid" and str(err).startswith("totp_code: ")
    assert agent.file("admin-totp.pending").exists()  # enrolment goes on with the same secret
    assert agent("admin_totp_begin", address=ADDRESS)["secret"] == secret


def test_setup_without_enrolment_is_refused(agent: Agent) -> None:
    err = agent.refused("admin_setup", address=ADDRESS, password=PASSWORD, totp_code="123456")
    assert str(err).startswith("totp_code: the authenticator enrolment has expired")


def test_setup_stores_the_record_and_the_pending_mailbox(agent: Agent) -> None:
    totp, codes = enrol(agent)
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(len(c) == 19 and c.count("-") == 3 for c in codes)
    record_file = agent.file("admin.json")
    assert mode(record_file) == 0o600
    text = record_file.read_text()
    record = json.loads(text)
    assert record["address"] == ADDRESS
    assert record["password_hash"].startswith("{ARGON2ID}$argon2id$")
    assert record["totp_secret"] == totp.secret
    assert len(record["recovery_codes"]) == 10
    assert PASSWORD not in text and not any(c in text for c in codes)
    assert not agent.file("admin-totp.pending").exists()
    assert agent("admin_status") == {"configured": True, "address": ADDRESS, "recovery_codes_left": 10}
    # What the admin mailbox needs waits for Deploy: its hash and key password, not the password.
    assert mode(agent.file("pending-mailboxes.json")) == 0o600
    assert PASSWORD not in agent.file("pending-mailboxes.json").read_text()
    ((address, prepared),) = adminauth.take_pending_mailboxes(agent.state_dir)
    assert address == ADDRESS and verify_password(prepared.password_hash, PASSWORD)
    assert not agent.file("pending-mailboxes.json").exists()
    assert adminauth.take_pending_mailboxes(agent.state_dir) == []
    # No secret reaches the agent's log.
    log = agent.process.log_text()
    assert PASSWORD not in log and totp.secret not in log and not any(c in log for c in codes)


def test_put_back_pending_mailbox_replaces_by_address(tmp_path: Path) -> None:
    adminauth.put_pending_mailbox(tmp_path, "a@example.com", "first password")
    adminauth.put_pending_mailbox(tmp_path, "b@example.com", "other password")
    adminauth.put_pending_mailbox(tmp_path, "a@example.com", "second password")
    taken = adminauth.take_pending_mailboxes(tmp_path)
    assert [a for a, _ in taken] == ["b@example.com", "a@example.com"]
    assert verify_password(taken[0][1].password_hash, "other password")
    assert verify_password(taken[1][1].password_hash, "second password")


def test_status_before_setup(agent: Agent) -> None:
    assert agent("admin_status") == {"configured": False, "address": None, "recovery_codes_left": 0}
    err = agent.refused("admin_login", address=ADDRESS, password=PASSWORD, code="123456")
    assert err.code == "not_configured"


def test_login_right_and_wrong(agent: Agent) -> None:
    totp, _ = enrol(agent)
    next_code = totp.at(time.time() + 30)  # the setup code's step is used up
    for address, password, code in [
        (ADDRESS, "wrong password!", next_code),
        ("admin@example.com", PASSWORD, next_code),
        (ADDRESS, PASSWORD, "000000" if next_code != "000000" else "111111"),
        (ADDRESS, "", next_code),
    ]:
        err = agent.refused("admin_login", address=address, password=password, code=code)
        assert err.code == "denied", (address, code)
        assert "address, password or code is not right" in str(err)
    result = agent("admin_login", address=" PostMaster@example.com ", password=PASSWORD, code=next_code)
    assert len(result.pop("session")) >= 40
    assert result == {"address": ADDRESS, "used_recovery_code": False, "recovery_codes_left": 10}
    # The same code does not work twice.
    err = agent.refused("admin_login", address=ADDRESS, password=PASSWORD, code=next_code)
    assert err.code == "denied"


def test_recovery_code_works_once(agent: Agent) -> None:
    _, codes = enrol(agent)
    messy = " " + codes[3].lower().replace("-", " ") + " "
    result = agent("admin_login", address=ADDRESS, password=PASSWORD, code=messy)
    assert len(result.pop("session")) >= 40
    assert result == {"address": ADDRESS, "used_recovery_code": True, "recovery_codes_left": 9}
    err = agent.refused("admin_login", address=ADDRESS, password=PASSWORD, code=codes[3])
    assert err.code == "denied"
    assert agent("admin_login", address=ADDRESS, password=PASSWORD, code=codes[4])["recovery_codes_left"] == 8
    # A recovery code without the password is worth nothing (and is not spent).
    assert agent.refused("admin_login", address=ADDRESS, password="wrong password!", code=codes[5]).code == "denied"
    assert agent("admin_status")["recovery_codes_left"] == 8


ATTACKER = "198.51.100.7"
OWNER = "203.0.113.20"


def test_lockout_after_five_failures_is_per_client_with_a_message_saying_when(agent: Agent) -> None:
    totp, _ = enrol(agent)
    allow_code_again(agent)
    bad = {"address": ADDRESS, "password": "wrong password!", "code": "123456", "client": ATTACKER}
    for _ in range(4):
        assert agent.refused("admin_login", **bad).code == "denied"
    err = agent.refused("admin_login", **bad)
    assert err.code == "locked"
    assert "try again after" in str(err) and "UTC" in str(err) and "(in 60 seconds)" in str(err)
    lock = json.loads(agent.file("admin-lockout.json").read_text())["clients"][ATTACKER]
    assert lock["failures"] == 5 and 55 < lock["locked_until"] - time.time() <= 60
    assert mode(agent.file("admin-lockout.json")) == 0o600
    # Right credentials do not help the locked client...
    err = agent.refused("admin_login", address=ADDRESS, password=PASSWORD, code=totp.now(), client=ATTACKER)
    assert err.code == "locked"
    # ...but the owner, elsewhere, is not locked out by the attacker.
    assert agent("admin_login", address=ADDRESS, password=PASSWORD, code=totp.now(), client=OWNER)["address"] == ADDRESS
    allow_code_again(agent)
    # The lock expires; one more failure locks for twice as long.
    data = json.loads(agent.file("admin-lockout.json").read_text())
    data["clients"][ATTACKER]["locked_until"] = time.time() - 1
    agent.file("admin-lockout.json").write_text(json.dumps(data))
    err = agent.refused("admin_login", **bad)
    assert err.code == "locked" and "(in 2 minutes)" in str(err)
    data = json.loads(agent.file("admin-lockout.json").read_text())
    data["clients"][ATTACKER]["locked_until"] = time.time() - 1
    agent.file("admin-lockout.json").write_text(json.dumps(data))
    # Success resets the count of that client.
    assert agent("admin_login", address=ADDRESS, password=PASSWORD, code=totp.now(), client=ATTACKER)["address"]
    assert ATTACKER not in json.loads(agent.file("admin-lockout.json").read_text())["clients"]


def test_an_ipv6_attacker_is_counted_by_its_64(agent: Agent) -> None:
    enrol(agent)
    for i in range(5):  # five addresses of one /64: one client
        err = agent.refused("admin_login", address=ADDRESS, password="wrong password!", code="123456",
                            client=f"2001:db8:1:2::{i + 1}")
    assert err.code == "locked"
    assert agent.refused("admin_login", address=ADDRESS, password="wrong password!", code="123456",
                         client="2001:db8:1:3::1").code == "denied"  # another /64


def test_admin_unlock_on_the_console_lifts_the_lockout(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    from portal import cli

    totp, _ = enrol(agent)
    allow_code_again(agent)
    for _ in range(5):
        agent.refused("admin_login", address=ADDRESS, password="wrong password!", code="123456", client=OWNER)
    assert agent.refused("admin_login", address=ADDRESS, password=PASSWORD, code=totp.now(),
                         client=OWNER).code == "locked"
    assert cli.main(["--socket", str(agent.client.socket_path), "admin-unlock", "--client", OWNER]) == 0
    assert OWNER in capsys.readouterr().out
    assert agent("admin_login", address=ADDRESS, password=PASSWORD, code=totp.now(), client=OWNER)["address"]
    assert agent.refused("admin_unlock", client="not an address").field == "client"


def test_signing_out_ends_the_session_on_the_server(agent: Agent) -> None:
    from types import SimpleNamespace

    from portal.admin.privileged import session_valid

    totp, _ = enrol(agent)
    allow_code_again(agent)
    first = agent("admin_login", address=ADDRESS, password=PASSWORD, code=totp.now())["session"]
    allow_code_again(agent)
    second = agent("admin_login", address=ADDRESS, password=PASSWORD, code=totp.now())["session"]
    ctx = SimpleNamespace(state_dir=agent.state_dir)
    assert session_valid(ctx, first) and session_valid(ctx, second)
    assert first not in agent.file("admin-sessions.json").read_text()  # only hashes are kept
    assert agent("admin_logout", session=first) == {"ended": 1}
    assert not session_valid(ctx, first) and session_valid(ctx, second)
    assert agent("admin_logout", session=second, everywhere=True) == {"ended": 1}
    assert not session_valid(ctx, second)
    assert agent.portal_state(session=second)["session_valid"] is False


def test_lock_backoff_doubles_up_to_an_hour() -> None:
    assert [adminauth.lock_seconds(n) for n in range(0, 13)] == [
        0, 0, 0, 0, 0, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert adminauth.lock_seconds(1000) == 3600


def test_long_lock_message_is_in_minutes() -> None:
    message = adminauth._locked_message(1_000_000 + 1920, 1_000_000)
    assert "(in 32 minutes)" in message and "try again after" in message


def test_enrolment_is_closed_after_setup(agent: Agent) -> None:
    enrol(agent)
    write_settings(agent.state_dir / "state.db", {"setup_complete": "1"})
    assert agent.refused("admin_totp_begin", address=ADDRESS).code == "forbidden"
    assert agent.refused("admin_setup", address=ADDRESS, password=PASSWORD, totp_code="123456").code == "forbidden"


def test_no_domain_yet(tmp_path: Path, start_agent: Callable[..., Any]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    agent = Agent(start_agent(env={"MAILSTEAD_STATE_DIR": str(state)}), state)
    err = agent.refused("admin_totp_begin", address=ADDRESS)
    assert str(err).startswith("address: the mail domain is not set yet")


def test_net_addresses(agent: Agent, tmp_path: Path) -> None:
    result = agent("net_addresses")
    assert set(result) == {"ipv4", "ipv6", "resolvers"}
    assert all(isinstance(v, list) for v in result.values())
    assert "127.0.0.1" not in result["ipv4"]


def test_resolv_conf_parsing(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 10.0.0.1\n# nameserver 9.9.9.9\nnameserver fe80::1%eth0\nnameserver bogus\n"
                    "options edns0\nnameserver 10.0.0.1\n")
    assert adminauth.resolv_conf_nameservers(path) == ["10.0.0.1", "fe80::1"]
    assert adminauth.resolv_conf_nameservers(tmp_path / "missing") == []


# -- fresh codes for sensitive changes: password, authenticator ---------------------------------

NEW_PASSWORD = "a completely new passphrase"


def sessions(agent: Agent, n: int) -> list[str]:
    from types import SimpleNamespace

    return [adminauth.new_session(SimpleNamespace(state_dir=agent.state_dir)) for _ in range(n)]


def live(agent: Agent, sid: str) -> bool:
    return agent.portal_state(session=sid)["session_valid"]


def test_a_password_change_needs_the_old_password_and_a_fresh_code(agent: Agent) -> None:
    totp, codes = enrol(agent)
    used_at_setup = totp.now()
    change = {"old_password": PASSWORD, "new_password": NEW_PASSWORD}
    for code, field in [("", "totp_code"), (used_at_setup, "totp_code"),
                        ("000000" if totp.now() != "000000" else "111111", "totp_code"),
                        ("AAAA-BBBB-CCCC-DDDD", "totp_code")]:
        err = agent.refused("admin_password_change", **change, totp_code=code)
        assert (err.code, err.field) == ("invalid", field), code
    fresh = totp.at(time.time() + 30)
    err = agent.refused("admin_password_change", **{**change, "old_password": "not the password"}, totp_code=fresh)
    assert err.field == "old_password"
    err = agent.refused("admin_password_change", **{**change, "new_password": "short"}, totp_code=fresh)
    assert err.field == "new_password"
    mine, other, third = sessions(agent, 3)
    result = agent("admin_password_change", **change, totp_code=fresh, session=mine)
    assert result["sessions_ended"] == 2 and result["used_recovery_code"] is False
    assert live(agent, mine) and not live(agent, other) and not live(agent, third)
    # the code is spent: it confirms nothing again, and does not sign in
    assert agent.refused("admin_password_change", old_password=NEW_PASSWORD, new_password=PASSWORD,
                         totp_code=fresh).field == "totp_code"
    assert agent.refused("admin_login", address=ADDRESS, password=NEW_PASSWORD, code=fresh).code == "denied"
    assert agent.refused("admin_login", address=ADDRESS, password=PASSWORD, code=codes[0]).code == "denied"
    assert agent("admin_login", address=ADDRESS, password=NEW_PASSWORD, code=codes[0])["used_recovery_code"]
    log = agent.process.log_text()
    assert NEW_PASSWORD not in log and fresh not in log and codes[0] not in log


def test_a_recovery_code_confirms_once(agent: Agent) -> None:
    _, codes = enrol(agent)
    agent("admin_password_change", old_password=PASSWORD, new_password=NEW_PASSWORD, totp_code=codes[2])
    err = agent.refused("admin_password_change", old_password=NEW_PASSWORD, new_password=PASSWORD,
                        totp_code=codes[2])
    assert err.field == "totp_code"
    assert json.loads(agent.file("admin-ledger.json").read_text())["spent_recovery_codes"] == \
        [adminauth._code_hash(codes[2])]
    assert mode(agent.file("admin-ledger.json")) == 0o600


def test_five_wrong_codes_in_a_row_sign_every_session_out(agent: Agent) -> None:
    totp, _ = enrol(agent)
    mine, = sessions(agent, 1)
    wrong = "000000" if totp.now() != "000000" else "111111"
    for _ in range(4):
        assert agent.refused("admin_password_change", old_password=PASSWORD, new_password=NEW_PASSWORD,
                             totp_code=wrong, session=mine).code == "invalid"
    assert live(agent, mine)
    err = agent.refused("admin_password_change", old_password=PASSWORD, new_password=NEW_PASSWORD,
                        totp_code=wrong, session=mine)
    assert (err.code, err.field) == ("signed_out", "totp_code") and "signed out" in err.message
    assert not live(agent, mine)
    # the count starts again; a right code resets it
    agent("admin_password_change", old_password=PASSWORD, new_password=NEW_PASSWORD,
          totp_code=totp.at(time.time() + 30))


def test_moving_to_a_new_authenticator(agent: Agent) -> None:
    old = pyotp.TOTP(agent("admin_totp_begin", address=ADDRESS)["secret"])
    spent = old.now()  # the code setup takes, refused from then on (a later old.now() may be a new step)
    agent("admin_setup", address=ADDRESS, password=PASSWORD, totp_code=spent)
    started = agent("admin_totp_reset_begin")
    assert agent("admin_totp_reset_begin")["secret"] == started["secret"] != old.secret  # same on a reload
    assert started["uri"].startswith("otpauth://totp/Mailstead:postmaster%40example.com?secret=")
    new = pyotp.TOTP(started["secret"])
    fresh = old.at(time.time() + 30)
    assert agent.refused("admin_totp_reset_confirm", totp_code=spent, new_code=new.now()).field == "totp_code"
    assert agent.refused("admin_totp_reset_confirm", totp_code=fresh, new_code="000000"
                         if new.now() != "000000" else "111111").field == "new_code"
    mine, other = sessions(agent, 2)
    agent("admin_totp_reset_confirm", totp_code=fresh, new_code=new.now(), session=mine)  # fresh was not spent
    assert live(agent, mine) and not live(agent, other)
    assert not agent.file("admin-totp-reset.pending").exists()
    assert json.loads(agent.file("admin.json").read_text())["totp_secret"] == new.secret
    assert agent.refused("admin_login", address=ADDRESS, password=PASSWORD, code=old.at(time.time() + 60)).code \
        == "denied"
    allow_code_again(agent)  # the steps used to switch are spent: the next sign-in waits 30 s for a new one
    assert agent("admin_login", address=ADDRESS, password=PASSWORD, code=new.now())["session"]
    assert started["secret"] not in agent.process.log_text()


def test_no_administrator_no_changes(agent: Agent) -> None:
    assert agent.refused("admin_totp_reset_begin").code == "not_configured"
    assert agent.refused("admin_password_change", old_password=PASSWORD, new_password=NEW_PASSWORD,
                         totp_code="123456").code == "not_configured"
