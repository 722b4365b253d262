#!/usr/bin/env python3
"""Boot figures for the appliance image, printed as JSON.

    bench/boot.py [--image mkosi.output/mailstead.raw] [--accel tcg|kvm|auto]

- portal_seconds: qemu start until https://.../setup/token answers 200
  (UEFI, systemd-boot, the UKI: the way users boot it);
- direct_portal_seconds / minimal_login_seconds: the same kernel and initrd
  booted directly (no firmware or boot loader), once as built and once with
  the portal, nginx and docker masked on the kernel command line (the
  "minimal image": same config without the portal and docker), measured to
  the serial login prompt; their ratio is the portal's cost;
- memory_used_mb: `free` in the guest once the portal answers (needs the
  test profile's backdoor; null otherwise);
- image sizes from mkosi.output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from mailstead_vm import VM, VMConfig, free_port, kvm_usable, root_partuuid  # noqa: E402
from tests.vm.machine import Machine  # noqa: E402  (the test profile's backdoor shell)

MASK = " ".join(
    f"systemd.mask={u}"
    for u in (
        "docker.service", "docker.socket", "containerd.service", "nginx.service",
        "mailstead-web.service", "mailstead-web.socket", "mailstead-agent.service",
        "mailstead-agent.socket", "mailstead-firstboot.service",
    )
)  # fmt: skip


def boot(cfg: VMConfig, until: str, port: int | None = None) -> tuple[float, int | None]:
    vm = Machine(cfg) if cfg.backdoor else VM(cfg)
    vm.start()
    try:
        if until == "portal":
            vm.wait_for_portal(port, 900, interval=0.5)
        else:
            vm.wait_for_console(r"login: ", 900)
        seconds = round(vm.boot_seconds(), 1)
        memory = None
        if isinstance(vm, Machine):
            vm.wait_for_shell(120)
            memory = int(vm.succeed("free -m | awk '/^Mem:/ {print $3}'", timeout=60))
        return seconds, memory
    finally:
        vm.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=ROOT / "mkosi.output" / "mailstead.raw")
    ap.add_argument("--accel", choices=["auto", "tcg", "kvm"], default="auto")
    ap.add_argument("--backdoor", action="store_true", help="image has the test profile: also read memory")
    args = ap.parse_args()

    image = args.image.resolve()
    out = image.parent
    version = image.name.removeprefix("mailstead_").removesuffix(".raw")
    ok, why = kvm_usable()
    accels = ["kvm", "tcg"] if args.accel == "auto" and ok else [args.accel if args.accel != "auto" else "tcg"]
    figures: dict[str, object] = {"image": image.name, "kvm_usable": ok, "kvm_note": why}
    st = image.stat()
    figures["raw_apparent_mb"] = round(st.st_size / 2**20)
    figures["raw_allocated_mb"] = round(st.st_blocks * 512 / 2**20)
    for suffix in (".raw.zst", ".qcow2"):
        f = out / f"mailstead_{version}{suffix}"
        figures[f"{suffix.strip('.').replace('.', '_')}_mb"] = round(f.stat().st_size / 2**20) if f.exists() else None

    kernel, initrd = out / f"mailstead_{version}.vmlinuz", out / f"mailstead_{version}.initrd"
    cmdline = f"root=PARTUUID={root_partuuid(image)} rw console=tty0 console=ttyS0,115200 quiet systemd.show_status=error audit=0"
    for accel in accels:
        port = free_port()
        base = dict(image=image, accel=accel, forwards={port: 443})
        portal, memory = boot(VMConfig(**base, firmware="uefi", backdoor=args.backdoor), "portal", port)
        direct, _ = boot(VMConfig(**base, firmware="bios", kernel=kernel, initrd=initrd, append=cmdline), "portal", port)
        minimal, _ = boot(
            VMConfig(**base, firmware="bios", kernel=kernel, initrd=initrd, append=f"{cmdline} {MASK}"), "login"
        )
        figures[accel] = {
            "portal_seconds_uefi": portal,
            "direct_portal_seconds": direct,
            "minimal_login_seconds": minimal,
            "portal_vs_minimal_ratio": round(direct / minimal, 2),
            "memory_used_mb": memory,
        }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
