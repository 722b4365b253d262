"""Load the preloaded container images (mkosi subimage tars) into docker.

The base tar is `docker import`ed; each service tar holds only what the
service's packages added (mkosi Overlay=yes) and is layered on the base by a
two-line build, so the base layer is shared. Loading is idempotent: an image
whose label names the same source tar is kept. Nothing here needs a network.
"""

from __future__ import annotations

import fcntl
import io
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from portal.stack.settings import SERVICES

SOURCE_LABEL = "org.mailstead.source"
Progress = Callable[[str, str], None]


from portal.core.errors import MailsteadError  # noqa: E402


class ImageError(MailsteadError, RuntimeError):
    code = "images"

    """An image could not be loaded; the message says which and why."""


def source_key(tar: Path) -> str:
    """Identifies one build of a tar without reading 150 MB (size + mtime)."""
    st = tar.stat()
    return f"{tar.name}:{st.st_size}:{st.st_mtime_ns}"


def tar_path(images_dir: Path, name: str) -> Path:
    path = images_dir / f"mailstead-{name}.tar"
    if not path.is_file():
        raise ImageError(f"image tar {path} is missing; rebuild the appliance image (mkosi build)")
    return path


def current(client: Any, ref: str, key: str) -> str | None:
    """The ID of image `ref` if it was loaded from the source `key`."""
    import docker.errors

    try:
        image = client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    return image.id if labels.get(SOURCE_LABEL) == key else None


def import_base(client: Any, tar: Path, ref: str, key: str) -> str:
    repo, tag = ref.split(":")
    client.api.import_image_from_file(
        str(tar), repository=repo, tag=tag,
        changes=[f"LABEL {SOURCE_LABEL}={key}", 'CMD ["/bin/sh"]'],
    )
    return client.images.get(ref).id


def build_layer(client: Any, base_id: str, tar: Path, ref: str, key: str, service: str) -> str:
    """Layer `tar` on the base: FROM base + ADD (which keeps owners and modes)."""
    dockerfile = (
        f"FROM {base_id}\n"
        "ADD layer.tar /\n"
        # The overlay cannot carry the base's ld.so.cache with its new libraries.
        'RUN ["/sbin/ldconfig"]\n'
        f'LABEL {SOURCE_LABEL}="{key}" org.mailstead.service="{service}"\n'
    ).encode()
    with tempfile.TemporaryFile(dir=os.environ.get("MAILSTEAD_TMPDIR")) as ctx:
        with tarfile.open(fileobj=ctx, mode="w") as out:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            out.addfile(info, io.BytesIO(dockerfile))
            out.add(str(tar.resolve()), arcname="layer.tar")  # the file itself, also when `tar` is a link
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
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_images(client: Any, images_dir: Path, version: str, *,
                lock_path: Path, services: tuple[str, ...] = SERVICES,
                progress: Progress | None = None) -> dict[str, str]:
    """Make sure every service image is in docker; return {service: image ID}."""
    say = progress or (lambda _name, _msg: None)
    with load_lock(lock_path):
        base_tar = tar_path(images_dir, "base")
        base_ref = f"mailstead-base:{version}"
        base_key = source_key(base_tar)
        base_id = current(client, base_ref, base_key)
        rebuilt_base = base_id is None
        if base_id is None:
            say("base", "importing")
            start = time.monotonic()
            base_id = import_base(client, base_tar, base_ref, base_key)
            say("base", f"imported in {time.monotonic() - start:.1f} s")
        ids = {}
        for service in services:
            tar = tar_path(images_dir, service)
            ref = f"mailstead-{service}:{version}"
            key = f"{base_key}+{source_key(tar)}"
            image_id = None if rebuilt_base else current(client, ref, key)
            if image_id is None:
                say(service, "loading")
                start = time.monotonic()
                image_id = build_layer(client, base_id, tar, ref, key, service)
                say(service, f"loaded in {time.monotonic() - start:.1f} s")
            else:
                say(service, "already loaded")
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
