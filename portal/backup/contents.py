"""What goes into a backup: the staging folder, the stack's volumes, the manifest.

Docker volumes (decision): a backup stages a point-in-time view of each volume,
so that the manifest's hashes and what restic reads are the same bytes while
the stack keeps running. Staging is fd-relative and follows nothing
(stage_tree): dovecot's message files, which it never changes once written
(sdbox writes a whole file and renames it into place; its own COPY hard-links
them), are hard-linked into the staging folder, and everything else (indexes,
logs, redis's dump) is copied. Linking needs the staging folder and the volume
on one filesystem, as they are on the appliance (/var/lib); the engine names
the folder of a `local` volume (`docker volume inspect`), and anything else
(another driver, another filesystem) is read as before: through a short-lived
container of the stack's own base image (`mailstead-base:<version>`, always
loaded with the stack), mounting the volume read-only and streaming `tar` to
the host's tar. A restore moves the checked files into the new volume
(rename, same filesystem) or writes them through that container. The mail is
encrypted at rest by dovecot's mail_crypt, so the backup holds no plaintext
mail; redis's data is its last own dump on the volume.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from portal.backup import BackupError
from portal.core import safefs
from portal.backup.config import OWN_SECRETS

Progress = Callable[[str, str], None]

VOLUMES = ("mail", "dav", "redis", "rspamd")  # the spool (queued mail in flight) is not kept
# Caches in a volume that are not kept (patterns on file names): rspamd's hyperscan
# databases (~90 MB), which its entry point copies from the image or rspamd compiles
# again at start (recipes/rspamd/templates/entrypoint.sh).
NOT_KEPT = {"rspamd": ("*.hs", "*.hsmp", "*.hsmc", "*.unser", "hsmp-*", ".mailstead-hs.tmp")}
# The state folders a backup holds. stack/ (the rendered compose project) is not one
# since format 2: a restore renders it anew from the checked settings at deploy.
FILE_DIRS = ("secrets", "tls")
MANIFEST = "manifest.json"
# 1: hashes of the messages and the two databases only (Mailstead before the restore
#    treated snapshots as untrusted); files/stack/ included.
# 2: every file hashed ("sha256"), every folder listed ("folders"), tls/live kept as
#    data ("links"), special files left out and named ("skipped").
FORMAT = 2
FORMATS_READ = (1, 2)
# This machine's own secrets: never backed up, never restored (signed-in sessions, the
# sign-in lockout, a TOTP enrolment under way; see portal/admin/privileged.py). The
# ledger of spent codes is backed up and merged on restore, never copied over.
LOCAL_SECRETS = ("admin-sessions.json", "admin-lockout.json", "admin-totp.pending", "admin-totp-reset.pending")
LEDGER = "admin-ledger.json"
NOT_BACKED_UP = (*OWN_SECRETS, *LOCAL_SECRETS)
# The one symlink of the state layout: tls/live -> archive/<name> (portal/certs/store.py).
LINKS = {"files/tls/live": re.compile(r"archive/[A-Za-z0-9][A-Za-z0-9._+-]{0,200}")}
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


class VolumeIO(Protocol):
    # False: the volume does not exist. Files whose names match `leave_out` are not copied;
    # what is neither a file nor a folder may be left out and named in `skipped`.
    def dump(self, name: str, dest: Path, leave_out: tuple[str, ...] = (),
             skipped: list[str] | None = None) -> bool: ...
    def load(self, name: str, src: Path) -> None: ...


# -- staging a folder: links for the messages, copies for the rest ----------------------

MAX_DEPTH = 100  # folders within folders; dovecot's deepest is a dozen
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_into(sfd: int, dfd: int, name: str) -> os.stat_result | None:
    """Copy the regular file `name` from folder sfd into folder dfd with its owner, mode and
    times; None (nothing made) if it is not a regular file once opened."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            with os.fdopen(os.dup(fd), "rb") as src, os.fdopen(os.dup(out), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.fchown(out, st.st_uid, st.st_gid)
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
        return st
    finally:
        os.close(fd)


def stage_tree(src: Path, dest: Path, leave_out: tuple[str, ...] = (),
               link: Callable[[Path], bool] = lambda _rel: False, skipped: list[str] | None = None) -> int:
    """A point-in-time view of the folder `src` (written by others: a container) at `dest`,
    made afresh. Nothing is followed: every folder is opened relative to its parent with
    O_NOFOLLOW, so a symlink swapped in mid-walk leads nowhere. Regular files for which
    `link(rel)` holds, that have one name and no setuid/setgid/sticky bit or write access
    for everyone, are hard-linked (files their writer never changes in place); other
    regular files are copied, keeping owner, mode and times, and so are folders.
    Symlinks, devices, FIFOs and sockets are not staged; their paths (relative to src)
    go to `skipped`, but for sockets (as tar leaves them out: a program's, never data).
    Falls back to copies when linking is refused (another filesystem or mount).
    Returns how many files were linked."""
    skipped = skipped if skipped is not None else []
    can_link = [True]
    linked = [0]

    def visit(sfd: int, dfd: int, rel: Path, depth: int) -> None:
        """Stage the folder open as sfd into the (new, empty) folder open as dfd."""
        if depth > MAX_DEPTH:
            raise BackupError(f"volumes: {rel.as_posix()} is more than {MAX_DEPTH} folders deep", "volumes")
        own = os.fstat(sfd)
        for entry in sorted(os.scandir(sfd), key=lambda e: e.name):
            name = entry.name
            if any(fnmatch.fnmatchcase(name, p) for p in leave_out):
                continue
            child = rel / name
            try:
                st = os.lstat(name, dir_fd=sfd)
            except FileNotFoundError:  # gone since (an expunged message, a deleted folder)
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    cfd = os.open(name, DIR_FLAGS, dir_fd=sfd)
                except FileNotFoundError:
                    continue
                except OSError:  # swapped for something else since
                    skipped.append(child.as_posix())
                    continue
                try:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    cdfd = os.open(name, DIR_FLAGS, dir_fd=dfd)
                    try:
                        visit(cfd, cdfd, child, depth + 1)
                    finally:
                        os.close(cdfd)
                finally:
                    os.close(cfd)
            elif stat.S_ISREG(st.st_mode):
                bad = stat.S_IMODE(st.st_mode) & (SPECIAL_BITS | stat.S_IWOTH)
                if can_link[0] and st.st_nlink == 1 and not bad and link(child):
                    try:
                        os.link(name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    except OSError:  # another filesystem or mount, or links refused: copies from here on
                        can_link[0] = False
                    else:
                        if stat.S_ISREG(os.lstat(name, dir_fd=dfd).st_mode):
                            linked[0] += 1
                            continue
                        os.unlink(name, dir_fd=dfd)  # swapped for a symlink since
                        skipped.append(child.as_posix())
                        continue
                try:
                    copied = _copy_into(sfd, dfd, name)
                except FileNotFoundError:  # gone since (an expunged message)
                    continue
                except OSError as exc:  # swapped since for a symlink (ELOOP) or a socket (ENXIO)
                    if exc.errno not in (errno.ELOOP, errno.ENXIO):
                        raise
                    copied = None
                if copied is None:
                    skipped.append(child.as_posix())
            elif not stat.S_ISSOCK(st.st_mode):  # a socket is a running program's, never data (tar's rule)
                skipped.append(child.as_posix())
        # The folder's own owner, mode and times (as it was opened), on its descriptor, after its contents.
        os.fchown(dfd, own.st_uid, own.st_gid)
        os.fchmod(dfd, stat.S_IMODE(own.st_mode))
        os.utime(dfd, ns=(own.st_atime_ns, own.st_mtime_ns))

    safefs.remove_tree(dest)
    sfd = os.open(src, DIR_FLAGS)
    try:
        dest.mkdir(mode=0o700, parents=True)
        dfd = os.open(dest, DIR_FLAGS)
        try:
            visit(sfd, dfd, Path(), 0)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return linked[0]


def move_tree(src: Path, dest: Path) -> bool:
    """Move the contents of the checked folder `src` into the empty folder `dest`, and give
    dest src's owner, mode and times. False (nothing moved) if they are on two filesystems
    or two mounts."""
    sfd, dfd = os.open(src, DIR_FLAGS), os.open(dest, DIR_FLAGS)
    try:
        st = os.fstat(sfd)
        if st.st_dev != os.fstat(dfd).st_dev:
            return False
        for i, name in enumerate(sorted(os.listdir(sfd))):
            try:
                os.rename(name, name, src_dir_fd=sfd, dst_dir_fd=dfd)
            except OSError as exc:  # two mounts of one filesystem: nothing was moved yet
                if exc.errno == errno.EXDEV and i == 0:
                    return False
                raise
        os.fchown(dfd, st.st_uid, st.st_gid)
        os.fchmod(dfd, stat.S_IMODE(st.st_mode))
        os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return True
    finally:
        os.close(sfd)
        os.close(dfd)


def mail_link(name: str) -> Callable[[Path], bool]:
    """Which files of volume `name` are linked rather than copied: dovecot's messages."""
    return is_message if name == "mail" else (lambda _rel: False)


class DockerVolumes:
    """The stack's volumes (`<project>_<name>`) through a container of the base image."""

    def __init__(self, project: str, image: str, timeout: float = 1800) -> None:
        self.project, self.image, self.timeout = project, image, timeout

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def inspect(self, name: str) -> dict[str, Any] | None:
        """The engine's record of the volume, or None if it does not exist; an engine that
        does not answer is an error (a backup must never silently leave the mail out)."""
        try:
            r = subprocess.run(["docker", "volume", "inspect", "--format", "{{json .}}", self.volume(name)],
                               capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackupError(f"volumes: cannot ask the docker engine about {self.volume(name)}: {exc}; "
                              "is docker running?", "volumes") from None
        if r.returncode == 0:
            try:
                info = json.loads(r.stdout)
            except ValueError:
                info = None
            return info if isinstance(info, dict) else {}
        if "no such volume" in r.stderr.lower():
            return None
        raise BackupError(f"volumes: the docker engine did not answer about {self.volume(name)}: "
                          f"{' '.join(r.stderr.split())[-200:]}; is docker running?", "volumes")

    @staticmethod
    def folder(info: dict[str, Any] | None) -> Path | None:
        """The host folder of a volume (its engine record), if it is a `local` volume
        without driver options (one that mounts nothing else); None otherwise."""
        if not info or info.get("Driver") != "local" or info.get("Options"):
            return None
        mount = info.get("Mountpoint")
        if not isinstance(mount, str) or not mount.startswith("/") or ".." in Path(mount).parts:
            return None
        path = Path(mount)
        return path if path.is_dir() and not path.is_symlink() else None

    def dump(self, name: str, dest: Path, leave_out: tuple[str, ...] = (),
             skipped: list[str] | None = None) -> bool:
        info = self.inspect(name)
        if info is None:
            return False
        folder = self.folder(info)
        if folder is not None and os.stat(folder).st_dev == os.stat(dest.parent).st_dev:
            stage_tree(folder, dest, leave_out, mail_link(name), skipped)
            return True
        dest.mkdir(parents=True, exist_ok=True)
        reader = subprocess.Popen(
            ["docker", "run", "--rm", "--network", "none", "--log-driver", "none",
             "-v", f"{self.volume(name)}:/v:ro", "--entrypoint", "tar", self.image,
             "-C", "/v", "--numeric-owner", *(f"--exclude={p}" for p in leave_out), "-cf", "-", "."],
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
        folder = self.folder(self.inspect(name))
        if folder is not None and not any(folder.iterdir()) and move_tree(src, folder):
            return
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

    def dump(self, name: str, dest: Path, leave_out: tuple[str, ...] = (),
             skipped: list[str] | None = None) -> bool:
        src = self.root / name
        if not src.is_dir() or src.is_symlink():
            return False
        stage_tree(src, dest, leave_out, mail_link(name), skipped)
        return True

    def load(self, name: str, src: Path) -> None:
        dest = self.root / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True, mode=0o700)
        if not move_tree(src, dest):
            dest.rmdir()
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
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dest)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    os.chmod(dest, 0o600)
    return True


def copy_state_folder(src: Path, dest: Path, rel: str, skip: tuple[str, ...], links: dict[str, str],
                      skipped: list[str]) -> None:
    """Copy folder `src` (a state folder: secrets/ or tls/) to `dest` in the staging:
    folders (0700) and regular files (0600) only, never following a symlink. The one
    symlink the layout has (tls/live) is kept as data in `links`; anything else that is
    not a file or a folder is left out and named in `skipped` (`rel` is dest's path in
    the staging, e.g. files/tls)."""
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    with os.scandir(src) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = f"{rel}/{entry.name}"
            if entry.name in skip or entry.name.startswith("."):
                continue  # the backup's own secrets, this machine's, and temporary files
            if entry.is_symlink():
                target = os.readlink(entry.path)
                if name in LINKS and LINKS[name].fullmatch(target):
                    links[name] = target
                else:
                    skipped.append(name)
            elif entry.is_dir(follow_symlinks=False):
                copy_state_folder(Path(entry.path), dest / entry.name, name, (), links, skipped)
            elif entry.is_file(follow_symlinks=False):
                with safefs.open_file(entry.path) as f:
                    safefs.write_bytes(dest / entry.name, f.read(), 0o600)
            else:
                skipped.append(name)


def normalize_volume(root: Path, rel: str, skipped: list[str], changed: list[str]) -> None:
    """Make a dumped volume restorable as it is checked on restore (check_tree): symlinks,
    devices, FIFOs and sockets are left out (named in `skipped`), hard links become
    separate files, and setuid/setgid/sticky bits of files and write access for everyone
    are taken off (named in `changed`). The mail stack makes none of these. A file
    hard-linked from the volume (stage_tree) is one name in this tree: it stays a link,
    unless its mode must change, which is then done on a copy of its own."""
    mode = stat.S_IMODE(os.lstat(root).st_mode)
    if mode & stat.S_IWOTH:
        safefs.chmod(root, mode & ~stat.S_IWOTH)
        changed.append(rel)
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            what = f"{rel}/{path.relative_to(root).as_posix()}"
            st = os.lstat(path)
            twice = st.st_ino in seen
            seen.add(st.st_ino)
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                skipped.append(what)
                os.unlink(path)
                if name in dirnames:
                    dirnames.remove(name)
                continue
            mode = stat.S_IMODE(st.st_mode)
            bad = stat.S_IWOTH | (SPECIAL_BITS if stat.S_ISREG(st.st_mode) else 0)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (twice or mode & bad):
                # A file of its own in place of the link: same content, owner and (safe) mode.
                with safefs.open_file(path) as f:
                    safefs.write_bytes(path, f.read(), mode & ~bad, owner=(st.st_uid, st.st_gid))
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            elif mode & bad:
                safefs.chmod(path, mode & ~bad)
            if mode & bad:
                changed.append(what)


def stage(state_dir: Path, staging: Path, volumes: VolumeIO, info: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Fill `staging` (made afresh, 0700) with everything a backup holds; returns the manifest."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700, parents=True)
    progress("databases", "copying state.db and accounts.db (sqlite backup API)")
    dbs = {"state.db": sqlite_copy(state_dir / "state.db", staging / "db" / "state.db"),
           "accounts.db": sqlite_copy(state_dir / "accounts" / "accounts.db", staging / "db" / "accounts.db")}
    links: dict[str, str] = {}
    skipped: list[str] = []
    changed: list[str] = []
    for name in FILE_DIRS:
        src = state_dir / name
        if src.is_dir() and not src.is_symlink():
            copy_state_folder(src, staging / "files" / name, f"files/{name}",
                              NOT_BACKED_UP if name == "secrets" else (), links, skipped)
    kept = []
    (staging / "volumes").mkdir(mode=0o700)
    for name in VOLUMES:
        progress("volumes", f"staging the {name} volume")
        left: list[str] = []
        if volumes.dump(name, staging / "volumes" / name, NOT_KEPT.get(name, ()), left):
            kept.append(name)
            skipped += [f"volumes/{name}/{rel}" for rel in left]
            normalize_volume(staging / "volumes" / name, f"volumes/{name}", skipped, changed)
    if skipped:
        progress("contents", f"left out {len(skipped)} item(s) that are not files or folders: "
                             + ", ".join(skipped[:5]) + (" …" if len(skipped) > 5 else ""))
    if changed:
        progress("contents", f"took setuid/setgid/sticky bits or write access for everyone off {len(changed)} "
                             "item(s): " + ", ".join(changed[:5]) + (" …" if len(changed) > 5 else ""))
    progress("manifest", "listing every file with its SHA-256")
    manifest = build_manifest(staging, info, dbs, kept, links, skipped)
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
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan_mail(mail_root: Path) -> dict[str, dict[str, Any]]:
    """Per mailbox: message count and SHA-256 of each message file (path relative to the volume)."""
    boxes: dict[str, dict[str, Any]] = {}
    if not mail_root.is_dir() or mail_root.is_symlink():
        return boxes
    for dirpath, _dirs, files in os.walk(mail_root):
        for fname in files:
            full = Path(dirpath) / fname
            rel = full.relative_to(mail_root)
            if not is_message(rel) or not stat.S_ISREG(os.lstat(full).st_mode):
                continue
            box = boxes.setdefault(mailbox_of(rel), {"messages": 0, "files": {}})
            box["messages"] += 1
            box["files"][rel.as_posix()] = sha256(full)
    return dict(sorted(boxes.items()))


def walk(root: Path) -> tuple[dict[str, str], list[str]]:
    """Every regular file under `root` with its SHA-256, and every folder (paths relative
    to root, the manifest itself left out); nothing is followed."""
    files: dict[str, str] = {}
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            folders.append((Path(dirpath) / name).relative_to(root).as_posix())
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST and stat.S_ISREG(os.lstat(path).st_mode):
                files[rel] = sha256(path)
    return dict(sorted(files.items())), sorted(folders)


def build_manifest(staging: Path, info: dict[str, Any], dbs: dict[str, bool], volumes: list[str],
                   links: dict[str, str] | None = None, skipped: list[str] | None = None) -> dict[str, Any]:
    files, folders = walk(staging)
    mailboxes: dict[str, dict[str, int]] = {}
    for path in files:  # each file is read once: the messages are counted from the same list
        rel = Path(path)
        if rel.parts[:2] == ("volumes", "mail") and is_message(Path(*rel.parts[2:])):
            mailboxes.setdefault(mailbox_of(Path(*rel.parts[2:])), {"messages": 0})["messages"] += 1
    mailboxes = dict(sorted(mailboxes.items()))
    return {
        "format": FORMAT,
        "version": info.get("version", ""),
        "created": info.get("created", ""),
        "settings": info.get("settings", {}),
        "databases": {name: files[f"db/{name}"] for name, ok in dbs.items() if ok},
        "volumes": volumes,
        "messages": sum(b["messages"] for b in mailboxes.values()),
        "mailboxes": mailboxes,
        "sha256": files,
        "folders": folders,
        "links": dict(sorted((links or {}).items())),
        "skipped": sorted(skipped or []),
    }


# -- checking a restored snapshot (untrusted input) ---------------------------------------

def check_tree(root: Path, allowed_links: dict[str, re.Pattern[str]] | None = None) -> tuple[list[str], dict[str, str]]:
    """Problems with what a snapshot restored into `root` holds, each naming its path:
    anything but folders and regular files (symlinks, devices, FIFOs, sockets), hard
    links, files with setuid/setgid/sticky bits, write access for everyone. (A folder's
    setgid bit is kept: it only passes the folder's group on, and Debian's /var/mail, the
    mail volume, has it.) A symlink at a path of
    `allowed_links` whose target matches is returned instead (format 1 kept tls/live
    as a symlink). Nothing is followed."""
    problems: list[str] = []
    links: dict[str, str] = {}
    allowed_links = allowed_links or {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                if rel in allowed_links and allowed_links[rel].fullmatch(target):
                    links[rel] = target
                else:
                    problems.append(f"{rel} is a symbolic link (to {target[:80]})")
                if name in dirnames:
                    dirnames.remove(name)
                continue
            if kind not in (stat.S_IFDIR, stat.S_IFREG):
                what = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                        stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}.get(kind, "not a file or a folder")
                problems.append(f"{rel} is {what}")
                continue
            if kind == stat.S_IFREG and st.st_nlink > 1:
                problems.append(f"{rel} is a hard link ({st.st_nlink} names for one file)")
            mode = stat.S_IMODE(st.st_mode)
            if kind == stat.S_IFREG and mode & SPECIAL_BITS:
                problems.append(f"{rel} has mode {mode:04o} (setuid, setgid or sticky)")
            elif mode & stat.S_IWOTH:
                problems.append(f"{rel} has mode {mode:04o} (writable by everyone)")
    return problems, links


def compare_files(manifest: dict[str, Any], restored: Path) -> list[str]:
    """Format 2: every file and folder restored against the manifest's lists, naming each
    path that is not listed, is missing, or whose SHA-256 differs; then the message
    counts per mailbox and the databases' own integrity check."""
    problems: list[str] = []
    want = manifest.get("sha256")
    folders = manifest.get("folders")
    if not isinstance(want, dict) or not isinstance(folders, list):
        return ["the manifest lists no files (format 2 needs its sha256 and folders)"]
    got, got_folders = walk(restored)
    for rel in sorted(set(got) - set(want)):
        problems.append(f"{rel} is in the snapshot but not in its manifest")
    for rel, digest in sorted(want.items()):
        if rel not in got:
            problems.append(f"{rel} is missing")
        elif got[rel] != digest:
            problems.append(f"{rel} differs from the manifest (SHA-256 mismatch)")
    for rel in sorted(set(got_folders) - {str(f) for f in folders}):
        problems.append(f"{rel}/ is in the snapshot but not in its manifest")
    for rel in sorted({str(f) for f in folders} - set(got_folders)):
        problems.append(f"{rel}/ is missing")
    found = scan_mail(restored / "volumes" / "mail")
    boxes = manifest.get("mailboxes") if isinstance(manifest.get("mailboxes"), dict) else {}
    for box, entry in boxes.items():
        n = found.get(box, {"messages": 0})["messages"]
        listed = entry.get("messages") if isinstance(entry, dict) else None
        if n != listed:
            problems.append(f"{box}: {n} messages restored, the manifest lists {listed}")
    for box in sorted(set(found) - set(boxes)):
        problems.append(f"{box}: restored but not in the manifest")
    problems += _integrity(restored, [n for n in ("state.db", "accounts.db") if f"db/{n}" in got])
    return problems


def _integrity(restored: Path, names: list[str]) -> list[str]:
    problems = []
    for name in names:
        path = restored / "db" / name
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            ok = str(exc)
        finally:
            conn.close()
        if ok != "ok":
            problems.append(f"db/{name}: sqlite integrity check failed: {str(ok)[:100]}")
    return problems


def compare(manifest: dict[str, Any], restored: Path) -> list[str]:
    """Differences between a manifest and a restored staging folder (empty: all good):
    every file for format 2 (compare_files); for format 1, what its manifest covers (the
    messages and the two databases)."""
    if manifest.get("format") != 1:
        return compare_files(manifest, restored)
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
            problems += _integrity(restored, [name])
    return problems


def check_snapshot(manifest: dict[str, Any], restored: Path) -> tuple[list[str], dict[str, str]]:
    """Everything wrong with a snapshot restored into `restored` (empty: it may be used),
    and its symlinks kept as data (tls/live). Types and modes first (check_tree), then
    the manifest's hashes (compare). Format 2 has no symlink at all: its tls/live is in
    the manifest's "links", whose targets are checked here too."""
    fmt = manifest.get("format")
    if fmt == 1:
        problems, links = check_tree(restored, LINKS)
    else:
        problems, _ = check_tree(restored)
        links = manifest.get("links") if isinstance(manifest.get("links"), dict) else {}
        for rel, target in links.items():
            if rel not in LINKS or not isinstance(target, str) or not LINKS[rel].fullmatch(target):
                problems.append(f"{rel}: the manifest's link is not one Mailstead makes")
    for rel, target in links.items():
        folder = restored / Path(rel).parent / target
        if not folder.is_dir() or folder.is_symlink():
            problems.append(f"{rel} points to {target}, which is not a folder of the snapshot")
    if problems:  # a symlink in the tree: nothing is read through it (no hashing)
        return problems, {}
    return compare(manifest, restored), links
