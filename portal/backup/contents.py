"""What goes into a backup: the staging folder, the stack's volumes, the manifest.

Docker volumes (decision): read through a short-lived container from the stack's
own base image (`mailstead-base:<version>`, always loaded with the stack),
mounting the volume read-only and streaming `tar` to the host's tar, which
unpacks it with numeric owners into the staging folder; restored the same way
in reverse. No `docker cp`, no reading /var/lib/docker behind the engine's back,
and no image that is not already on the appliance. The mail is encrypted at
rest by dovecot's mail_crypt, so the copy holds no plaintext mail. The copy is
taken while the stack runs (sdbox writes whole message files and renames
them into place); redis's data is its last own dump on the volume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from portal.backup import BackupError
from portal.backup.config import OWN_SECRETS

Progress = Callable[[str, str], None]

VOLUMES = ("mail", "dav", "redis", "rspamd")  # the spool (queued mail in flight) is not kept
FILE_DIRS = ("secrets", "tls", "stack")
MANIFEST = "manifest.json"
FORMAT = 1


class VolumeIO(Protocol):
    def dump(self, name: str, dest: Path) -> bool: ...      # False: the volume does not exist
    def load(self, name: str, src: Path) -> None: ...


class DockerVolumes:
    """The stack's volumes (`<project>_<name>`) through a container of the base image."""

    def __init__(self, project: str, image: str, timeout: float = 1800) -> None:
        self.project, self.image, self.timeout = project, image, timeout

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def exists(self, name: str) -> bool:
        """Whether the volume exists; an engine that does not answer is an error
        (a backup must never silently leave the mail out)."""
        try:
            r = subprocess.run(["docker", "volume", "inspect", self.volume(name)], capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackupError(f"volumes: cannot ask the docker engine about {self.volume(name)}: {exc}; "
                              "is docker running?", "volumes") from None
        if r.returncode == 0:
            return True
        if "no such volume" in r.stderr.lower():
            return False
        raise BackupError(f"volumes: the docker engine did not answer about {self.volume(name)}: "
                          f"{' '.join(r.stderr.split())[-200:]}; is docker running?", "volumes")

    def dump(self, name: str, dest: Path) -> bool:
        if not self.exists(name):
            return False
        dest.mkdir(parents=True, exist_ok=True)
        reader = subprocess.Popen(
            ["docker", "run", "--rm", "--network", "none", "--log-driver", "none",
             "-v", f"{self.volume(name)}:/v:ro", "--entrypoint", "tar", self.image,
             "-C", "/v", "--numeric-owner", "-cf", "-", "."],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        writer = subprocess.run(["tar", "-C", str(dest), "--numeric-owner", "-xpf", "-"],
                                stdin=reader.stdout, capture_output=True, timeout=self.timeout, check=False)
        assert reader.stdout is not None
        reader.stdout.close()
        _, err = reader.communicate(timeout=60)
        if reader.returncode != 0 or writer.returncode != 0:
            why = " ".join((err.decode(errors="replace") + writer.stderr.decode(errors="replace")).split())[-300:]
            raise BackupError(f"volume {name}: reading it through {self.image} failed: {why}", "volumes")
        return True

    def load(self, name: str, src: Path) -> None:
        vol = self.volume(name)
        subprocess.run(["docker", "volume", "rm", "-f", vol], capture_output=True, timeout=60, check=False)
        # Labelled as compose labels its own volumes, so `compose up` adopts it.
        made = subprocess.run(["docker", "volume", "create", "--label", f"com.docker.compose.project={self.project}",
                               "--label", f"com.docker.compose.volume={name}", vol],
                              capture_output=True, text=True, timeout=60, check=False)
        if made.returncode != 0:
            raise BackupError(f"volume {name}: cannot create {vol}: {' '.join(made.stderr.split())[-200:]}",
                              "volumes")
        reader = subprocess.Popen(["tar", "-C", str(src), "--numeric-owner", "-cf", "-", "."],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        writer = subprocess.run(
            ["docker", "run", "--rm", "-i", "--network", "none", "--log-driver", "none",
             "-v", f"{vol}:/v", "--entrypoint", "tar", self.image, "-C", "/v", "--numeric-owner", "-xpf", "-"],
            stdin=reader.stdout, capture_output=True, timeout=self.timeout, check=False)
        assert reader.stdout is not None
        reader.stdout.close()
        _, err = reader.communicate(timeout=60)
        if reader.returncode != 0 or writer.returncode != 0:
            why = " ".join((err.decode(errors="replace") + writer.stderr.decode(errors="replace")).split())[-300:]
            raise BackupError(f"volume {name}: writing it through {self.image} failed: {why}", "volumes")


class FolderVolumes:
    """Volumes as plain folders under `root` (a machine without the stack, and the tests)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dump(self, name: str, dest: Path) -> bool:
        src = self.root / name
        if not src.is_dir():
            return False
        _copy_all(src, dest)
        return True

    def load(self, name: str, src: Path) -> None:
        dest = self.root / name
        shutil.rmtree(dest, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        _copy_all(src, dest)


def _copy_all(src: Path, dest: Path) -> None:
    """Copy keeping owners, modes, times and symlinks (as the volumes' tar does)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["cp", "-a", "--", str(src), str(dest)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise BackupError(f"volumes: copying {src} failed: {' '.join(r.stderr.split())[-200:]}", "volumes")


# -- staging ------------------------------------------------------------------------

def sqlite_copy(src: Path, dest: Path) -> bool:
    """A consistent copy with the sqlite backup API (safe while others write)."""
    if not src.exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dest)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    os.chmod(dest, 0o600)
    return True


def stage(state_dir: Path, staging: Path, volumes: VolumeIO, info: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Fill `staging` (made afresh, 0700) with everything a backup holds; returns the manifest."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700, parents=True)
    progress("databases", "copying state.db and accounts.db (sqlite backup API)")
    dbs = {"state.db": sqlite_copy(state_dir / "state.db", staging / "db" / "state.db"),
           "accounts.db": sqlite_copy(state_dir / "accounts" / "accounts.db", staging / "db" / "accounts.db")}
    for name in FILE_DIRS:
        src = state_dir / name
        if src.is_dir():
            ignore = shutil.ignore_patterns(*OWN_SECRETS) if name == "secrets" else None
            shutil.copytree(src, staging / "files" / name, symlinks=True, ignore=ignore)
    kept = []
    for name in VOLUMES:
        progress("volumes", f"copying the {name} volume")
        if volumes.dump(name, staging / "volumes" / name):
            kept.append(name)
    progress("manifest", "counting messages and computing SHA-256 sums")
    manifest = build_manifest(staging, info, dbs, kept)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


# -- manifest -------------------------------------------------------------------------

def is_message(rel: Path) -> bool:
    """A message file of dovecot's sdbox (mail_path ~/mail: .../dbox-Mails/u.<uid>),
    or of a Maildir (cur/new)."""
    return (rel.parent.name == "dbox-Mails" and rel.name.startswith("u.")) or rel.parent.name in ("cur", "new")


def mailbox_of(rel: Path) -> str:
    """<domain>/<local>/... under /var/mail -> local@domain."""
    parts = rel.parts
    return f"{parts[1]}@{parts[0]}" if len(parts) >= 3 else "(unknown)"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan_mail(mail_root: Path) -> dict[str, dict[str, Any]]:
    """Per mailbox: message count and SHA-256 of each message file (path relative to the volume)."""
    boxes: dict[str, dict[str, Any]] = {}
    if not mail_root.is_dir():
        return boxes
    for dirpath, _dirs, files in os.walk(mail_root):
        for fname in files:
            full = Path(dirpath) / fname
            rel = full.relative_to(mail_root)
            if not is_message(rel) or full.is_symlink():
                continue
            box = boxes.setdefault(mailbox_of(rel), {"messages": 0, "files": {}})
            box["messages"] += 1
            box["files"][rel.as_posix()] = sha256(full)
    return dict(sorted(boxes.items()))


def build_manifest(staging: Path, info: dict[str, Any], dbs: dict[str, bool], volumes: list[str]) -> dict[str, Any]:
    mailboxes = scan_mail(staging / "volumes" / "mail")
    return {
        "format": FORMAT,
        "version": info.get("version", ""),
        "created": info.get("created", ""),
        "settings": info.get("settings", {}),
        "databases": {name: sha256(staging / "db" / name) for name, ok in dbs.items() if ok},
        "volumes": volumes,
        "files": [d for d in FILE_DIRS if (staging / "files" / d).is_dir()],
        "messages": sum(b["messages"] for b in mailboxes.values()),
        "mailboxes": mailboxes,
    }


def compare(manifest: dict[str, Any], restored: Path) -> list[str]:
    """Differences between a manifest and a restored staging folder (empty: all good)."""
    problems: list[str] = []
    found = scan_mail(restored / "volumes" / "mail")
    for box, want in manifest.get("mailboxes", {}).items():
        got = found.get(box, {"messages": 0, "files": {}})
        if got["messages"] != want["messages"]:
            problems.append(f"{box}: {got['messages']} messages restored, the manifest lists {want['messages']}")
        for rel, digest in want["files"].items():
            have = got["files"].get(rel)
            if have is None:
                problems.append(f"{box}: {rel} is missing")
            elif have != digest:
                problems.append(f"{box}: {rel} differs (SHA-256 mismatch)")
    for box in sorted(set(found) - set(manifest.get("mailboxes", {}))):
        problems.append(f"{box}: restored but not in the manifest")
    for name, digest in manifest.get("databases", {}).items():
        path = restored / "db" / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif sha256(path) != digest:
            problems.append(f"{name} differs (SHA-256 mismatch)")
        else:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                conn.close()
            if ok != "ok":
                problems.append(f"{name}: sqlite integrity check failed: {ok[:100]}")
    return problems
