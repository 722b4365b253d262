"""The owner's update controls in the agent (portal/update/privileged.py): what the
feed offers, refusals that change nothing, the settings, and what the window does
when it must not install. Installing itself (a unit of root's, a reboot) runs in
the VM tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from portal.agent import registry as ops
from portal.agent.registry import OpError
from portal.core import store
from portal.update import privileged as upd
from portal.update import state
from tests.support.feeds import publish, serve


@pytest.fixture
def ctx(tmp_path: Path, feed_key: Path) -> Iterator[tuple[ops.Context, Path]]:
    os_release = tmp_path / "os-release"
    os_release.write_text('IMAGE_ID=mailstead\nIMAGE_VERSION="0.2.0"\n')
    (tmp_path / "state").mkdir()
    (tmp_path / "update").mkdir()
    with serve(tmp_path / "www") as url:
        store.write_settings(tmp_path / "state", {"update_feed_url": url})
        yield ops.Context(state_dir=tmp_path / "state", update_dir=tmp_path / "update", os_release=os_release,
                          update_keyring=feed_key), tmp_path / "www" / "feed"


def op(name: str, c: ops.Context, **args):
    return ops.load_all()[name].run_checked(c, args)


def test_the_check_says_what_the_feed_offers_and_keeps_it(ctx, feed_key) -> None:
    c, folder = ctx
    publish(folder, ["0.1.9", "0.2.0", "0.3.0"], feed_key.parent)
    out = op("update_check", c)
    assert out["ok"] and out["available"] and out["newest"] == "0.3.0" and out["notes"]["notes"] == ["Version 0.3.0"]
    status = op("update_status", c)
    assert status["running"] == "0.2.0" and status["check"]["newest"] == "0.3.0" and status["auto"] is True
    assert status["history"] == [] and status["rollback_to"] is None


def test_install_now_is_refused_when_nothing_newer_or_the_feed_is_bad(ctx, feed_key) -> None:
    c, folder = ctx
    publish(folder, ["0.1.9", "0.2.0"], feed_key.parent)
    with pytest.raises(OpError) as err:
        op("update_install", c)
    assert err.value.code == "not_newer" and "Up to date" in err.value.message
    publish(folder, ["0.3.0"], None)  # the signature is the old list's
    with pytest.raises(OpError) as err:
        op("update_install", c)
    assert err.value.code == "feed" and err.value.field == "update_feed_url"
    assert state.read_record(c.update_dir)["pending"] is None


def test_going_back_is_refused_without_a_previous_version(ctx) -> None:
    c, _ = ctx
    with pytest.raises(OpError) as err:
        op("update_rollback", c)
    assert err.value.code == "no_previous"


def test_the_window_installs_nothing_when_off_or_when_that_version_failed_here(ctx, feed_key) -> None:
    c, folder = ctx
    publish(folder, ["0.3.0"], feed_key.parent)
    store.write_settings(c.state_dir, {"update_auto": "0"})
    assert "Automatic updates are off" in op("update_window", c)["message"]
    store.write_settings(c.state_dir, {"update_auto": "1"})
    state.add_history(c.update_dir, "rolled_back", **{"from": "0.2.0", "to": "0.3.0", "by": "health"})
    out = op("update_window", c)
    assert "Not installed by the window: 0.3.0 rolled back here" in out["message"]
    # The Updates page says so next to "Install now".
    assert op("update_status", c)["window_skips"].startswith("0.3.0 rolled back here on ")
    publish(folder, ["0.3.0", "0.3.1"], feed_key.parent)
    op("update_check", c)
    assert op("update_status", c)["window_skips"] is None


def test_the_settings_are_checked_and_name_the_field(ctx) -> None:
    c, _ = ctx
    for args, field in (({"time_zone": "Mars/Olympus"}, "time_zone"), ({"window_hour": 24}, "window_hour"),
                        ({"feed_url": "ftp://updates.example.org/"}, "update_feed_url"),
                        ({"feed_url": "https://u:p@updates.example.org/"}, "update_feed_url")):
        full = {"auto": True, "feed_url": "", "time_zone": "", "window_hour": 4, **args}
        with pytest.raises(OpError) as err:
            op("update_configure", c, **full)
        assert err.value.field == field, (args, err.value)
    assert store.read_settings(c.state_dir).get("update_auto", "") == ""  # nothing was stored


def test_port_25_must_take_mail_for_the_admin_and_nothing_is_sent() -> None:
    import threading
    from types import SimpleNamespace

    from tests.conftest import free_port
    from tests.support.smtp import SmtpSink

    sink = SmtpSink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        settings = SimpleNamespace(ports={"smtp": sink.port}, publish_addresses=("127.0.0.1",),
                                   hostname="mail.example.test")
        assert upd.smtp_accepts(settings, "postmaster@example.test", 5) is None
        assert sink.messages == []  # the envelope only: RSET, no message
        closed = SimpleNamespace(ports={"smtp": free_port()}, publish_addresses=("127.0.0.1",),
                                 hostname="mail.example.test")
        why = upd.smtp_accepts(closed, "postmaster@example.test", 0)
        assert why and why.startswith("port 25 (127.0.0.1:") and "does not accept mail" in why
    finally:
        sink.shutdown()
        sink.server_close()
