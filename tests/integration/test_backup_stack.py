"""A real stack round trip: 1,000 messages in 3 mailboxes (encrypted at rest),
an alias, a calendar event, DKIM keys, the certificate and the settings, backed
up through the stack's own docker volumes; the stack and its state wiped
(`down --volumes`, state folder gone), restored onto a fresh state from the
recovery sheet's password. Every message is back (SHA-256), IMAP login with the
old passwords reads it, and the rest is byte-for-byte the same.
Compose project mstest-i6b, ports 32000+.

The images come from the harness's ensure_images (loaded from the image
build's output, building it first when it is missing)."""

from __future__ import annotations

import hashlib
import imaplib
import json
import shutil
import ssl
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path


import caldav
import docker

from portal.agent.registry import Context, docker_factory  # noqa: E402
from portal.backup import config as cfg  # noqa: E402
from portal.backup.contents import NOT_KEPT  # noqa: E402
from portal.backup.privileged import env_for  # noqa: E402
from portal.backup.service import backup, configure, restore, verify  # noqa: E402
from tests.support.statedb import read_setting, write_settings  # noqa: E402
from portal.stack import deploy as deploy_mod  # noqa: E402
from portal.backup.service import ComposeStack  # noqa: E402
from portal.stack.privileged import alias_add, mailbox_create, mailbox_list  # noqa: E402
from portal.stack.store import load_settings  # noqa: E402
from tests.conftest import retry  # noqa: E402

from .stackharness import DOMAIN, HOSTNAME, SHARED_DKIM, ensure_images, make_settings  # noqa: E402

PROJECT, PORT_BASE = "mstest-i6b", 32000
USERS = {f"alice@{DOMAIN}": ("alice-old-password-1", 400), f"bob@{DOMAIN}": ("bob-old-password-2", 350),
         f"carol@{DOMAIN}": ("carol-old-password-3", 250)}
ALIAS = (f"info@{DOMAIN}", f"alice@{DOMAIN}")
EVENT_UID = "mailstead-backup-round-trip-0001"


class LoadedImagesStack(ComposeStack):
    """ComposeStack (its real `compose down`), deployed like stack_deploy but from the
    harness's images (ensure_images), without the host nginx."""

    def start(self, progress) -> dict:
        client = docker.from_env(timeout=120)
        try:
            settings = load_settings(self.ctx.state_dir).with_images(ensure_images(client))
            result = deploy_mod.deploy(client, settings, timeout=600, progress=progress)
        finally:
            client.close()
        return {"services": {s: st.status for s, st in result.services.items()}}


def write_stack_settings(state: Path) -> None:
    s = make_settings(state, PROJECT, PORT_BASE)  # makes the certificate under state/tls
    write_settings(state / "state.db", {
        "domain": DOMAIN, "mail_host": HOSTNAME, "publish_addresses": "127.0.0.1",
        "stack_ports": json.dumps(s.ports, sort_keys=True), "dns_servers": ",".join(s.dns_servers), "stack_deployed": "1",
        "stack_subnet": s.subnet})
    write_machine_settings(state)
    shutil.copytree(SHARED_DKIM, s.dkim_dir, dirs_exist_ok=True)


def write_machine_settings(state: Path) -> None:
    """The settings that are the machine's own (never taken from a backup): the test rig's
    compose project and certificate paths."""
    write_settings(state / "state.db", {"stack_project": PROJECT, "tls_cert": str(state / "tls" / "cert.pem"),
                                        "tls_key": str(state / "tls" / "key.pem")})


def context(state: Path, tmp: Path) -> Context:
    (tmp / "nginx").mkdir(exist_ok=True)
    (tmp / "www").mkdir(exist_ok=True)
    ctx = Context(docker=docker_factory("unix:///var/run/docker.sock", timeout=120), state_dir=state,
                  images_dir=tmp / "no-images", nginx_dir=tmp / "nginx", www_dir=tmp / "www", reload_nginx=False)
    ctx.backup_stack = LoadedImagesStack(ctx)  # type: ignore[attr-defined]
    return ctx


def imap(state: Path) -> imaplib.IMAP4_SSL:
    tls = ssl.create_default_context(cafile=str(state / "tls" / "cert.pem"))
    tls.check_hostname = False
    return imaplib.IMAP4_SSL("127.0.0.1", PORT_BASE + 993, ssl_context=tls, timeout=30)


def read_all(state: Path, user: str, password: str) -> list[str]:
    """SHA-256 of every message in the INBOX (one FETCH for all), sorted."""
    with imap(state) as conn:
        conn.login(user, password)
        typ, count = conn.select("INBOX", readonly=True)
        if int(count[0]) == 0:
            return []
        _typ, data = conn.fetch("1:*", "(BODY.PEEK[])")
        return sorted(hashlib.sha256(part[1]).hexdigest() for part in data if isinstance(part, tuple))


def dav(user: str) -> caldav.DAVClient:
    client = caldav.DAVClient(url=f"http://127.0.0.1:{PORT_BASE + 232}/", username=user,
                              password=USERS[user][0], timeout=60)
    client.session.trust_env = False
    return client


def snapshot_of_files(state: Path) -> dict[str, bytes]:
    """The keys and certificate that must come back byte for byte."""
    files = sorted((state / "secrets" / "dkim").rglob("*")) + [state / "tls" / "cert.pem", state / "tls" / "key.pem"]
    return {str(f.relative_to(state)): f.read_bytes() for f in files if f.is_file()}


def compose_down(volumes: bool) -> None:
    subprocess.run(["docker", "compose", "-p", PROJECT, "down", "--remove-orphans", *(["--volumes"] if volumes else [])],
                   capture_output=True, timeout=300, check=False)


def test_stack_round_trip_through_restic(tmp_path):
    state = tmp_path / "state"
    compose_down(volumes=True)  # an interrupted earlier run
    try:
        write_stack_settings(state)
        ctx = context(state, tmp_path)
        ctx.backup_stack.start(lambda *_: None)
        sent: dict[str, list[str]] = {}
        for user, (password, n) in USERS.items():
            mailbox_create.run(ctx, address=user, password=password)
            with imap(state) as conn:
                conn.login(user, password)
                for i in range(n):
                    msg = EmailMessage()
                    msg["From"], msg["To"], msg["Subject"] = "someone@example.net", user, f"round trip {i}"
                    msg.set_content(f"message {i} for {user}\n" * 20)
                    conn.append("INBOX", "", imaplib.Time2Internaldate(time.time()), msg.as_bytes())
            sent[user] = read_all(state, user, password)
            assert len(sent[user]) == n
        alias_add.run(ctx, source=ALIAS[0], destination=ALIAS[1])
        accounts_before = mailbox_list.run(ctx)
        calendar = retry(lambda: dav(ALIAS[1]).principal(), 60, "radicale").make_calendar(name="Work", cal_id="work")
        calendar.save_event("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Mailstead tests//EN\r\n"
                            f"BEGIN:VEVENT\r\nUID:{EVENT_UID}\r\nDTSTAMP:20300101T080000Z\r\n"
                            "DTSTART:20300102T090000Z\r\nDTEND:20300102T100000Z\r\n"
                            "SUMMARY:Backed up and back\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
        files_before = snapshot_of_files(state)
        settings_before = {k: read_setting(state / "state.db", k) for k in ("domain", "mail_host", "stack_ports")}

        env = env_for(ctx)
        made = configure(env, cfg.validate("local", path=str(tmp_path / "repo")))
        password = next(x.split(":", 1)[1].strip() for x in made["recovery_sheet"].splitlines()
                        if x.startswith("Password:"))
        events: list[tuple[str, str]] = []
        result = backup(env, lambda s, d: events.append((s, d)))
        assert result["messages"] == 1000 and result["mailboxes"] == 3
        # the stack's real volumes hold nothing a restore would refuse: nothing left out or changed
        assert not [d for s, d in events if s == "contents"], events
        assert {"mail", "dav", "redis", "rspamd"} <= set(result["volumes"])
        assert verify(env)["ok"] is True
        # rspamd's hyperscan caches (~90 MB, made again at start) stay out; its data does not
        rspamd_volume = tmp_path / "rspamd-volume"
        assert env.volume_io().dump("rspamd", rspamd_volume, NOT_KEPT["rspamd"])
        kept = {p.name for p in rspamd_volume.rglob("*") if p.is_file()}
        assert "rspamd.rrd" in kept and not [n for n in kept if ".hs" in n], sorted(kept)

        # Everything is lost: the stack with its volumes, and the state folder.
        compose_down(volumes=True)
        shutil.rmtree(state)
        for vol in ("mail", "dav"):
            r = subprocess.run(["docker", "volume", "inspect", f"{PROJECT}_{vol}"], capture_output=True)
            assert r.returncode != 0, f"{vol} volume still there"

        state.mkdir()
        write_machine_settings(state)  # a fresh machine of the test rig
        ctx = context(state, tmp_path)
        env = env_for(ctx)
        configure(env, cfg.validate("local", path=str(tmp_path / "repo")), password=password)
        steps: list[tuple[str, str]] = []
        done = restore(env, "latest", lambda s, d: steps.append((s, d)))
        assert done["messages"] == 1000 and done["stack"]["services"]
        assert [s for s, _ in steps].count("deploy") >= 1
        states = deploy_mod.service_states(docker.from_env(), PROJECT)
        assert all(st.ok for st in states.values()), states

        for user, (old_password, _n) in USERS.items():
            got = retry(lambda u=user, p=old_password: read_all(state, u, p), 60, f"IMAP login as {user}")
            assert got == sent[user]
        assert mailbox_list.run(ctx) == accounts_before
        assert {"source": ALIAS[0], "destination": ALIAS[1]} in accounts_before["aliases"]
        assert snapshot_of_files(state) == files_before and len(files_before) >= 4
        assert {k: read_setting(state / "state.db", k) for k in settings_before} == settings_before
        event = retry(lambda: dav(ALIAS[1]).principal().calendar(cal_id="work").event_by_uid(EVENT_UID), 60,
                      "the restored calendar")
        assert str(event.icalendar_component["summary"]) == "Backed up and back"
    finally:
        compose_down(volumes=True)
