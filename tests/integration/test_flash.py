"""scripts/flash: checksums are checked, partitions and junk targets refused, bytes land intact."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

FLASH = Path(__file__).resolve().parents[2] / "scripts" / "flash"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FLASH), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small stand-in image (random bytes with a sparse hole), its .zst and checksums."""
    raw = tmp_path / "mailstead_9.9.9.raw"
    with raw.open("wb") as f:
        f.write(os.urandom(3 * 2**20))
        f.seek(8 * 2**20)
        f.write(os.urandom(2**20))
    subprocess.run(["zstd", "-q", str(raw), "-o", f"{raw}.zst"], check=True)
    for p in (raw, Path(f"{raw}.zst")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        Path(f"{p}.sha256").write_text(f"{digest}  {p.name}\n")
    return raw


@pytest.mark.parametrize("suffix", ["", ".zst"])
def test_writes_the_image_to_a_file(image: Path, tmp_path: Path, suffix: str) -> None:
    target = tmp_path / "disk.img"
    result = run(f"{image}{suffix}", target)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == image.read_bytes()


def test_refuses_an_image_that_does_not_match_its_checksum(image: Path, tmp_path: Path) -> None:
    with image.open("r+b") as f:
        f.write(b"corrupt")
    target = tmp_path / "disk.img"
    result = run(image, target)
    assert result.returncode != 0
    assert "does not match" in result.stderr and "download it again" in result.stderr
    assert not target.exists(), "nothing may be written from a corrupt image"


def test_refuses_a_missing_checksum_file(image: Path, tmp_path: Path) -> None:
    Path(f"{image}.sha256").unlink()
    result = run(image, tmp_path / "disk.img")
    assert result.returncode != 0 and "checksum file" in result.stderr


@pytest.fixture
def loop_disk(tmp_path: Path):
    """A 16 MiB loop device with one partition, as a stand-in for a real disk."""
    backing = tmp_path / "loopdisk.img"
    backing.write_bytes(b"\0" * 16 * 2**20)
    loop = subprocess.run(["losetup", "--find", "--show", "--partscan", str(backing)],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    try:
        subprocess.run(["sgdisk", "--new=1:2048:+4M", loop], capture_output=True, check=True)
        subprocess.run(["partx", "--update", loop], capture_output=True)
        subprocess.run(["udevadm", "settle"], capture_output=True)
        assert Path(f"{loop}p1").exists(), f"{loop}p1 did not appear"
        yield loop
    finally:
        subprocess.run(["umount", "--quiet", f"{loop}p1"], capture_output=True)
        subprocess.run(["losetup", "--detach", loop], check=True)


def test_refuses_a_partition(image: Path, loop_disk: str) -> None:
    result = run("--yes", image, f"{loop_disk}p1")
    assert result.returncode != 0 and "is a partition" in result.stderr


def test_refuses_a_mounted_disk(image: Path, loop_disk: str, tmp_path: Path) -> None:
    part = f"{loop_disk}p1"
    subprocess.run(["mkfs.ext4", "-q", part], check=True)
    (mnt := tmp_path / "mnt").mkdir()
    subprocess.run(["mount", part, str(mnt)], check=True)
    (mnt / "keep").write_text("data already there")
    result = run("--yes", image, loop_disk)
    assert result.returncode != 0 and "is mounted" in result.stderr
    assert (mnt / "keep").read_text() == "data already there"


def test_writes_a_whole_disk(image: Path, loop_disk: str) -> None:
    result = run("--yes", f"{image}.zst", loop_disk)
    assert result.returncode == 0, result.stderr
    with open(loop_disk, "rb") as disk:
        assert disk.read(image.stat().st_size) == image.read_bytes()


def test_asks_before_erasing_a_disk(image: Path, loop_disk: str) -> None:
    result = subprocess.run([str(FLASH), str(image), loop_disk], input="no\n",
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and "will be erased" in result.stderr and "nothing written" in result.stderr


def test_refuses_a_directory_target(image: Path, tmp_path: Path) -> None:
    result = run(image, tmp_path)
    assert result.returncode != 0 and "neither a block device nor a regular file" in result.stderr
