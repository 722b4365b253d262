#!/usr/bin/env python3
"""The appliance's figures (issue 7), printed as JSON.

    bench/appliance.py [--report artifacts/vm/report.json] [--image mkosi.output/mailstead.raw]
                       [--no-minimal-boot]

Reads the figures the VM tier measured in its runs (tests/vm: the journey in
test_journey.py: the journey, UEFI, and the restore on a fresh machine, BIOS), adds:

- the compressed image size: the raw image through `zstd -10 --sparse`, as
  scripts/build-image ships it (counted, not written);
- memory budgets (bench/memory_budget.py run in the guest): the journey's
  idle machine after the reboot, and the BIOS machine's right after it restored
  the journey's backup: per process, per unit or container, kernel;
- where the journey's reboot spent its time: `systemd-analyze critical-chain`
  of mailstead-web.service and the top of `systemd-analyze blame`;
- a minimal boot in this run for the ratio: the same kernel and initrd booted
  directly with the portal, nginx and docker masked (bench/boot.py's "minimal
  image"), to the serial login prompt. boot_to_portal_vs_minimal is the
  journey's boot-to-portal over it.

Targets (issue 7): idle memory after setup <= 600 MB; compressed image <= 600 MB;
deploy to healthy <= 120 s under TCG. `targets` says which are met.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = {"memory_idle_after_setup_mb": 600, "compressed_image_mb": 600, "deploy_to_healthy_seconds": 120}


def compressed_mb(image: Path) -> float:
    zstd = subprocess.Popen(["zstd", "-q", "-T0", "-10", "-c", str(image.resolve())], stdout=subprocess.PIPE)
    total = 0
    assert zstd.stdout is not None
    while chunk := zstd.stdout.read(1 << 20):
        total += len(chunk)
    if zstd.wait() != 0:
        raise SystemExit(f"zstd failed on {image}")
    return round(total / 2**20, 1)


def minimal_boot_seconds(image: Path, accel: str) -> float | None:
    from boot import MASK, boot
    from mailstead_vm import VMConfig, root_partuuid

    out = image.resolve().parent
    version = image.resolve().name.removeprefix("mailstead_").removesuffix(".raw")
    kernel, initrd = out / f"mailstead_{version}.vmlinuz", out / f"mailstead_{version}.initrd"
    if not kernel.exists() or not initrd.exists():
        return None
    cmdline = (f"root=PARTUUID={root_partuuid(image.resolve())} rw console=tty0 console=ttyS0,115200 quiet "
               f"systemd.show_status=error audit=0 {MASK}")
    seconds, _ = boot(VMConfig(image=image.resolve(), accel=accel, firmware="bios", kernel=kernel, initrd=initrd,
                               append=cmdline), "login")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, default=ROOT / "artifacts" / "vm" / "report.json")
    ap.add_argument("--image", type=Path, default=ROOT / "mkosi.output" / "mailstead.raw")
    ap.add_argument("--no-minimal-boot", action="store_true", help="skip the minimal boot (no ratio)")
    args = ap.parse_args()
    if not args.report.exists():
        raise SystemExit(f"{args.report} is missing: run `scripts/test vm` first (it writes the VM figures)")
    vm = json.loads(args.report.read_text())
    accel = vm.get("journey_accel") or "tcg"
    figures: dict[str, object] = {
        "accel": accel,
        "boot_to_portal_seconds": vm.get("journey_seconds_to_portal"),
        "boot_to_portal_seconds_bios": vm.get("restore_seconds_to_portal"),
        "deploy_to_healthy_seconds": vm.get("journey_seconds_deploy_to_healthy"),
        "memory_idle_after_setup_mb": vm.get("journey_memory_idle_mb"),
        "memory_idle_budget": vm.get("journey_memory_budget"),
        "memory_after_restore_budget_bios": vm.get("restore_stack_memory_budget"),
        "boot_critical_chain_to_portal": vm.get("journey_boot_critical_chain"),
        "boot_blame_top": vm.get("journey_boot_blame"),
        "messages_per_second_host_mta_to_mailbox": vm.get("journey_messages_per_second"),
        "power_loss_to_portal_seconds": vm.get("journey_seconds_power_loss_to_portal"),
        "backup_sftp_seconds": vm.get("journey_seconds_backup_sftp"),
        "restore_to_healthy_seconds": vm.get("restore_seconds_restore_to_healthy"),
        "certificate_seconds": vm.get("journey_seconds_certificate"),
        # Image updates (issue 16): "Install now" to the reboot into the new version, to the
        # new version healthy (v2, which passes), and to the old version healthy again after
        # the new one failed its checks (v3); what an update downloads.
        "update_install_to_reboot_seconds": vm.get("update_v2_seconds_install_to_reboot"),
        "update_install_to_healthy_seconds": vm.get("update_v2_seconds_install_to_healthy"),
        "update_failed_install_to_reboot_seconds": vm.get("update_seconds_install_to_reboot"),
        "update_failed_to_healthy_seconds": vm.get("update_seconds_failed_to_healthy"),
        "update_bytes_on_the_wire": vm.get("update_bytes_on_the_wire"),
    }
    if args.image.exists():
        figures["compressed_image_mb"] = compressed_mb(args.image)
    if not args.no_minimal_boot and args.image.exists():
        minimal = minimal_boot_seconds(args.image, accel)
        figures["minimal_boot_to_login_seconds"] = minimal
        portal = figures["boot_to_portal_seconds"]
        if minimal and isinstance(portal, (int, float)):
            figures["boot_to_portal_vs_minimal"] = round(portal / minimal, 2)
    figures["targets"] = {name: {"target": limit, "value": figures.get(name),
                                 "met": isinstance(figures.get(name), (int, float)) and figures[name] <= limit}
                          for name, limit in TARGETS.items()}
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
