"""portal.backup: target validation naming the field, secrets on disk, the
manifest and its comparison, the checks of a restored snapshot (untrusted input),
retention arguments, restic failures explained."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from portal.backup import BackupError
from portal.backup import config as cfg
from portal.backup.contents import FolderVolumes, check_snapshot, check_tree, compare, scan_mail, stage
from portal.backup.restic import RETENTION, explain, retention_args
from portal.backup.service import check_snapshot_id, version_tuple

S3 = {"endpoint": "https://s3.example.com", "bucket": "mailstead-backup",
      "access_key_id": "AKIAEXAMPLE", "secret_access_key": "s3cr3t-value"}
SFTP = {"host": "backup.example.net", "user": "mailstead", "path": "/srv/backup"}


@pytest.mark.parametrize("kind, fields, field", [
    ("tape", {}, "target"),
    ("local", {}, "path"),
    ("local", {"path": "relative/folder"}, "path"),
    ("local", {"path": "/mnt/../etc"}, "path"),
    # read-only in the agent's sandbox (mailstead-agent.service)
    ("local", {"path": "/"}, "path"),
    ("local", {"path": "/etc/backup"}, "path"),
    ("local", {"path": "/usr/local/backup"}, "path"),
    ("local", {"path": "/home/owner/backup"}, "path"),
    ("local", {"path": "/root//backup"}, "path"),
    ("sftp", {**SFTP, "host": ""}, "host"),
    ("sftp", {**SFTP, "host": "bad host!"}, "host"),
    ("sftp", {**SFTP, "port": 70000}, "port"),
    ("sftp", {**SFTP, "user": ""}, "user"),
    ("sftp", {**SFTP, "user": "a b"}, "user"),
    ("sftp", {**SFTP, "path": ""}, "path"),
    ("sftp", {**SFTP, "path": "/srv/x; rm -rf /"}, "path"),
    ("s3", {**S3, "endpoint": ""}, "endpoint"),
    ("s3", {**S3, "endpoint": "ftp://s3.example.com"}, "endpoint"),
    ("s3", {**S3, "endpoint": "s3.example.com"}, "endpoint"),
    ("s3", {**S3, "endpoint": "https://user:pw@s3.example.com"}, "endpoint"),
    ("s3", {**S3, "endpoint": "https://s3.example.com/bucket"}, "endpoint"),
    ("s3", {**S3, "endpoint": "https://s3.example.com:99999"}, "endpoint"),
    ("s3", {**S3, "bucket": "Upper_Case"}, "bucket"),
    ("s3", {**S3, "bucket": ""}, "bucket"),
    ("s3", {**S3, "access_key_id": ""}, "access_key_id"),
    ("s3", {**S3, "secret_access_key": " "}, "secret_access_key"),
    ("s3", {**S3, "path": "a/../b"}, "path"),
    ("s3", {**S3, "region": "EU West"}, "region"),
])
def test_bad_target_names_the_field(kind, fields, field):
    with pytest.raises(BackupError) as err:
        cfg.validate(kind, **fields)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")
    secret = fields.get("secret_access_key", "").strip()
    if secret:
        assert secret not in str(err.value)


def test_good_targets_and_their_repositories():
    assert cfg.validate("local", path="/mnt/backup/").repository() == "/mnt/backup"
    for path in ("/media/usb/mailstead", "/srv/backup", "/var/backups/mailstead", "/etcetera", "/homes"):
        assert cfg.validate("local", path=path).repository() == path
    sftp = cfg.validate("sftp", **SFTP)
    assert sftp.port == 22 and sftp.repository() == "sftp:mailstead-backup:/srv/backup"
    s3 = cfg.validate("S3", **S3, path="/box1/")
    assert s3.repository() == "s3:https://s3.example.com/mailstead-backup/box1"
    public = s3.public()
    assert "secret_access_key" not in public and "s3cr3t" not in json.dumps(public)
    assert public["access_key_id"] == "AKIA…"


def test_credentials_reach_restic_by_environment_only(tmp_path):
    s3 = cfg.validate("s3", **S3)
    paths = cfg.Paths(tmp_path)
    env = cfg.restic_env(paths, s3, tmp_path / "cache")
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    assert env["RESTIC_PASSWORD_FILE"] == str(tmp_path / "backup-password")
    assert "s3cr3t" not in env["RESTIC_REPOSITORY"]
    assert not any(k.startswith("RESTIC_PASSWORD") and k != "RESTIC_PASSWORD_FILE" for k in env)


def test_secrets_are_0600_in_a_0700_folder(tmp_path):
    paths = cfg.Paths(tmp_path / "secrets")
    cfg.write_secret(paths.password, "pw\n")
    cfg.save_target(paths, cfg.validate("s3", **S3), "2026-01-01T00:00:00+00:00")
    assert stat.S_IMODE(paths.secrets.stat().st_mode) == 0o700
    for p in (paths.password, paths.config):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert cfg.load_target(paths).secret_access_key == "s3cr3t-value"


def test_load_target_unconfigured_says_what_to_do(tmp_path):
    with pytest.raises(BackupError) as err:
        cfg.load_target(cfg.Paths(tmp_path))
    assert err.value.code == "not_configured" and "backup configure" in str(err.value)


def test_password_is_long_random_and_typeable():
    a, b = cfg.new_password(), cfg.new_password()
    assert a != b and len(a.replace("-", "")) == 32
    assert not set(a) & set("01ilo")


def test_recovery_sheet_holds_what_a_restore_needs():
    t = cfg.validate("s3", **S3)
    sheet = cfg.recovery_sheet(t, "abcd-efgh", "0.3.1", "mail.example.test")
    for needed in ("abcd-efgh", t.repository(), "0.3.1", "mail.example.test", "UTC", "Restore from backup",
                   "AKIAEXAMPLE"):
        assert needed in sheet
    assert "s3cr3t-value" not in sheet


def test_retention_defaults_and_policy():
    assert RETENTION == {"daily": 7, "weekly": 4, "monthly": 12}
    args = retention_args()
    assert args[0] == "forget" and args[-1] == "--prune"
    assert " ".join(args).count("--keep-") == 3
    assert "--keep-daily 7 --keep-weekly 4 --keep-monthly 12" in " ".join(args)
    assert "--keep-weekly" not in retention_args({"weekly": 0})
    with pytest.raises(BackupError):
        retention_args({"daily": 0, "weekly": 0, "monthly": 0})
    with pytest.raises(BackupError) as err:
        retention_args({"daily": -1})
    assert err.value.field == "keep_daily"


def _mail(root: Path, box: str, n: int, folder: str = "INBOX") -> dict[str, str]:
    local, domain = box.split("@")
    d = root / domain / local / "mail" / "mailboxes" / folder / "dbox-Mails"
    d.mkdir(parents=True, exist_ok=True)
    sums = {}
    for i in range(n):
        p = d / f"u.{i + 1}"
        p.write_bytes(f"{box} message {i}\n".encode() * (i + 1))
        sums[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    (d.parent / "dovecot.index.log").write_bytes(b"index, not a message")
    return sums


def test_manifest_counts_messages_per_mailbox_with_sha256(tmp_path):
    root = tmp_path / "mail"
    a = _mail(root, "alice@example.test", 3)
    a.update(_mail(root, "alice@example.test", 2, "Sent"))
    b = _mail(root, "bob@example.test", 4)
    boxes = scan_mail(root)
    assert set(boxes) == {"alice@example.test", "bob@example.test"}
    assert boxes["alice@example.test"]["messages"] == 5 and boxes["bob@example.test"]["messages"] == 4
    assert boxes["alice@example.test"]["files"] == a and boxes["bob@example.test"]["files"] == b


def _state(tmp_path: Path) -> tuple[Path, FolderVolumes]:
    from tests.support.statedb import write_settings

    state = tmp_path / "state"
    write_settings(state / "state.db", {"domain": "example.test"})
    (state / "secrets" / "dkim").mkdir(parents=True)
    (state / "secrets" / "dkim" / "rsa.key").write_text("dkim key")
    cfg.write_secret(state / "secrets" / "backup-password", "not in the backup\n")
    (state / "secrets" / "admin-sessions.json").write_text("{}")  # this machine's sign-ins
    (state / "tls" / "archive" / "20300101T000000Z-1").mkdir(parents=True)
    (state / "tls" / "archive" / "20300101T000000Z-1" / "fullchain.pem").write_text("cert")
    os.symlink("archive/20300101T000000Z-1", state / "tls" / "live")
    os.symlink("/etc/passwd", state / "tls" / "stray")  # nothing the agent makes
    vols = tmp_path / "vols"
    _mail(vols / "mail", "alice@example.test", 2)
    return state, FolderVolumes(vols)


def test_stage_lists_every_file_and_compare_finds_damage(tmp_path):
    state, vols = _state(tmp_path)
    staging = tmp_path / "staging"
    info = {"version": "0.1.0", "created": "now", "settings": {"domain": "example.test"}}
    events: list[tuple[str, str]] = []
    manifest = stage(state, staging, vols, info, lambda s, d: events.append((s, d)))
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert manifest["format"] == 2 and manifest["version"] == "0.1.0" and manifest["messages"] == 2
    assert manifest["volumes"] == ["mail"]
    assert json.loads((staging / "manifest.json").read_text()) == manifest
    assert (staging / "files/secrets/dkim/rsa.key").read_text() == "dkim key"
    assert not (staging / "files/secrets/backup-password").exists()  # the backup's own password stays out
    assert not (staging / "files/secrets/admin-sessions.json").exists()  # so do this machine's sessions
    # every file is listed with its SHA-256, not only messages and databases
    on_disk = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["sha256"]) == on_disk and "files/secrets/dkim/rsa.key" in on_disk
    assert manifest["sha256"]["files/secrets/dkim/rsa.key"] == hashlib.sha256(b"dkim key").hexdigest()
    # the one symlink the layout has is data; any other is left out and said
    assert manifest["links"] == {"files/tls/live": "archive/20300101T000000Z-1"}
    assert manifest["skipped"] == ["files/tls/stray"] and not (staging / "files/tls/stray").exists()
    assert any(s == "contents" and "files/tls/stray" in d for s, d in events)
    assert not [p for p in staging.rglob("*") if p.is_symlink()]
    # The messages are the volume's own files (hard links: their writer never changes them);
    # everything else is a copy. restic keeps each as one file: a restore has no links.
    for staged in (staging / "volumes/mail").rglob("*"):
        source = vols.root / "mail" / staged.relative_to(staging / "volumes/mail")
        if staged.is_file():
            assert staged.read_bytes() == source.read_bytes()
            assert os.path.samefile(staged, source) == staged.name.startswith("u."), staged
    restored = tmp_path / "restored"
    shutil.copytree(staging, restored, symlinks=True)
    assert check_snapshot(manifest, restored) == ([], manifest["links"])
    msg = next((restored / "volumes/mail").rglob("u.1"))
    msg.write_bytes(b"tampered")
    next((restored / "volumes/mail").rglob("u.2")).unlink()
    (restored / "files/tls/archive/20300101T000000Z-1/fullchain.pem").write_bytes(b"damaged")
    (restored / "files/secrets/planted.key").write_text("not listed")
    problems = compare(manifest, restored)
    assert any(p.endswith("/u.1 differs from the manifest (SHA-256 mismatch)") for p in problems), problems
    assert any(p.endswith("/u.2 is missing") for p in problems)
    assert "files/tls/archive/20300101T000000Z-1/fullchain.pem differs from the manifest (SHA-256 mismatch)" \
        in problems
    assert "files/secrets/planted.key is in the snapshot but not in its manifest" in problems
    assert "alice@example.test: 1 messages restored, the manifest lists 2" in problems


def test_stage_makes_volumes_restorable_as_they_are_checked(tmp_path):
    """A volume's special files are left out, hard links copied apart, setuid and
    world-writable modes taken off: what a restore would refuse is never backed up."""
    state, vols = _state(tmp_path)
    box = next((vols.root / "mail").rglob("dbox-Mails"))
    os.mkfifo(box / "fifo")
    os.symlink("/etc/shadow", box / "link")
    os.link(box / "u.1", box / "u.1.again")
    (box / "suid").write_text("x")
    os.chmod(box / "suid", 0o4755)
    os.chmod(box, 0o2777)
    manifest = stage(state, tmp_path / "staging", vols, {"version": "0.1.0"}, lambda *_: None)
    staged_box = tmp_path / "staging" / "volumes" / "mail" / box.relative_to(vols.root / "mail")
    assert not (staged_box / "fifo").exists() and not (staged_box / "link").is_symlink()
    assert {"volumes/mail/" + (box / n).relative_to(vols.root / "mail").as_posix() for n in ("fifo", "link")} \
        <= set(manifest["skipped"])
    assert os.stat(staged_box / "u.1").st_nlink == 1 and (staged_box / "u.1.again").read_bytes() == \
        (box / "u.1").read_bytes()
    assert stat.S_IMODE(os.stat(staged_box / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(staged_box).st_mode) == 0o2775  # a folder's setgid bit is kept
    # The volume itself is untouched: its modes stay, its messages are linked, not moved.
    assert stat.S_IMODE(os.stat(box / "suid").st_mode) == 0o4755 and stat.S_IMODE(os.stat(box).st_mode) == 0o2777
    assert os.path.samefile(staged_box / "u.2", box / "u.2")  # one name in the volume: linked
    assert not os.path.samefile(staged_box / "u.1", box / "u.1")  # two names there: copied
    # What restic keeps of this tree (each name one file) passes the restore's check.
    shutil.copytree(tmp_path / "staging", tmp_path / "restored", symlinks=True)
    assert check_tree(tmp_path / "restored") == ([], {})


def test_stage_leaves_rspamds_caches_out(tmp_path):
    """rspamd's hyperscan caches are made again at start: not in the backup, its data is."""
    state, vols = _state(tmp_path)
    rspamd = vols.root / "rspamd"
    rspamd.mkdir()
    for name in ("a1.hsmp", "a1.hsmp.unser", "b2.hs", "b2.hs.unser", "c3.hsmc", "hsmp-XYZ", "stats.ucl",
                 "rspamd.rrd"):
        (rspamd / name).write_text(name)
    manifest = stage(state, tmp_path / "staging", vols, {"version": "0.1.0"}, lambda *_: None)
    assert manifest["volumes"] == ["mail", "rspamd"]
    assert sorted(p.name for p in (tmp_path / "staging/volumes/rspamd").iterdir()) == ["rspamd.rrd", "stats.ucl"]
    assert sorted(p.name for p in rspamd.iterdir())[:2] == ["a1.hsmp", "a1.hsmp.unser"]  # the volume keeps them


def test_check_tree_names_every_special_file_and_mode(tmp_path):
    root = tmp_path / "restored"
    (root / "files" / "secrets").mkdir(parents=True)
    s = root / "files" / "secrets"
    os.symlink("/etc/shadow", s / "shadow")
    os.mkfifo(s / "fifo")
    os.mknod(s / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (s / "a").write_text("a")
    os.link(s / "a", s / "b")
    (s / "suid").write_text("x")
    os.chmod(s / "suid", 0o2755)
    (s / "open").write_text("x")
    os.chmod(s / "open", 0o646)
    (s / "tmp").mkdir()
    os.chmod(s / "tmp", 0o1777)
    (s / "group").mkdir()
    os.chmod(s / "group", 0o2750)  # a setgid folder, as Debian's /var/mail: kept
    problems, links = check_tree(root)
    assert links == {}
    assert sorted(problems) == sorted([
        "files/secrets/shadow is a symbolic link (to /etc/shadow)", "files/secrets/fifo is a FIFO",
        "files/secrets/null is a character device", "files/secrets/a is a hard link (2 names for one file)",
        "files/secrets/b is a hard link (2 names for one file)",
        "files/secrets/suid has mode 2755 (setuid, setgid or sticky)",
        "files/secrets/open has mode 0646 (writable by everyone)",
        "files/secrets/tmp has mode 1777 (writable by everyone)"])


def test_a_format_1_snapshot_may_keep_only_tls_live_as_a_symlink(tmp_path):
    root = tmp_path / "restored"
    (root / "files" / "tls" / "archive" / "1").mkdir(parents=True)
    os.symlink("archive/1", root / "files" / "tls" / "live")
    manifest = {"format": 1, "mailboxes": {}, "databases": {}}
    assert check_snapshot(manifest, root) == ([], {"files/tls/live": "archive/1"})
    (root / "files" / "tls" / "live").unlink()
    os.symlink("../../../etc", root / "files" / "tls" / "live")
    problems, _ = check_snapshot(manifest, root)
    assert problems == ["files/tls/live is a symbolic link (to ../../../etc)"]
    problems, _ = check_snapshot({"format": 2, "sha256": {}, "folders": [], "links": {}}, root)
    assert "files/tls/live is a symbolic link (to ../../../etc)" in problems  # format 2 has none at all
    (root / "files" / "tls" / "live").unlink()
    manifest2 = {"format": 2, "sha256": {}, "folders": ["files", "files/tls", "files/tls/archive",
                                                        "files/tls/archive/1"], "links": {"files/tls/live": "/etc"}}
    problems, _ = check_snapshot(manifest2, root)
    assert "files/tls/live: the manifest's link is not one Mailstead makes" in problems


@pytest.mark.parametrize("code, stderr, kind, field, code_out", [
    (12, "Fatal: wrong password or no key found", "local", "password", "wrong_password"),
    (10, "Fatal: repository does not exist: unable to open config file", "local", "target", "no_repository"),
    (1, "Fatal: unable to open config file: Stat: The Access Key Id you provided does not exist "
        "in our records. (InvalidAccessKeyId)", "s3", "access_key_id", "bad_credentials"),
    (1, "Fatal: ... dial tcp 127.0.0.1:9: connect: connection refused", "s3", "target", "unreachable"),
    (1, "subprocess ssh: user@host: Permission denied (publickey).", "sftp", "key", "bad_credentials"),
    (1, "Host key verification failed.", "sftp", "host", "host_key"),
    # The server down, with ssh's own message lost (restic forwards it from a goroutine).
    (1, '{"message_type":"exit_error","code":1,"message":"Fatal: unable to open repository at sftp:u@h:/r: '
        'unable to start the sftp session, error: error receiving version packet from server: server '
        'unexpectedly closed connection: unexpected EOF"}', "sftp", "target", "unreachable"),
    (11, "Fatal: unable to create lock in backend: repository is already locked by PID 7", "local", "target",
     "locked"),
    (3, "something odd", "local", "target", "restic_failed"),
])
def test_restic_failures_are_explained(code, stderr, kind, field, code_out):
    target = {"local": cfg.validate("local", path="/mnt/b"), "s3": cfg.validate("s3", **S3),
              "sftp": cfg.validate("sftp", **SFTP)}[kind]
    err = explain(code, stderr, target, "backup")
    assert (err.field, err.code) == (field, code_out)
    assert "s3cr3t" not in str(err)


def test_snapshot_ids_and_versions():
    assert check_snapshot_id("latest") == "latest" and check_snapshot_id("3f2a9c1b") == "3f2a9c1b"
    for bad in ("", "../x", "latest; rm", "XYZ12345", "--target=/"):
        with pytest.raises(BackupError) as err:
            check_snapshot_id(bad)
        assert err.value.field == "snapshot"
    assert version_tuple("0.10.0") > version_tuple("0.9.5") and version_tuple("1.0") == (1, 0)


def test_recorded_state_file_is_readable_by_the_health_check(tmp_path):
    from portal.backup.service import Env, read_state, record

    env = Env(tmp_path, "0.1.0")
    record(env, "last_backup", {"at": "2026-01-01T00:00:00+00:00", "ok": False, "error": "x", "snapshot": None,
                                "seconds": 1.0})
    record(env, "last_verify", {"at": "2026-01-02T00:00:00+00:00", "ok": True, "error": None, "snapshot": "ab",
                                "seconds": 2.0})
    data = read_state(env)
    assert data["last_backup"]["ok"] is False and data["last_verify"]["ok"] is True
    assert os.stat(env.state_file).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("uptime", [0.0, 5.0, 86400.0])
def test_progress_lines_become_throttled_events(uptime):
    """The clock is injected: the monotonic clock counts from boot, so a machine
    booted seconds ago (uptime 0) must see the first event too."""
    from portal.backup.restic import ProgressParser

    events: list[tuple[str, str]] = []
    parser = ProgressParser(lambda s, d: events.append((s, d)), every=3600, clock=lambda: uptime)
    parser('{"message_type":"status","percent_done":0.25,"total_files":8,"files_done":2,'
           '"total_bytes":4000000,"bytes_done":1000000,"seconds_remaining":9}\n')
    parser('{"message_type":"status","percent_done":0.5,"total_files":8,"files_done":4}\n')  # throttled
    parser("not json\n")
    parser('{"message_type":"error","error":{"message":"permission denied"},"item":"/x"}\n')
    parser('{"message_type":"summary","snapshot_id":"abc","files_new":3}\n')
    parser('{"message_type":"status","percent_done":1,"total_files":8,"files_restored":8,'
           '"total_bytes":4000000,"bytes_restored":4000000}\n')
    assert events == [("upload", "25% — 2/8 files, 1.0/4.0 MB, about 9 s left"),
                      ("upload", "100% — 8/8 files, 4.0/4.0 MB")]
    assert parser.summary == {"message_type": "summary", "snapshot_id": "abc", "files_new": 3}
    assert parser.errors == ["/x: permission denied"]


def test_volumes_are_never_skipped_silently_when_docker_is_down(tmp_path, monkeypatch):
    """No docker on PATH (failure injection): the backup fails naming the volume, never leaves the mail out."""
    from portal.backup.contents import DockerVolumes

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\nexit 1\n")
    (fake / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(BackupError) as err:
        DockerVolumes("mailstead", "mailstead-base:0.1.0").dump("mail", tmp_path / "out")
    assert err.value.field == "volumes" and "is docker running" in str(err.value)
    (fake / "docker").write_text("#!/bin/sh\necho 'Error: No such volume: mailstead_mail' >&2\nexit 1\n")
    assert DockerVolumes("mailstead", "mailstead-base:0.1.0").dump("mail", tmp_path / "out") is False


def test_stage_tree_follows_nothing_and_links_only_what_it_checked(tmp_path):
    """stage_tree reads a folder others write (a container's volume): a file swapped for a
    symlink between its check and its link is not staged, a FIFO does not block it, a
    symlinked folder is not entered, and folders keep their owner, mode and times."""
    from portal.backup.contents import stage_tree

    src = tmp_path / "vol"
    (src / "box" / "dbox-Mails").mkdir(parents=True)
    (src / "box" / "dbox-Mails" / "u.1").write_bytes(b"one")
    (src / "box" / "dbox-Mails" / "u.2").write_bytes(b"two")
    (src / "box" / "dbox-Mails" / "u.3").write_bytes(b"three")
    (src / "box" / "index").write_bytes(b"index")
    (src / "box" / "data").write_bytes(b"data")
    (src / "cache.hs").write_bytes(b"left out")
    os.mkfifo(src / "box" / "pipe")
    os.symlink("/etc", src / "etc")
    with socket.socket(socket.AF_UNIX) as sock:  # a program's socket: left out without a word
        sock.bind(str(src / "box" / "app.sock"))
    os.chmod(src / "box", 0o750)
    os.utime(src / "box", (1_000_000, 1_000_000))


    def link(rel: Path) -> bool:  # failure injection: the writer acts between the check and the link
        if rel.name in ("u.2", "data"):  # swapped for a symlink: to be linked, to be copied
            (src / rel).unlink()
            os.symlink("/etc/shadow", src / rel)
        if rel.name == "u.3":  # expunged
            (src / rel).unlink()
        return rel.parent.name == "dbox-Mails"

    skipped: list[str] = []
    dest = tmp_path / "staged"
    assert stage_tree(src, dest, ("*.hs",), link, skipped) == 1
    assert os.path.samefile(dest / "box/dbox-Mails/u.1", src / "box/dbox-Mails/u.1")
    assert (dest / "box/index").read_bytes() == b"index"
    assert not os.path.samefile(dest / "box/index", src / "box/index")
    assert not os.path.lexists(dest / "box/dbox-Mails/u.2") and not os.path.lexists(dest / "etc")
    assert not (dest / "cache.hs").exists() and not os.path.lexists(dest / "box/pipe")
    assert not os.path.lexists(dest / "box/app.sock")
    assert not os.path.lexists(dest / "box/dbox-Mails/u.3") and not os.path.lexists(dest / "box/data")
    assert sorted(skipped) == ["box/data", "box/dbox-Mails/u.2", "box/pipe", "etc"]
    st = os.stat(dest / "box")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime == 1_000_000


def test_stage_tree_refuses_a_bottomless_folder(tmp_path):
    from portal.backup.contents import MAX_DEPTH, stage_tree

    deep = tmp_path / "vol"
    path = deep
    for _ in range(MAX_DEPTH + 2):
        path = path / "d"
    path.mkdir(parents=True)
    with pytest.raises(BackupError) as err:
        stage_tree(deep, tmp_path / "staged")
    assert err.value.field == "volumes" and "folders deep" in str(err.value)


def test_a_linked_message_whose_mode_must_change_is_changed_on_a_copy(tmp_path):
    """normalize_volume never changes the volume's own file through a link."""
    from portal.backup.contents import normalize_volume, stage_tree

    src = tmp_path / "vol" / "box" / "dbox-Mails"
    src.mkdir(parents=True)
    (src / "u.1").write_bytes(b"one")
    dest = tmp_path / "staged"
    stage_tree(tmp_path / "vol", dest, link=lambda rel: True)
    os.chmod(src / "u.1", 0o666)  # the writer changes it after staging: the link shows it
    changed: list[str] = []
    normalize_volume(dest, "volumes/mail", [], changed)
    assert changed == ["volumes/mail/box/dbox-Mails/u.1"]
    assert not os.path.samefile(dest / "box/dbox-Mails/u.1", src / "u.1")
    assert stat.S_IMODE(os.stat(src / "u.1").st_mode) == 0o666
    assert stat.S_IMODE(os.stat(dest / "box/dbox-Mails/u.1").st_mode) == 0o664
    assert (dest / "box/dbox-Mails/u.1").read_bytes() == b"one"


def test_restored_volumes_are_moved_in_on_one_filesystem_and_copied_across(tmp_path):
    from portal.backup.contents import move_tree

    src = tmp_path / "restored"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"data")
    os.chmod(src, 0o751)
    dest = tmp_path / "volume"
    dest.mkdir()
    assert move_tree(src, dest) is True
    assert (dest / "a" / "f").read_bytes() == b"data" and not (src / "a").exists()
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o751
    other = Path("/dev/shm") / f"mailstead-test-{os.getpid()}"
    other.mkdir()
    try:
        (src / "b").write_bytes(b"x")
        assert move_tree(src, other) is False and (src / "b").exists()  # another filesystem: nothing moved
    finally:
        shutil.rmtree(other)
    vols = FolderVolumes(tmp_path / "vols")
    vols.load("mail", src)
    assert (tmp_path / "vols" / "mail" / "b").read_bytes() == b"x"
