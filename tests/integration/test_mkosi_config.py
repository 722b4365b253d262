"""The image configuration as mkosi 25 reads it: Ubuntu by default, Debian as a variant."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MKOSI = Path(os.environ.get("MAILSTEAD_CACHE", "/var/cache/mailstead")) / "bin" / "mkosi"


def summary(*args: str) -> dict:
    assert MKOSI.exists(), f"{MKOSI} is missing: scripts/test unpacks it (scripts/lib.sh ensure_mkosi)"
    out = subprocess.run(
        [str(MKOSI), "-C", str(ROOT), *args, "--json", "summary"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout)["Images"][-1]


@pytest.mark.parametrize(
    ("args", "distribution", "release"),
    [((), "ubuntu", "noble"), (("-d", "ubuntu", "-r", "noble"), "ubuntu", "noble"),
     (("-d", "ubuntu"), "ubuntu", "noble"), (("-d", "debian"), "debian", "trixie")],
)  # fmt: skip
def test_distribution_and_release(args: tuple[str, ...], distribution: str, release: str) -> None:
    image = summary(*args)
    assert (image["Distribution"], image["Release"]) == (distribution, release)
    assert image["Format"] == "disk" and image["Bootable"] == "enabled"
    assert image["Bootloader"] == "systemd-boot" and image["BiosBootloader"] == "grub"
    assert "openssh-server" in image["Packages"] and "nginx" in image["Packages"]
    assert {"restic", "systemd-container", "python3-apscheduler", "python3-yaml"} <= set(image["Packages"])
    # Updates are whole images (portal/update): nothing in the image updates packages in place.
    assert "unattended-upgrades" not in image["Packages"]
    assert any(p.startswith("docker") for p in image["Packages"])


def test_debian_uses_our_apt_sources_not_the_debug_suite() -> None:
    image = summary("-d", "debian")
    trees = json.dumps(image["SandboxTrees"])
    assert "mkosi.sandbox-debian" in trees
    sources = (ROOT / "mkosi.sandbox-debian/etc/apt/sources.list.d/mkosi.sources").read_text()
    assert "debug" not in sources and "trixie-security" in sources
    assert "docker-cli" in image["Packages"], "trixie ships the docker CLI separately"


def test_initrd_carries_only_what_boot_needs() -> None:
    image = summary("-d", "debian")
    assert image["KernelModulesInitrdExclude"] == [".*"]
    assert "default" in image["KernelModulesInitrdInclude"]
