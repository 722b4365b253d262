"""Safe file writes for everything root writes (and reads as trusted).

Every path is walked from / one component at a time with O_NOFOLLOW, so a
symlink anywhere in it is refused instead of followed; the file itself is
written as an O_EXCL temporary file in the target's folder, its mode and owner
set on the open descriptor (fchmod/fchown: never by path), fsynced, renamed
into place, and the folder fsynced. A reader sees the old file or the new one,
never a mix; a power loss leaves one of the two.

`ensure_dir` makes (or checks) a folder the same way and refuses one that is a
symlink or belongs to someone else, so a folder pre-created by another user is
never adopted. Nothing here follows a symlink, chmods or chowns by path.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from portal.core.errors import UnsafePathError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MISSING = object()
# A JSON or text file the agent reads: anything larger is not one of its own.
DEFAULT_READ_LIMIT = 16 * 1024 * 1024


def _unsafe(path: Path | str, why: str) -> UnsafePathError:
    return UnsafePathError(f"{path} {why}; as root, check it and remove it if you did not make it "
                           f"(the agent follows no symlink and adopts no folder it did not make)")


def _parts(path: Path | str) -> tuple[str, ...]:
    path = Path(os.path.abspath(path))
    return path.parts[1:]


def _open_dir_fd(path: Path | str, *, create: bool = False, mode: int = 0o755) -> int:
    """A descriptor of folder `path`, opened component by component without following
    symlinks; missing folders are made (mode `mode`) when `create`."""
    fd = os.open("/", _DIR_FLAGS)
    walked = Path("/")
    try:
        for part in _parts(path):
            walked = walked / part
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(nfd, mode)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _unsafe(walked, "is a symlink or not a folder") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def open_dir(path: Path | str, *, create: bool = False, mode: int = 0o755) -> Iterator[int]:
    fd = _open_dir_fd(path, create=create, mode=mode)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_dir(path: Path | str, mode: int = 0o700, owner: tuple[int, int] | None = None) -> Path:
    """Make folder `path` (and its missing parents, 0755) or check the one there:
    it must be a real folder owned by `owner` (default: this process's user), and
    gets exactly `mode` (and `owner`), set on its descriptor."""
    path = Path(os.path.abspath(path))
    with open_dir(path.parent, create=True) as parent:
        try:
            os.mkdir(path.name, 0o700, dir_fd=parent)
            made = True
        except FileExistsError:
            made = False
        try:
            fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _unsafe(path, "is a symlink or not a folder") from None
            raise
        try:
            st = os.fstat(fd)
            trusted = {os.geteuid()} | ({owner[0]} if owner is not None else set())
            if not made and st.st_uid not in trusted:
                raise _unsafe(path, f"belongs to uid {st.st_uid}")
            if owner is not None and (st.st_uid, st.st_gid) != owner:
                os.fchown(fd, *owner)
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return path


def _write_temp(dfd: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> str:
    """A new O_EXCL temporary file with a random name next to `name` in folder `dfd`,
    holding `data`, its mode and owner set on the descriptor, fsynced; its name."""
    for _ in range(20):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not make a temporary file for {name}")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dfd)
        raise
    return tmp


def write_bytes(path: Path | str, data: bytes, mode: int = 0o600,
                owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` atomically: O_EXCL temporary file in the same folder,
    fchmod/fchown, fsync, rename, fsync of the folder. The folder must exist. A
    symlink at `path` is replaced, never followed."""
    path = Path(os.path.abspath(path))
    with open_dir(path.parent) as dfd:
        tmp = _write_temp(dfd, path.name, data, mode, owner)
        try:
            os.rename(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)


def write_new(path: Path | str, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> bool:
    """Create `path` with `data` unless something (even a symlink) is there already:
    never replaces it; True if written. The same steps as write_bytes, with a hard
    link in place of the rename, so the file appears whole."""
    path = Path(os.path.abspath(path))
    with open_dir(path.parent) as dfd:
        tmp = _write_temp(dfd, path.name, data, mode, owner)
        try:
            try:
                os.link(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                return False
            os.fsync(dfd)
            return True
        finally:
            os.unlink(tmp, dir_fd=dfd)


def write_text(path: Path | str, text: str, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode, owner)


def write_json(path: Path | str, data: Any, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    write_bytes(path, (json.dumps(data, sort_keys=True, indent=1) + "\n").encode("utf-8"), mode, owner)


def _open_at(dfd: int, name: str, path: Path, flags: int, owner_uid: int | None, *, folders: bool = False) -> int:
    """`name` in folder `dfd`, opened with O_NOFOLLOW: a regular file (of `owner_uid`),
    or with `folders` also a folder."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe(path, "is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if folders and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise _unsafe(path, "is neither a file nor a folder")
        if not folders and not stat.S_ISREG(st.st_mode):
            raise _unsafe(path, "is not a regular file")
        if owner_uid is not None and st.st_uid != owner_uid:
            raise _unsafe(path, f"belongs to uid {st.st_uid}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: Path | str, *, owner_uid: int | None = None, dir_fd: int | None = None) -> IO[bytes]:
    """`path` opened for reading without following a symlink anywhere in it; it must
    be a regular file (and owned by `owner_uid`, when given). With `dir_fd`, `path`
    is one name in that (already opened) folder. The file is the caller's to close
    (`with safefs.open_file(...) as f:`)."""
    if dir_fd is not None:
        if os.sep in str(path) or str(path) in ("", ".", ".."):
            raise _unsafe(path, "is not a plain file name")
        fd = _open_at(dir_fd, str(path), Path(str(path)), os.O_RDONLY, owner_uid)
    else:
        path = Path(os.path.abspath(path))
        with open_dir(path.parent) as dfd:
            fd = _open_at(dfd, path.name, path, os.O_RDONLY, owner_uid)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path | str, limit: int = DEFAULT_READ_LIMIT, *, owner_uid: int | None = None) -> bytes:
    """The file's bytes (FileNotFoundError if missing); refuses a symlink, a non-file,
    or more than `limit` bytes."""
    with open_file(path, owner_uid=owner_uid) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _unsafe(path, f"is larger than {limit} bytes")
    return data


def read_text(path: Path | str, limit: int = DEFAULT_READ_LIMIT, *, owner_uid: int | None = None) -> str:
    return read_bytes(path, limit, owner_uid=owner_uid).decode("utf-8")


def read_json(path: Path | str, default: Any = _MISSING, limit: int = DEFAULT_READ_LIMIT, *,
              owner_uid: int | None = None) -> Any:
    """The JSON in `path`; `default` if the file is missing (else FileNotFoundError).
    ValueError if it is not JSON."""
    try:
        data = read_bytes(path, limit, owner_uid=owner_uid)
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default
    return json.loads(data)


def remove(path: Path | str, missing_ok: bool = True) -> bool:
    """Unlink a file (or symlink, which is never followed) through its folder's
    descriptor; True if something was removed."""
    path = Path(os.path.abspath(path))
    try:
        with open_dir(path.parent) as dfd:
            os.unlink(path.name, dir_fd=dfd)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return False
    return True


def remove_tree(path: Path | str) -> None:
    """Remove a folder and everything in it, through its parent's descriptor
    (shutil.rmtree works on descriptors on Linux and never follows a symlink); a
    symlink or file in place of the folder is removed itself, not followed.
    Missing is fine."""
    path = Path(os.path.abspath(path))
    assert shutil.rmtree.avoids_symlink_attacks  # type: ignore[attr-defined]
    try:
        with open_dir(path.parent) as dfd:
            try:
                st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(path.name, dir_fd=dfd)
            else:
                shutil.rmtree(path.name, dir_fd=dfd)
            os.fsync(dfd)
    except FileNotFoundError:
        return


def new_dir(path: Path | str, mode: int = 0o700) -> Path:
    """Make folder `path`, which must not exist yet (FileExistsError otherwise: never
    adopted), with exactly `mode`; its parent must exist and is walked without
    following symlinks."""
    path = Path(os.path.abspath(path))
    with open_dir(path.parent) as dfd:
        os.mkdir(path.name, 0o700, dir_fd=dfd)
        fd = os.open(path.name, _DIR_FLAGS, dir_fd=dfd)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.fsync(dfd)
    return path


def temp_dir(parent: Path | str, name: str, mode: int = 0o700) -> Path:
    """A new folder with a random name (`.<name>.<random>.tmp`) in `parent`, made by
    this process (never one that was there before)."""
    for _ in range(20):
        try:
            return new_dir(Path(parent) / f".{name}.{secrets.token_hex(6)}.tmp", mode)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a temporary folder in {parent}")


def copy_tree(src: Path | str, dst: Path | str, mode: int = 0o700) -> None:
    """Copy folder `src` to the new folder `dst` (made with `mode`; its sub-folders and
    files keep their modes). Every folder and file is opened without following a
    symlink, and a symlink, device or other special file in `src` is refused: the
    copy holds regular files and folders only."""
    src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    new_dir(dst, mode)
    with open_dir(src) as sfd, open_dir(dst) as dfd:
        _copy_into(sfd, dfd, src)


def _copy_into(sfd: int, dfd: int, where: Path) -> None:
    for name in sorted(os.listdir(sfd)):
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dfd)
            sub_s = os.open(name, _DIR_FLAGS, dir_fd=sfd)
            try:
                sub_d = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    _copy_into(sub_s, sub_d, where / name)
                    os.fchmod(sub_d, stat.S_IMODE(st.st_mode))
                    os.fsync(sub_d)
                finally:
                    os.close(sub_d)
            finally:
                os.close(sub_s)
        elif stat.S_ISREG(st.st_mode):
            rfd = _open_at(sfd, name, where / name, os.O_RDONLY, None)
            try:
                wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=dfd)
                try:
                    while chunk := os.read(rfd, 1 << 20):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(wfd, view):]
                    os.fchmod(wfd, stat.S_IMODE(os.fstat(rfd).st_mode))
                    os.fsync(wfd)
                finally:
                    os.close(wfd)
            finally:
                os.close(rfd)
        else:
            raise _unsafe(where / name, "is a symlink or a special file, which is never copied")


def replace_symlink(path: Path | str, target: str) -> None:
    """Make `path` a symlink to `target` in one rename (a reader sees the old link or
    the new one); what is at `path` now must be a symlink or nothing."""
    path = Path(os.path.abspath(path))
    with open_dir(path.parent) as dfd:
        try:
            st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISLNK(st.st_mode):
            raise _unsafe(path, "is not a symlink, so it cannot be switched atomically")
        tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        os.symlink(target, tmp, dir_fd=dfd)
        try:
            os.rename(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)


@contextmanager
def lock(path: Path | str, *, blocking: bool = True) -> Iterator[int]:
    """An exclusive flock on lock file `path` (made 0600 if missing; never a symlink,
    and only this process's user's). BlockingIOError when not `blocking` and held."""
    import fcntl

    path = Path(os.path.abspath(path))
    with open_dir(path.parent) as dfd:
        fd = _open_at(dfd, path.name, path, os.O_RDWR | os.O_CREAT, os.geteuid())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)


def rename(src: Path | str, dst: Path | str) -> None:
    """Rename within one folder tree, both ends' folders opened without following symlinks."""
    src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    with open_dir(src.parent) as sfd, open_dir(dst.parent) as dfd:
        os.rename(src.name, dst.name, src_dir_fd=sfd, dst_dir_fd=dfd)
        os.fsync(dfd)


def chmod(path: Path | str, mode: int) -> None:
    """Set the mode of a file or folder through a descriptor opened without following
    a symlink anywhere in `path`: a symlink is refused, never followed; so is anything
    that is neither a regular file nor a folder."""
    path = Path(os.path.abspath(path))
    with open_dir(path.parent) as dfd:
        fd = _open_at(dfd, path.name, path, os.O_RDONLY, None, folders=True)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def lstat(path: Path | str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
