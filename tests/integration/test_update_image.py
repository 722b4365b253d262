"""The built image as an update needs it: the A/B disk layout (read from its
GPT), and its kernel image as GRUB boots it on BIOS machines (portal/update/grub.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from portal.update import gpt, grub

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image() -> tuple[Path, str]:
    raw = Path(os.environ.get("MAILSTEAD_IMAGE", REPO / "mkosi.output" / "mailstead.raw")).resolve()
    assert raw.is_file(), f"{raw}: build the image first (scripts/test builds it for this tier)"
    assert raw.name.startswith("mailstead_") and raw.name.endswith(".raw"), raw.name
    return raw, raw.name[len("mailstead_"):-len(".raw")]


def test_two_system_slots_of_one_size_and_a_var_partition_last(image) -> None:
    raw, version = image
    parts = gpt.read(raw)
    assert [(p.type, p.label) for p in parts] == [
        (gpt.ESP, "mailstead-esp"), (gpt.BIOS_BOOT, parts[1].label), (gpt.ROOT_X86_64, f"mailstead_{version}"),
        (gpt.ROOT_X86_64, "_empty"), (gpt.VAR, "mailstead-var")]
    assert [p.number for p in parts] == [1, 2, 3, 4, 5]
    assert parts[2].size == parts[3].size >= 2 * 1024**3, "the slots differ in size, or are too small"
    assert len({p.uuid for p in parts}) == 5


def test_the_kernel_image_carries_what_grub_boots_and_names_its_own_slot(image) -> None:
    raw, version = image
    boot = grub.read_uki(raw.with_suffix(".efi"), version)
    assert boot.kernel[:2] == b"MZ" and len(boot.initrd) > 1024 * 1024
    assert f"root=PARTLABEL=mailstead_{version}" in boot.cmdline.split()
    cfg = grub.menu([boot])
    assert f"--id mailstead_{version} {{" in cfg
