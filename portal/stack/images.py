"""Load the preloaded container images (mkosi subimage tars) into docker.

The base tar is `docker import`ed; each service tar holds only what the
service's packages added (mkosi Overlay=yes) and is layered on the base by a
two-line build, so the base layer is shared. Loading is idempotent: an image
whose label names the same source tar is kept. An image whose label names the
same contents (`content_key`: every member's name, owner, mode, attributes and
bytes, not its time) is tagged for the new version instead of being loaded again: an
appliance update that did not change the stack's packages loads nothing (the
image build makes the tars' contents reproducible: recipes/base/mkosi.finalize).
Nothing here needs a network.

Every tar is opened once, without following a symlink (`open_tars`), and docker
reads it from that open file: what was checked is what is loaded, whatever
happens to the path meanwhile. When the tar's SHA-256 was taken before (a
stack upgrade), the bytes docker got are hashed on the way and must match.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from portal.core import safefs
from portal.core.errors import MailsteadError, UnsafePathError
from portal.stack.settings import SERVICES

SOURCE_LABEL = "org.mailstead.source"    # this tar file (name, size, mtime): no reading needed
CONTENT_LABEL = "org.mailstead.content"  # what it holds (content_key), and how it was loaded (RECIPE)
# How an image is made from its tar: the base's import changes, a service's build steps.
BASE_CHANGES = ('CMD ["/bin/sh"]',)
# Nothing runs: each service tar carries its own ld.so.cache (recipes/base/mkosi.conf).
LAYER_STEPS = "ADD layer.tar /\n"
# Part of every content label: images made another way are never taken for these.
RECIPE = hashlib.sha256(repr((BASE_CHANGES, LAYER_STEPS)).encode()).hexdigest()[:12]
Progress = Callable[[str, str], None]
CHUNK = 1 << 20


class ImageError(MailsteadError, RuntimeError):
    """An image could not be loaded; the message says which and why."""

    code = "images"


@dataclass
class ImageTar:
    """One image tar, open for reading: docker is given this file, never the path."""

    name: str            # base, postfix, ...
    path: Path           # for messages only
    file: IO[bytes]
    size: int
    mtime_ns: int
    sha256: str | None = None  # taken from the open file (hash()); then checked as docker reads
    content: str | None = None  # content_key(), taken in the same read

    @property
    def key(self) -> str:
        """Identifies one build of a tar without reading 150 MB (size + mtime)."""
        return f"{self.path.name}:{self.size}:{self.mtime_ns}"

    def hash(self) -> str:
        """SHA-256 of the tar, read from the open file (its content_key in the same read)."""
        self._read()
        assert self.sha256 is not None
        return self.sha256

    def content_key(self) -> str:
        """SHA-256 of what the tar holds, its members' times left out: two builds of the
        same packages give the same key. Its SHA-256 is taken in the same read, so what
        docker reads later is checked to be what this key was taken of."""
        if self.content is None:
            self._read()
        assert self.content is not None
        return self.content

    def _read(self) -> None:
        self.file.seek(0)
        raw = _Counted(self.file, self.size)
        content = hashlib.sha256()
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    pax = sorted((k, v) for k, v in member.pax_headers.items() if not _build_noise(k))
                    content.update(repr((member.name, member.type, member.mode, member.uid, member.gid, member.uname,
                                         member.gname, member.linkname, member.size, member.devmajor,
                                         member.devminor, pax)).encode() + b"\0")
                    if member.isreg():
                        data = tar.extractfile(member)
                        assert data is not None
                        while chunk := data.read(CHUNK):
                            content.update(chunk)
        except tarfile.TarError as exc:
            raise ImageError(f"{self.path} is not a readable tar ({exc}); rebuild the appliance image "
                             "(mkosi build)") from None
        raw.read_rest()
        self.file.seek(0)
        self.sha256 = raw.sha.hexdigest()
        self.content = content.hexdigest()

    def reader(self) -> HashingReader:
        return HashingReader(self)


def _build_noise(pax_key: str) -> bool:
    """What a tar member's header says of its build, not of what a container sees: its
    times, and the bookkeeping of the overlay mkosi builds a service in (its file
    handles differ every build)."""
    return pax_key in ("mtime", "atime", "ctime") or pax_key.startswith(
        ("SCHILY.xattr.user.overlay.", "SCHILY.xattr.trusted.overlay."))


class _Counted:
    """The tar's first `size` bytes, hashed as tarfile reads them (and the rest after it)."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self.file, self._left, self.sha = file, size, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self.file.read(n) if n else b""
        self.sha.update(data)
        self._left -= len(data)
        return data

    def read_rest(self) -> None:
        while self.read(CHUNK):
            pass


class HashingReader:
    """The tar's bytes from its start (exactly its size when opened), hashed on the
    way: what docker read is what `check` compares with the hash taken before."""

    def __init__(self, tar: ImageTar) -> None:
        tar.file.seek(0)
        self.tar = tar
        self._left = tar.size
        self._sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        data = self.tar.file.read(n) if n else b""
        self._sha.update(data)
        self.count += len(data)
        self._left -= len(data)
        return data

    def __len__(self) -> int:  # requests sends it with a Content-Length, streamed
        return self._left

    def __bool__(self) -> bool:  # docker-py tests `if not src`: a reader is given, even an empty one
        return True

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def check(self) -> None:
        """ImageError unless docker read the whole tar and it had the hash taken before."""
        if self.count != self.tar.size or (self.tar.sha256 and self._sha.hexdigest() != self.tar.sha256):
            raise ImageError(f"{self.tar.path} changed while it was being loaded (docker read {self.count} of "
                             f"{self.tar.size} bytes, or other bytes than were checked); its images are not "
                             "used. Make sure nothing writes to the bundle, then try again")


def trusted_stat(st: os.stat_result, path: Path, what: str) -> None:
    """Refuse a file or folder that anyone but root could have written (what it holds
    runs with the mail)."""
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(f"{what} {path} must belong to root and be writable by no one else (it is uid "
                              f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); its images would run with "
                              "the mail: chown root and chmod go-w it")


def open_tar_at(dfd: int, folder: Path, name: str) -> ImageTar:
    """`mailstead-<name>.tar` in the opened folder `dfd`: a regular file of root's that
    no one else may write, opened without following a symlink."""
    filename = f"mailstead-{name}.tar"
    path = folder / filename
    f = safefs.open_file(filename, dir_fd=dfd)
    try:
        st = os.fstat(f.fileno())
        trusted_stat(st, path, "image")
    except BaseException:
        f.close()
        raise
    return ImageTar(name, path, f, st.st_size, st.st_mtime_ns)


@contextmanager
def open_tars(folder: Path, names: tuple[str, ...]) -> Iterator[dict[str, ImageTar]]:
    """Every `mailstead-<name>.tar` in `folder`, opened once (the folder walked from /
    without following a symlink); closed on exit. ImageError says what is wrong."""
    tars: dict[str, ImageTar] = {}
    try:
        try:
            with safefs.open_dir(folder) as dfd:
                for name in names:
                    try:
                        tars[name] = open_tar_at(dfd, folder, name)
                    except FileNotFoundError:
                        raise ImageError(f"image tar {folder / f'mailstead-{name}.tar'} is missing; rebuild "
                                         "the appliance image (mkosi build)") from None
        except FileNotFoundError:
            raise ImageError(f"the images folder {folder} is missing; rebuild the appliance image "
                             "(mkosi build)") from None
        except UnsafePathError as exc:
            raise ImageError(exc.message) from None
        yield tars
    finally:
        for tar in tars.values():
            tar.file.close()


def current(client: Any, ref: str, key: str) -> str | None:
    """The ID of image `ref` if it was loaded from the source `key`."""
    import docker.errors

    try:
        image = client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    return image.id if labels.get(SOURCE_LABEL) == key else None


def same_content(client: Any, ref: str, content: str) -> str | None:
    """The ID of an image that holds `content` (its CONTENT_LABEL): `ref` if it does,
    else one loaded for another version, which is then tagged `ref` too."""
    import docker.errors

    try:
        image = client.images.get(ref)
        if (image.attrs.get("Config", {}).get("Labels") or {}).get(CONTENT_LABEL) == content:
            return image.id
    except docker.errors.ImageNotFound:
        pass
    for image in client.images.list(filters={"label": f"{CONTENT_LABEL}={content}"}):
        repo, tag = ref.split(":")
        image.tag(repo, tag)
        return image.id
    return None


@contextmanager
def api_timeout(client: Any, seconds: float | None) -> Iterator[None]:
    """Docker requests that stream a whole tar may take long: no short client timeout."""
    api = getattr(client, "api", None)
    old = getattr(api, "timeout", None)
    if api is not None:
        api.timeout = seconds
    try:
        yield
    finally:
        if api is not None:
            api.timeout = old


def import_base(client: Any, tar: ImageTar, ref: str, key: str, content: str,
                timeout: float | None = 1800) -> str:
    repo, tag = ref.split(":")
    reader = tar.reader()
    with api_timeout(client, timeout):
        client.api.import_image(
            src=reader, repository=repo, tag=tag,
            changes=[f"LABEL {SOURCE_LABEL}={key}", f"LABEL {CONTENT_LABEL}={content}", *BASE_CHANGES],
        )
    reader.check()
    return client.images.get(ref).id


def build_layer(client: Any, base_id: str, tar: ImageTar, ref: str, key: str, content: str,
                service: str) -> str:
    """Layer `tar` on the base: FROM base + ADD (which keeps owners and modes)."""
    dockerfile = (
        f"FROM {base_id}\n"
        f"{LAYER_STEPS}"
        f'LABEL {SOURCE_LABEL}="{key}" {CONTENT_LABEL}="{content}" org.mailstead.service="{service}"\n'
    ).encode()
    with tempfile.TemporaryFile(dir=os.environ.get("MAILSTEAD_TMPDIR")) as ctx:
        with tarfile.open(fileobj=ctx, mode="w") as out:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            out.addfile(info, io.BytesIO(dockerfile))
            layer = tarfile.TarInfo("layer.tar")
            layer.size, layer.mode, layer.mtime = tar.size, 0o644, tar.mtime_ns // 1_000_000_000
            reader = tar.reader()
            out.addfile(layer, reader)  # from the open file, never the path
            reader.check()
        ctx.seek(0)
        log = []
        for chunk in client.api.build(fileobj=ctx, custom_context=True, tag=ref,
                                      rm=True, forcerm=True, pull=False, decode=True):
            if "error" in chunk:
                raise ImageError(f"building {ref} failed: {chunk['error'].strip()}")
            log.append(chunk.get("stream", ""))
    return client.images.get(ref).id


@contextmanager
def load_lock(lock_path: Path) -> Iterator[None]:
    """One loader at a time (the boot-time loader and a deploy may overlap)."""
    with safefs.open_dir(lock_path.parent, create=True):  # made (0755) if missing, never changed
        pass
    with safefs.lock(lock_path):
        yield


def load_images(client: Any, images_dir: Path, version: str, *,
                lock_path: Path, services: tuple[str, ...] = SERVICES,
                progress: Progress | None = None) -> dict[str, str]:
    """Make sure every service image is in docker; return {service: image ID}."""
    with open_tars(images_dir, ("base", *services)) as tars:
        return load_tars(client, tars, version, lock_path=lock_path, services=services, progress=progress)


def in_docker(client: Any, ref: str, key: str, content: Callable[[], str]) -> tuple[str | None, bool]:
    """The image for `ref`, and whether it was loaded from this very tar (its name, size
    and mtime: nothing read); else one that holds the same `content()`, tagged `ref`
    (from another version); else None."""
    image_id = current(client, ref, key)
    if image_id is not None:
        return image_id, True
    return same_content(client, ref, content()), False


def load_tars(client: Any, tars: dict[str, ImageTar], version: str, *, lock_path: Path,
              services: tuple[str, ...] = SERVICES, progress: Progress | None = None) -> dict[str, str]:
    """load_images from tars opened before (open_tars): {service: image ID}.

    Each image is kept if it was loaded from this very tar, else taken over if an image
    with the same contents is in docker (in_docker), else loaded."""
    say = progress or (lambda _name, _msg: None)
    with load_lock(lock_path):
        base_tar = tars["base"]
        base_ref = f"mailstead-base:{version}"
        base_key = base_tar.key

        def base_content() -> str:
            return f"{RECIPE}:{base_tar.content_key()}"

        base_id, same_tar = in_docker(client, base_ref, base_key, base_content)
        rebuilt_base = base_id is None
        if base_id is None:
            say("base", "importing")
            start = time.monotonic()
            base_id = import_base(client, base_tar, base_ref, base_key, base_content())
            say("base", f"imported in {time.monotonic() - start:.1f} s")
        elif not same_tar:
            say("base", "already loaded (the same contents)")
        ids = {}
        for service in services:
            tar = tars[service]
            ref = f"mailstead-{service}:{version}"
            key = f"{base_key}+{tar.key}"

            def content(tar: ImageTar = tar) -> str:
                return f"{base_content()}+{tar.content_key()}"

            # On a base imported anew, every service is built anew on it.
            image_id, same_tar = (None, False) if rebuilt_base else in_docker(client, ref, key, content)
            if image_id is None:
                say(service, "loading")
                start = time.monotonic()
                image_id = build_layer(client, base_id, tar, ref, key, content(), service)
                say(service, f"loaded in {time.monotonic() - start:.1f} s")
            else:
                say(service, "already loaded" if same_tar else "already loaded (the same contents)")
            ids[service] = image_id
        return ids


def loaded_images(client: Any, version: str, services: tuple[str, ...] = SERVICES) -> dict[str, str]:
    """{service: image ID} of what is loaded now (missing ones left out)."""
    import docker.errors

    ids = {}
    for service in services:
        try:
            ids[service] = client.images.get(f"mailstead-{service}:{version}").id
        except docker.errors.ImageNotFound:
            pass
    return ids
