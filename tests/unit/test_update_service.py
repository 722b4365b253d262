"""Installing a version (portal/update/service.py): what is refused before anything
changes, and the helpers that read the machine. systemd-sysupdate itself runs in
the VM tier, on a booted image."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from portal.core import store
from portal.update import feed, service, state
from tests.support.feeds import publish, serve


@pytest.fixture
def env(tmp_path: Path, feed_key: Path) -> Iterator[tuple[service.Env, Path]]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nIMAGE_ID=mailstead\nIMAGE_VERSION="0.2.0"\n')
    with serve(tmp_path / "www") as url:
        store.write_settings(state_dir, {"update_feed_url": url})
        yield service.Env(state_dir=state_dir, update_dir=tmp_path / "update", os_release=os_release,
                          esp=tmp_path / "esp", definitions=tmp_path / "run" / "sysupdate.d", keyring=feed_key,
                          efi_firmware=tmp_path / "no-efi"), tmp_path / "www" / "feed"


def test_nothing_newer_on_the_feed_changes_nothing(env, feed_key) -> None:
    e, folder = env
    publish(folder, ["0.1.9", "0.2.0"], feed_key.parent)
    assert service.install(e)["installed"] == ""
    assert not e.update_dir.exists() and not e.definitions.exists()


def test_an_older_version_asked_for_by_name_is_refused_before_anything_changes(env, feed_key) -> None:
    e, folder = env
    publish(folder, ["0.1.9", "0.2.0", "0.3.0"], feed_key.parent)
    with pytest.raises(service.InstallError, match="not newer than the running 0.2.0"):
        service.install(e, "0.1.9")
    assert not e.update_dir.exists()


def test_a_tampered_feed_is_refused_before_anything_changes(env, feed_key) -> None:
    e, folder = env
    publish(folder, ["0.3.0"], feed_key.parent)
    (folder / "SHA256SUMS").write_text((folder / "SHA256SUMS").read_text().replace("0.3.0", "0.3.1"))
    with pytest.raises(feed.FeedError, match="does not match SHA256SUMS"):
        service.install(e)
    assert not e.update_dir.exists() and state.read_record(e.update_dir)["pending"] is None


def test_the_running_version_comes_from_os_release(env) -> None:
    e, _ = env
    assert e.running_version() == "0.2.0"
    e.os_release.write_text("ID=debian\n")
    with pytest.raises(service.InstallError, match="names no IMAGE_VERSION"):
        e.running_version()


def test_definitions_are_written_for_the_feed_only_root_can_change(env) -> None:
    e, _ = env
    service.write_definitions(e, "https://updates.example.org/m/")
    names = sorted(p.name for p in e.definitions.iterdir())
    assert names == ["10-mailstead-root.transfer", "20-mailstead-kernel.transfer"]
    assert "Path=https://updates.example.org/m/" in (e.definitions / names[0]).read_text()
    assert all((e.definitions / n).stat().st_mode & 0o022 == 0 for n in names)


def test_installed_kernels_are_found_whatever_their_boot_counter(tmp_path) -> None:
    linux = tmp_path / "EFI" / "Linux"
    linux.mkdir(parents=True)
    for name in ("mailstead_0.2.0.efi", "mailstead_0.3.0+1-0.efi", "mailstead_0.4.0+0-1.efi", "other.efi",
                 "mailstead_x.efi"):
        (linux / name).write_bytes(b"")
    assert sorted(service.installed_kernels(tmp_path)) == ["0.2.0", "0.3.0", "0.4.0"]
    os.remove(linux / "mailstead_0.2.0.efi")
    assert sorted(service.installed_kernels(tmp_path)) == ["0.3.0", "0.4.0"]


def test_the_factory_boot_entry_goes_and_the_kernel_images_stay(env) -> None:
    e, _ = env
    entries = e.esp / "loader" / "entries"
    entries.mkdir(parents=True)
    (entries / "mailstead-6.12.118+deb13-amd64.conf").write_text("options root=PARTLABEL=mailstead_0.1.0\n")
    (entries / "other.conf").write_text("")
    service.drop_factory_entry(e)
    assert sorted(p.name for p in entries.iterdir()) == ["other.conf"]


# -- after the reboot: the trial, the deadline, going back -------------------------------------

@pytest.fixture
def portal(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The portal's /healthz behind TLS, as nginx serves it on the appliance."""
    import http.server
    import ssl
    import threading

    from tests.unit.checks_support import make_cert

    cert, key = make_cert(tmp_path / "tls", ["mailstead.test"], self_signed=True)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_a: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield ("127.0.0.1", httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def trial_env(env, start_agent, tmp_path) -> Iterator[service.Env]:
    """A machine that booted 0.2.0 after an update from 0.1.0, with its agent running."""
    from portal.agent.client import use_socket

    e, _ = env
    e.reboot, e.portal_wait = False, 3
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(e.state_dir), "MAILSTEAD_UPDATE_DIR": str(e.update_dir)})
    use_socket(str(agent.socket))
    try:
        yield e
    finally:
        use_socket(None)


def grubenv(e: service.Env) -> str:
    return subprocess.run(["grub-editenv", str(e.esp / "grub" / "grubenv"), "list"], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_a_new_version_that_passes_its_checks_is_kept(trial_env, portal, firmware) -> None:
    e = trial_env
    e.portal = portal
    if firmware == "bios":
        # As the install left GRUB: the running version the default, the new one booted once.
        (e.esp / "grub").mkdir(parents=True)
        subprocess.run(["grub-editenv", str(e.esp / "grub" / "grubenv"), "create"], check=True)
        service.grub_env(e, "saved_entry=mailstead_0.1.0", "next_entry=mailstead_0.2.0")
        assert "saved_entry=mailstead_0.1.0" in grubenv(e) and "next_entry=mailstead_0.2.0" in grubenv(e)
    state.begin(e.state_dir, e.update_dir, "0.1.0", "0.2.0", firmware)
    assert service.boot(e) == "trial"
    assert service.verify(e) == 0
    if firmware == "bios":
        assert "saved_entry=mailstead_0.2.0" in grubenv(e)  # the default only now
    last = state.history(e.update_dir)[0]
    assert last["outcome"] == "installed" and last["to"] == "0.2.0" and "passed its health checks" in last["message"]
    assert state.read_record(e.update_dir)["pending"] is None
    assert service.verify(e) == 0 and len(state.history(e.update_dir)) == 1  # an ordinary boot: nothing more
    assert service.deadline(e) == 0


def test_a_new_version_whose_portal_does_not_answer_fails_and_goes_back(trial_env) -> None:
    from tests.conftest import free_port

    e = trial_env
    e.portal = ("127.0.0.1", free_port())  # nothing listens: the portal is down
    state.begin(e.state_dir, e.update_dir, "0.1.0", "0.2.0", "uefi")
    assert service.verify(e) == 1
    last = state.history(e.update_dir)[0]
    assert last["outcome"] == "failed" and "does not answer" in last["message"]
    # The old version boots again: the state from before the update comes back, and
    # the owner is told once (no stack here: the alert says why no mail went out).
    e.os_release.write_text('IMAGE_VERSION="0.1.0"\n')
    assert service.boot(e) == "rolled_back"
    assert service.verify(e) == 0
    last = state.history(e.update_dir)[0]
    assert last["outcome"] == "rolled_back" and last["alerted"] is True and "not sent" in last["alerts"]


def test_a_new_version_still_on_trial_at_its_deadline_fails(trial_env) -> None:
    e = trial_env
    state.begin(e.state_dir, e.update_dir, "0.1.0", "0.2.0", "bios")
    assert service.deadline(e) == 1
    assert state.history(e.update_dir)[0]["outcome"] == "failed"
    assert "time limit" in state.history(e.update_dir)[0]["message"]


def test_going_back_by_choice_brings_the_stack_back_without_an_alert(trial_env) -> None:
    e = trial_env
    # 0.2.0 passed its trial after an update from 0.1.0; then the owner chose to go back.
    state.begin(e.state_dir, e.update_dir, "0.1.0", "0.2.0", "uefi")
    assert service.boot(e) == "trial" and state.finish(e.update_dir, "0.2.0", True, "passed")
    state.begin_rollback(e.update_dir, "0.2.0", "0.1.0", "uefi")
    e.os_release.write_text('IMAGE_VERSION="0.1.0"\n')
    assert service.boot(e) == "rolled_back"
    assert service.verify(e) == 0
    last = state.history(e.update_dir)[0]
    assert last["outcome"] == "rolled_back" and last["by"] == "owner" and last["alerted"] is True
    assert last["alerts"] == "no alert: the owner chose to go back", last
