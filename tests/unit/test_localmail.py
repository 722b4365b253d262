"""portal/stack/localmail.py without docker: what it refuses before it asks the engine,
and what it says when the engine is not there. (Handing mail to the real postfix:
tests/integration/test_checks_stack.py and the browser tier's test message.)"""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path
from types import SimpleNamespace

import pytest

from portal.agent.registry import Context, docker_factory
from portal.stack import localmail


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = "hello"
    msg.set_content("hello\n.\nstill the body\n")
    return msg


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return Context(state_dir=tmp_path, docker=docker_factory(f"unix://{tmp_path}/no-docker.sock"))


SETTINGS = SimpleNamespace(project="mailstead", hostname="mail.example.test")


@pytest.mark.parametrize(("sender", "to", "field"), [
    ("-oQ/tmp@example.test", "a@example.test", "sender"),
    ("a@example.test", "b@example.test c@example.test", "to"),
    ("a@example.test", "", "to"),
])
def test_addresses_are_checked_before_anything_runs(ctx: Context, sender: str, to: str, field: str) -> None:
    with pytest.raises(localmail.NotSent) as err:
        localmail.send(ctx, SETTINGS, message(), sender, to)
    assert err.value.reason.startswith(field), err.value.reason


def test_an_oversized_message_is_refused(ctx: Context) -> None:
    msg = message()
    msg.set_content("x" * (localmail.MAX_BYTES + 1))
    with pytest.raises(localmail.NotSent, match="over 256 kB"):
        localmail.send(ctx, SETTINGS, msg, "a@example.test", "b@example.test")


def test_without_docker_it_says_so(ctx: Context) -> None:
    with pytest.raises(localmail.NotSent) as err:
        localmail.send(ctx, SETTINGS, message(), "a@example.test", "b@example.test")
    assert err.value.reason.startswith("cannot ask docker: no docker socket at "), err.value.reason
