"""The image's kernel command line (mkosi.conf): what a boot that cannot go on does,
and that GRUB can carry the line (BIOS updates copy it into their entries).

The unit and drop-in that reboot out of emergency mode reach the initrd and the
system as credentials on that line; their readable text is in image/credentials/.
The VM tier boots the image into the initrd's emergency mode and sees it reboot
(tests/vm/test_boot_failures.py).
"""

from __future__ import annotations

import base64

from portal.update.grub import check_cmdline, entry_id
from tests.conftest import REPO

CREDENTIALS = REPO / "image" / "credentials"
UNIT = "mailstead-emergency-reboot.service"


def kernel_command_line() -> list[str]:
    """mkosi.conf's KernelCommandLine= words, in order (a setting may repeat and go on
    over indented lines; words are split at spaces and line ends, as mkosi does)."""
    words, current = [], False
    for raw in (REPO / "mkosi.conf").read_text().splitlines():
        if raw.startswith("KernelCommandLine="):
            current = True
            words += raw.partition("=")[2].split()
        elif current and raw[:1].isspace() and raw.strip():
            words += raw.split()
        else:
            current = False
    return words


def credentials() -> dict[str, bytes]:
    out = {}
    for word in kernel_command_line():
        key, _, value = word.partition("=")
        if key == "systemd.set_credential_binary":
            name, _, data = value.partition(":")
            out[name] = base64.b64decode(data, validate=True)
    return out


def sections(text: str) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(section, []).append((key, value))
    return out


def test_the_line_carries_exactly_the_credential_files() -> None:
    on_line = credentials()
    files = {p.name: p.read_bytes() for p in CREDENTIALS.iterdir()}
    assert on_line == files, "mkosi.conf's credentials differ from image/credentials/: base64 -w0 each file again"


def test_emergency_mode_says_so_then_reboots() -> None:
    unit = sections(credentials()[f"systemd.extra-unit.{UNIT}"].decode())
    assert ("DefaultDependencies", "no") in unit["Unit"]  # also in the initrd, before anything is mounted
    assert ("SuccessAction", "reboot") in unit["Unit"] and ("FailureAction", "reboot") in unit["Unit"]
    run = [value for key, value in unit["Service"] if key == "ExecStart"]
    assert run[0].startswith("echo ") and "Rebooting in 30 s" in run[0] and run[1] == "sleep 30", run
    assert ("TTYPath", "/dev/console") in unit["Service"]  # the serial console: what the owner sees
    dropin = sections(credentials()["systemd.unit-dropin.emergency.target"].decode())
    assert dropin == {"Unit": [("Wants", UNIT)]}


def test_grub_and_the_kernel_take_the_whole_line() -> None:
    version = "0.1.0.3"
    line = " ".join(kernel_command_line()).replace("%v", version)
    assert check_cmdline(version, line) == line  # what a BIOS update writes into its GRUB entry
    assert f"root=PARTLABEL={entry_id(version)}" in line
    assert len(line) < 2048  # the x86 kernel's COMMAND_LINE_SIZE
