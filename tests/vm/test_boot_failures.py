"""A boot that cannot go on reboots by itself, so that the boot loader can go back
to the version that worked (a new version's one try from systemd-boot, GRUB's spent
one-shot entry).

The image as shipped (UEFI, systemd-boot, its UKI), with its initrd told to stop in
emergency mode as it would if the new version's root partition were not found:
`rd.systemd.unit=emergency.target`, handed to systemd-stub by QEMU over SMBIOS (type
11), so the image is not changed. The emergency-reboot unit comes from the kernel
command line's credentials (mkosi.conf, image/credentials/; the system's emergency
mode gets the same). QEMU runs with -no-reboot, so the guest's reboot ends it.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from .machine import ARTIFACTS, VM, VMConfig, retry, subtest

MESSAGE = "Mailstead: this boot cannot go on (emergency mode). Rebooting in 30 s"


def test_an_initrd_stuck_in_emergency_mode_reboots_by_itself(image: Path, tmp_path: Path, report: dict) -> None:
    vm = VM(VMConfig(image=image, firmware="uefi", workdir=tmp_path / "emergency", disk_size=None, extra_args=[
        "-no-reboot",
        "-smbios", "type=11,value=io.systemd.stub.kernel-cmdline-extra=rd.systemd.unit=emergency.target",
    ]))
    vm.start()
    try:
        with subtest("the initrd's emergency mode says so and reboots", report):
            vm.wait_for_console(re.escape(MESSAGE), timeout=600)
            said = time.monotonic()
            report["emergency_seconds_to_message"] = round(vm.boot_seconds(), 1)
            retry(lambda: not vm.running(), 120, "QEMU to end at the guest's reboot (-no-reboot)", interval=0.5)
            waited = time.monotonic() - said
            report["emergency_seconds_message_to_reboot"] = round(waited, 1)
            assert "reboot: Restarting system" in vm.console(), vm.console()[-3000:]
            assert 25 <= waited <= 90, f"rebooted {waited:.0f} s after the message (30 s expected)"
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vm.serial_log, ARTIFACTS / "emergency-serial.log")
        raise
    finally:
        vm.stop()
