"""What an image tar holds (portal/stack/images.py, ImageTar.content_key): the key that
lets an update take over images whose contents did not change. It must see every
difference that matters to a container (a name, a mode, an owner, a byte, a link,
an extended attribute) and none that does not (a member's time, the build overlay's
bookkeeping), and the bytes it
was taken of are the bytes docker is checked to read."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from portal.stack.images import ImageError, ImageTar, open_tars

FILES = {"etc/": None, "etc/app.conf": b"listen = 25\n", "usr/bin/app": b"\x7fELF" + bytes(3000),
         "usr/bin/alias": "app"}


def make_tar(path: Path, *, mtime: int = 1_700_000_000, files: dict | None = None, mode: int = 0o755,
             uid: int = 0, xattr: str | None = None, overlay: str = "\x00\xfb\x1d") -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (files or FILES).items():
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime, info.uid = mtime, uid
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                # mkosi builds a service in an overlay, whose file handles differ every build
                info.pax_headers = {"SCHILY.xattr.user.overlay.origin": overlay,
                                    "SCHILY.xattr.user.overlay.impure": "y"}
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), mode if name.startswith("usr/bin") else 0o644
                if xattr and name == "usr/bin/app":
                    info.pax_headers = {"SCHILY.xattr.security.capability": xattr}
                tar.addfile(info, io.BytesIO(data))
    return path


def key_of(tmp_path: Path, name: str, **kwargs) -> str:
    folder = tmp_path / name
    folder.mkdir()
    make_tar(folder / "mailstead-base.tar", **kwargs)
    with open_tars(folder, ("base",)) as tars:
        return tars["base"].content_key()


def test_the_same_files_at_another_time_are_the_same_contents(tmp_path: Path) -> None:
    first = key_of(tmp_path, "a")
    assert key_of(tmp_path, "b", mtime=1_800_000_000) == first  # built later: the same image
    assert key_of(tmp_path, "c", overlay="\x00\xfb\x1e") == first  # in another build's overlay
    assert key_of(tmp_path, "d") == first


@pytest.mark.parametrize("change", [
    {"files": {**FILES, "etc/app.conf": b"listen = 26\n"}},       # one byte
    {"files": {**FILES, "etc/other.conf": b""}},                  # one file more
    {"files": {k: v for k, v in FILES.items() if k != "usr/bin/alias"}},
    {"files": {**FILES, "usr/bin/alias": "other"}},               # a link's target
    {"mode": 0o4755},                                             # setuid
    {"uid": 1000},                                                # owner
    {"xattr": "AQAAAgAEAAAAAAAAAAAAAAAAAAA="},                    # a file capability
], ids=["byte", "file", "missing", "link", "mode", "owner", "xattr"])
def test_any_difference_a_container_sees_is_other_contents(tmp_path: Path, change: dict) -> None:
    assert key_of(tmp_path, "changed", **change) != key_of(tmp_path, "shipped")


def test_the_key_and_the_sha256_come_from_one_read_that_docker_is_checked_against(tmp_path: Path) -> None:
    make_tar(tmp_path / "mailstead-base.tar")
    raw = (tmp_path / "mailstead-base.tar").read_bytes()
    with open_tars(tmp_path, ("base",)) as tars:
        tar: ImageTar = tars["base"]
        tar.content_key()
        assert tar.sha256 == hashlib.sha256(raw).hexdigest()  # the whole file, padding included
        assert tar.hash() == tar.sha256
        reader = tar.reader()
        assert b"".join(reader) == raw
        reader.check()
        # The file changes between the key and docker's read: the load is refused.
        with open(tmp_path / "mailstead-base.tar", "r+b") as f:
            f.seek(600)
            f.write(b"X")
        reader = tar.reader()
        b"".join(reader)
        with pytest.raises(ImageError, match="changed while it was being loaded"):
            reader.check()


def test_a_file_that_is_not_a_tar_is_named(tmp_path: Path) -> None:
    (tmp_path / "mailstead-base.tar").write_bytes(b"\x01" * 5000)
    with open_tars(tmp_path, ("base",)) as tars, pytest.raises(ImageError) as err:
        tars["base"].content_key()
    assert "mailstead-base.tar is not a readable tar" in str(err.value)
