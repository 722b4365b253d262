"""The mail stack's image tars as the image build writes them (mkosi.output): what
makes their contents depend on their packages alone (so an update whose packages
did not change loads nothing: portal/stack/images.py), and what lets them load
without running a container (each service carries its own ld.so.cache)."""

from __future__ import annotations

import tarfile

import pytest

from portal.stack.settings import SERVICES

from .stackharness import IMAGES_DIR


def members(name: str) -> dict[str, tarfile.TarInfo]:
    path = IMAGES_DIR / f"mailstead-{name}.tar"
    assert path.exists(), f"{path} is missing: scripts/test builds the image before this tier"
    with tarfile.open(path) as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers()}


def read(name: str, member: str) -> str:
    with tarfile.open(IMAGES_DIR / f"mailstead-{name}.tar") as tar:
        f = tar.extractfile("./" + member)
        assert f is not None, member
        return f.read().decode()


def test_the_base_holds_no_build_date_or_appliance_version() -> None:
    os_release = read("base", "usr/lib/os-release")
    assert "ID=debian" in os_release and "IMAGE_VERSION" not in os_release, os_release
    shadow = [line.split(":") for line in read("base", "etc/shadow").splitlines()]
    users = {f[0]: f for f in shadow}
    for user in ("postfix", "dovecot", "vmail", "redis", "_rspamd", "radicale", "unbound"):
        assert users[user][1] == "!*" and users[user][2] == "", users[user]  # locked; no day of change


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_brings_its_own_library_cache_and_no_leftovers(service: str) -> None:
    base = members("base")
    assert "etc/ld.so.cache" not in base  # it would hide the services' own (mkosi drops duplicates)
    have = members(service)
    assert have["etc/ld.so.cache"].isfile() and have["etc/ld.so.cache"].size > 1000
    for leftover in ("etc/shadow-", "etc/gshadow-", "etc/ssl/private/ssl-cert-snakeoil.key",
                     "etc/ssl/certs/ssl-cert-snakeoil.pem"):
        assert leftover not in have, f"{service}: {leftover}"
