"""GRUB's menu for BIOS boots, built from the versions installed on the ESP.

UEFI boots need none of this: systemd-boot finds each version's unified kernel
image in /EFI/Linux and counts the boots of a new one itself. GRUB (BIOS) can
neither run those images nor count, so for each version the update service
puts the kernel and initrd that the image carries (its .linux and .initrd
sections) in /mailstead/<version>/ on the ESP, and writes /grub/grub.cfg with
one entry per version and the image's own kernel command line (its .cmdline,
which names the version's own slot). A new version is booted once through
GRUB's one-shot `next_entry`; it becomes the default (`saved_entry`) only
after its health checks passed (HEADER below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from portal.core.errors import MailsteadError
from portal.update.feed import VERSION_RE, version_key

# The start of grub.cfg; image/extra/efi/grub/grub.cfg ships the same lines
# (tests/unit/test_update_grub.py holds them equal).
HEADER = """\
# Mailstead: GRUB's menu on BIOS boots (UEFI boots use systemd-boot). mkosi
# appends the image's own entry below; after an update the agent writes this
# file again with an entry per installed version (portal/update/grub.py).
set timeout=0
# An update boots its new version once (next_entry, consumed here); the
# default (saved_entry) changes only after that version passed its health
# checks, so a failed or hung boot comes back to the version that worked.
load_env
if [ -n "${next_entry}" ]; then
    set default="${next_entry}"
    set next_entry=
    save_env next_entry
elif [ -n "${saved_entry}" ]; then
    set default="${saved_entry}"
fi
"""
# What a kernel command line may hold here: words of plain characters. Nothing
# GRUB would read as syntax (quotes, $, ;, braces, backslashes, line breaks).
CMDLINE_RE = re.compile(r"^[A-Za-z0-9_.,:=/+@-]+( [A-Za-z0-9_.,:=/+@-]+)*$")
MAX_KERNEL = 64 * 1024 * 1024
MAX_INITRD = 256 * 1024 * 1024


class GrubError(MailsteadError):
    code = "grub"


def entry_id(version: str) -> str:
    return f"mailstead_{version}"


@dataclass(frozen=True)
class Boot:
    """What GRUB needs to boot one version."""

    version: str
    cmdline: str
    kernel: bytes = b""
    initrd: bytes = b""


def check_cmdline(version: str, cmdline: str) -> str:
    cmdline = " ".join(cmdline.replace("\x00", " ").split())
    if not CMDLINE_RE.match(cmdline) or len(cmdline) > 2000:
        raise GrubError(f"the kernel command line of {version} holds characters GRUB would misread")
    if f"root=PARTLABEL={entry_id(version)}" not in cmdline.split():
        raise GrubError(f"the kernel command line of {version} does not name its own system slot "
                        f"(root=PARTLABEL={entry_id(version)})")
    return cmdline


def read_uki(path: Path, version: str) -> Boot:
    """The kernel, initrd and command line inside a unified kernel image (a PE file)."""
    import pefile

    try:
        pe = pefile.PE(str(path), fast_load=True)
    except (OSError, pefile.PEFormatError) as exc:
        raise GrubError(f"{path.name} is not a kernel image: {exc}") from None
    try:
        sections = {s.Name.rstrip(b"\x00").decode("ascii", "replace"): s for s in pe.sections}
        missing = [n for n in (".linux", ".initrd", ".cmdline") if n not in sections]
        if missing:
            raise GrubError(f"{path.name} has no {', '.join(missing)} section: not a unified kernel image")

        def data(name: str, limit: int) -> bytes:
            s = sections[name]
            size = min(s.Misc_VirtualSize or s.SizeOfRawData, s.SizeOfRawData)
            if size > limit:
                raise GrubError(f"{path.name}: its {name} is larger than {limit} bytes")
            return bytes(s.get_data()[:size])

        cmdline = data(".cmdline", 4096).decode("ascii", "replace")
        return Boot(version, check_cmdline(version, cmdline), data(".linux", MAX_KERNEL),
                    data(".initrd", MAX_INITRD))
    finally:
        pe.close()


def menu(boots: list[Boot]) -> str:
    """grub.cfg: the header, then one entry per version, newest first."""
    out = [HEADER]
    for boot in sorted(boots, key=lambda b: version_key(b.version), reverse=True):
        if not VERSION_RE.match(boot.version):
            raise GrubError(f"'{boot.version[:40]}' is not a version")
        cmdline = check_cmdline(boot.version, boot.cmdline)
        out.append(f'menuentry "Mailstead {boot.version}" --id {entry_id(boot.version)} {{\n'
                   f"    linux /mailstead/{boot.version}/vmlinuz {cmdline}\n"
                   f"    initrd /mailstead/{boot.version}/initrd\n"
                   "}\n")
    return "".join(out)
