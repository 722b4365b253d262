"""GRUB's menu for BIOS boots (portal/update/grub.py)."""

from __future__ import annotations

import pytest

from portal.update import grub
from tests.conftest import REPO

CMD = "root=PARTLABEL=mailstead_{v} rw console=tty0 console=ttyS0,115200 quiet audit=0"


def test_the_image_ships_the_same_header_the_updates_write() -> None:
    shipped = (REPO / "image" / "extra" / "efi" / "grub" / "grub.cfg").read_text()
    assert shipped == grub.HEADER


def test_one_entry_per_version_newest_first_each_booting_its_own_slot() -> None:
    cfg = grub.menu([grub.Boot("0.1.0", CMD.format(v="0.1.0")), grub.Boot("0.10.0", CMD.format(v="0.10.0")),
                     grub.Boot("0.9.1", CMD.format(v="0.9.1"))])
    assert cfg.startswith(grub.HEADER)
    entries = cfg[len(grub.HEADER):]
    assert [line.split("--id ")[1].split()[0] for line in entries.splitlines() if line.startswith("menuentry")] \
        == ["mailstead_0.10.0", "mailstead_0.9.1", "mailstead_0.1.0"]
    assert "    linux /mailstead/0.9.1/vmlinuz root=PARTLABEL=mailstead_0.9.1 rw console=tty0" in entries
    assert "    initrd /mailstead/0.9.1/initrd\n" in entries


@pytest.mark.parametrize("cmdline,why", [
    ("root=PARTLABEL=mailstead_0.2.0 rw", "does not name its own system slot"),       # another version's slot
    ("rw quiet", "does not name its own system slot"),
    ("root=PARTLABEL=mailstead_0.1.0 init=/bin/sh; reboot", "characters GRUB would misread"),
    ("root=PARTLABEL=mailstead_0.1.0 x=${evil}", "characters GRUB would misread"),
    ('root=PARTLABEL=mailstead_0.1.0 "quoted"', "characters GRUB would misread"),
    ("root=PARTLABEL=mailstead_0.1.0 }\nmenuentry x {", "characters GRUB would misread"),
])
def test_a_command_line_grub_could_misread_or_that_boots_another_slot_is_refused(cmdline, why) -> None:
    with pytest.raises(grub.GrubError, match=why):
        grub.menu([grub.Boot("0.1.0", cmdline)])


def test_nul_padding_and_extra_spaces_of_a_cmdline_section_are_tidied() -> None:
    assert grub.check_cmdline("0.1.0", "root=PARTLABEL=mailstead_0.1.0   rw\x00\x00") == \
        "root=PARTLABEL=mailstead_0.1.0 rw"


def test_a_file_that_is_not_a_kernel_image_is_refused(tmp_path) -> None:
    bogus = tmp_path / "mailstead_0.1.0.efi"
    bogus.write_bytes(b"MZ" + b"\x00" * 200)
    with pytest.raises(grub.GrubError, match="not a kernel image"):
        grub.read_uki(bogus, "0.1.0")
