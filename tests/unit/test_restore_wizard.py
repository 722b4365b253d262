"""The wizard's "Restore from a backup" (portal/web/restore.py) without restic: the
choice on the first page, the pure helpers (time stamps, the DNS note, which field an
agent refusal belongs to), and the gate: the path is only for the setup session before
setup is complete, except the progress and outcome of the restore that session started.
The walk with real backups is tests/integration/test_wizard_restore.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flask import Flask

from portal.agent.client import AgentError
from portal.web import restore
from tests.unit.conftest import https_client
from tests.unit.test_fuzz_forms import Rig, csrf_of

RESTORE_PAGES = ("/setup/restore", "/setup/restore/snapshots", "/setup/restore/confirm",
                 "/setup/restore/progress", "/setup/restore/done", "/setup/restore/status")


@pytest.mark.parametrize(("stamp", "shown"), [
    ("2026-05-01T10:11:12.123456789+02:00", "2026-05-01 08:11 UTC"),
    ("2026-05-01T10:11:12Z", "2026-05-01 10:11 UTC"),
    ("2026-05-01T10:11:12.5Z", "2026-05-01 10:11 UTC"),
    ("2026-05-01T10:11:12", "2026-05-01 10:11 UTC"),
    ("yesterday", "yesterday"),
    ("", "unknown time"),
])
def test_restic_times_are_shown_in_utc(stamp: str, shown: str) -> None:
    assert restore.when(stamp) == shown


@pytest.mark.parametrize(("settings", "found", "verdicts"), [
    ({"public_ipv4": "198.51.100.7"}, {"ipv4": ["198.51.100.7"], "ipv6": []}, {"4": "same"}),
    ({"public_ipv4": "198.51.100.7"}, {"ipv4": ["203.0.113.9"], "ipv6": []}, {"4": "differs"}),
    ({"public_ipv4": "198.51.100.7"}, {"ipv4": [], "ipv6": []}, {"4": "unknown"}),  # behind NAT?
    ({"public_ipv4": "198.51.100.7"}, None, {"4": "unknown"}),  # the agent could not tell
    ({"public_ipv4": "198.51.100.7", "public_ipv6": "2001:db8::7"},
     {"ipv4": ["198.51.100.7"], "ipv6": ["2001:DB8:0::7"]}, {"4": "same", "6": "same"}),  # compared as addresses
    ({"public_ipv4": "198.51.100.7", "public_ipv6": "2001:db8::7"},
     {"ipv4": ["198.51.100.7"], "ipv6": ["2001:db8::8"]}, {"4": "same", "6": "differs"}),
    ({"public_ipv4": "198.51.100.7", "public_ipv6": ""}, {"ipv4": ["198.51.100.7"], "ipv6": ["2001:db8::8"]},
     {"4": "same", "6": "none"}),
    ({}, {"ipv4": [], "ipv6": []}, {}),
    ({"public_ipv4": "198.51.100.7"}, {"ipv4": ["junk", "198.51.100.7"], "ipv6": []}, {"4": "same"}),
])
def test_address_notes_compare_the_restored_settings_with_this_appliance(settings: dict[str, str], found: dict,
                                                                          verdicts: dict[str, str]) -> None:
    notes = restore.address_notes(settings, found)
    assert {n["version"]: n["verdict"] for n in notes} == verdicts
    for n in notes:
        assert n["restored"] == settings.get(f"public_ipv{n['version']}", "")


@pytest.mark.parametrize(("kind", "code", "message", "field"), [
    ("local", "wrong_password", "password: the repository password does not match; use the password from the "
                                "recovery sheet", "password"),
    ("local", "invalid", "path: must be an absolute folder", "path"),
    ("local", "no_repository", "target: there is no restic repository at /x (is the disk mounted?)", "path"),
    ("sftp", "no_repository", "target: there is no restic repository at sftp:x:/y", "path"),
    ("s3", "no_repository", "target: there is no restic repository at s3:x", "bucket"),
    ("sftp", "unreachable", "target: cannot reach the SFTP server h port 22 (x); is it up?", "host"),
    ("s3", "unreachable", "target: cannot reach s3:http://x/b: dial tcp; is it up?", "endpoint"),
    ("sftp", "bad_credentials", "key: the SFTP server h refused user u; add the public key to authorized_keys",
     "key"),
    ("s3", "bad_credentials", "secret_access_key: the S3 store does not match", "secret_access_key"),
    ("local", "invalid", "target: 'x' is not a backup target", "target"),
    ("local", "locked", "target: the repository is locked by another restic process", None),
    ("local", "restic_failed", "restic cat failed (exit 1): boom", None),
    ("local", "invalid", "host: not for a local target", None),  # a field this kind does not show
    ("local", "unavailable", "the agent is not running", None),
])
def test_agent_refusals_go_on_the_field_that_fixes_them(app: Flask, kind: str, code: str, message: str,
                                                        field: str | None) -> None:
    with app.test_request_context("/setup/restore", method="POST", data={"target": kind}):
        form = restore.TargetForm(meta={"csrf": False})
        form.validate()
        form.target.data = kind
        for f in form:
            f.errors = []
        # As the agent sends it: the field as data, the message without it.
        named, sep, rest = message.partition(": ")
        err = AgentError(code, rest, named) if sep and named.replace("_", "").isalpha() else AgentError(code, message)
        left = restore.attach_error(form, err)
        with_errors = [f.name for f in form if f.errors]
        if field is None:
            assert left == err.message and with_errors == []
        else:
            assert left is None and with_errors == [field]
            shown = form[field].errors[0]
            assert shown[0] == shown[0].upper() and not shown.startswith(f"{field}:")


def test_the_first_page_after_the_token_offers_the_restore(rig: Callable[..., Rig]) -> None:
    r = rig("at:domain")
    page = r.client.get("/setup/domain")
    assert 'id="setup-choice"' in page.text and 'href="/setup/restore"' in page.text
    assert "Set up a new appliance" in page.text and "Restore from a backup" in page.text
    target = r.client.get("/setup/restore")
    assert target.status_code == 200 and "recovery sheet" in target.text
    # (the first page only: once a step is done, the choice is not offered there any more)
    r2 = rig("at:admin")
    assert 'id="setup-choice"' not in r2.client.get("/setup/domain").text


def test_the_restore_pages_need_the_setup_session(rig: Callable[..., Rig]) -> None:
    r = rig("token")
    for path in RESTORE_PAGES:
        response = r.client.get(path)
        assert response.status_code == 302 and response.headers["Location"] == "/setup/token", path


def test_later_restore_pages_go_back_to_what_is_missing(rig: Callable[..., Rig]) -> None:
    r = rig("at:domain")
    before = r.stored()
    token = csrf_of(r.client.get("/setup/restore").text)
    for path, target in (("/setup/restore/snapshots", "/setup/restore"), ("/setup/restore/confirm", "/setup/restore/snapshots"),
                         ("/setup/restore/progress", "/setup/restore"), ("/setup/restore/done", "/setup/restore")):
        response = r.client.get(path)
        assert response.status_code == 303 and response.headers["Location"] == target, path
    started = r.client.post("/setup/restore/start", data={"csrf_token": token})
    assert started.status_code == 303 and started.headers["Location"] == "/setup/restore/snapshots"
    assert r.client.get("/setup/restore/status").get_json() == {"job": None}
    assert r.stored() == before


def test_the_agent_refuses_the_wizard_restore_once_setup_is_complete(rig: Callable[..., Rig]) -> None:
    r = rig("login")
    with pytest.raises(AgentError) as err:
        r.agent_call("setup_restore", snapshot="latest")
    assert err.value.code == "forbidden" and "dashboard" in str(err.value)


def test_the_agent_checks_the_snapshot_and_needs_a_target_first(rig: Callable[..., Rig]) -> None:
    r = rig("at:domain")
    with pytest.raises(AgentError) as err:
        r.agent_call("setup_restore", snapshot="../../etc")
    assert err.value.code == "invalid" and str(err.value).startswith("snapshot:")
    job = r.agent_call("setup_restore", snapshot="latest")
    deadline = time.monotonic() + 30
    while job["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
        job = r.agent_call("job_status", job_id=job["id"])
    assert job["state"] == "failed" and "backups are not configured yet" in job["error"]
    assert (r.state_dir / "setup-token").exists()  # setup is not complete: the token stays


@pytest.mark.parametrize("state", ["login", "dashboard"])
def test_the_restore_path_is_refused_once_setup_is_complete(rig: Callable[..., Rig], state: str) -> None:
    r = rig(state)
    home = "/admin" if state == "dashboard" else "/login"
    for path in RESTORE_PAGES:
        response = r.client.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith(home), path
    response = r.client.post("/setup/restore", data={"csrf_token": csrf_of(r.client.get("/login").text) or "",
                                                     "target": "local", "path": "/x", "password": "p"})
    assert response.status_code in (302, 303, 400)
    assert not (r.state_dir / "secrets" / "backup.json").exists()


def test_a_setup_session_keeps_only_its_restores_outcome_after_setup_completes(rig: Callable[..., Rig]) -> None:
    """The restored state says setup is complete while its setup session still watches."""
    r = rig("login")
    with r.client.session_transaction() as s:
        s["setup"] = True
        s["restore_job"] = "20260101000000-setup_restore-00000000"  # (gone: the agent says so)
    status = r.client.get("/setup/restore/status")
    assert status.status_code == 503 and status.get_json()["job"] is None
    done = r.client.get("/setup/restore/done")
    assert done.status_code == 404 and "did not finish" in done.text and 'id="restore-sign-in"' in done.text
    form = r.client.get("/setup/restore")  # anything else: the dashboard's gate, and the session ends
    assert form.status_code == 302 and form.headers["Location"].startswith("/login")
    assert r.client.get("/setup/restore/done").headers["Location"].startswith("/login")
    # a setup session that started no restore gets nothing
    other = https_client(r.app)
    with other.session_transaction() as s:
        s["setup"] = True
    assert other.get("/setup/restore/status").headers["Location"].startswith("/login")
