"""The built image as an update needs it: the A/B disk layout (read from its
GPT), and its kernel image as GRUB boots it on BIOS machines (portal/update/grub.py)."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import pytest

from portal.update import grub

REPO = Path(__file__).resolve().parents[2]
ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
VAR = uuid.UUID("4d21b016-b534-45c2-a9fb-5c16e091fd2d")
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS = uuid.UUID("21686148-6449-6e6f-744e-656564454649")


@pytest.fixture(scope="module")
def image() -> tuple[Path, str]:
    raw = Path(os.environ.get("MAILSTEAD_IMAGE", REPO / "mkosi.output" / "mailstead.raw")).resolve()
    assert raw.is_file(), f"{raw}: build the image first (scripts/test builds it for this tier)"
    assert raw.name.startswith("mailstead_") and raw.name.endswith(".raw"), raw.name
    return raw, raw.name[len("mailstead_"):-len(".raw")]


def partitions(raw: Path) -> list[tuple[uuid.UUID, str, int]]:
    """(type, label, size in bytes) of each GPT entry, in order."""
    with raw.open("rb") as f:
        f.seek(512)
        header = f.read(92)
        assert header[:8] == b"EFI PART"
        lba, count, size = struct.unpack_from("<QII", header, 72)
        f.seek(lba * 512)
        out = []
        for _ in range(count):
            e = f.read(size)
            kind = uuid.UUID(bytes_le=e[:16])
            if kind.int:
                first, last = struct.unpack_from("<QQ", e, 32)
                out.append((kind, e[56:128].decode("utf-16le").rstrip("\x00"), (last - first + 1) * 512))
        return out


def test_two_system_slots_of_one_size_and_a_var_partition_last(image) -> None:
    raw, version = image
    parts = partitions(raw)
    assert [(k, label) for k, label, _ in parts] == [
        (ESP, "mailstead-esp"), (BIOS, parts[1][1]), (ROOT_X86_64, f"mailstead_{version}"),
        (ROOT_X86_64, "_empty"), (VAR, "mailstead-var")]
    assert parts[2][2] == parts[3][2] >= 2 * 1024**3, "the slots differ in size, or are too small"


def test_the_kernel_image_carries_what_grub_boots_and_names_its_own_slot(image) -> None:
    raw, version = image
    boot = grub.read_uki(raw.with_suffix(".efi"), version)
    assert boot.kernel[:2] == b"MZ" and len(boot.initrd) > 1024 * 1024
    assert f"root=PARTLABEL=mailstead_{version}" in boot.cmdline.split()
    cfg = grub.menu([boot])
    assert f"--id mailstead_{version} {{" in cfg
