"""Installing a version from the feed: run as root by mailstead-update.service,
never inside the agent (it writes a partition and the ESP, which the agent's
sandbox does not allow).

    mailstead-update install [--version V]

1. read the feed (signature, hashes, notes: portal/update/feed.py) and pick
   the newest version, which must be newer than the running one;
2. copy the agent's state and record the update as pending (state.py);
3. write sysupdate's transfer files for the feed (transfers.py) into
   /run/mailstead/sysupdate.d and run `systemd-sysupdate update <version>`,
   which checks the signature and the hashes again while it downloads, and
   writes the inactive slot and the kernel (with its boot counter);
4. carry this machine's identity into the new slot (/etc/machine-id: the
   journal's folder, the DHCP client's identity and so the addresses stay);
5. on BIOS machines, put the new version's kernel and initrd on the ESP,
   write GRUB's menu and set its one-shot `next_entry` (grub.py).

The reboot is the caller's (now, or in the maintenance window). Every step
says what it does on stdout, for the job's progress and the journal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from portal.core import safefs
from portal.core.layout import state_dir_from_env
from portal.core.store import read_settings
from portal.update import feed as feed_mod
from portal.update import gpt, grub, state, transfers

SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
DEFINITIONS = Path("/run/mailstead/sysupdate.d")
ESP = Path("/efi")
# The ESP is FAT, mounted with umask=0077: a file's mode can only be this one
# (FAT keeps no modes; Linux refuses a chmod to anything else).
ESP_MODE = 0o700


class InstallError(feed_mod.FeedError):
    code = "install"


@dataclass
class Env:
    """The machine, injectable for tests."""

    state_dir: Path = field(default_factory=state_dir_from_env)
    update_dir: Path = state.DEFAULT_UPDATE_DIR
    os_release: Path = Path("/usr/lib/os-release")
    esp: Path = ESP
    definitions: Path = DEFINITIONS
    keyring: Path = feed_mod.KEYRING
    machine_id: Path = Path("/etc/machine-id")
    by_partuuid: Path = Path("/dev/disk/by-partuuid")
    disk: Path | None = None      # the disk of / (gpt.root_disk) unless given
    efi_firmware: Path = Path("/sys/firmware/efi")

    def running_version(self) -> str:
        for line in self.os_release.read_text().splitlines():
            if line.startswith("IMAGE_VERSION="):
                return feed_mod.check_version(line.split("=", 1)[1].strip().strip('"'), "the running version")
        raise InstallError(f"{self.os_release} names no IMAGE_VERSION: this is not a Mailstead image")

    def firmware(self) -> str:
        return "uefi" if self.efi_firmware.is_dir() else "bios"

    def feed_url(self) -> str:
        """The setting update_feed_url (a build-time default is still to come)."""
        return read_settings(self.state_dir).get("update_feed_url", "").strip()


def say(text: str) -> None:
    print(text, flush=True)


def write_definitions(env: Env, url: str) -> None:
    safefs.ensure_dir(env.definitions.parent, 0o755)
    if env.definitions.exists():
        safefs.remove_tree(env.definitions)
    safefs.new_dir(env.definitions, 0o755)
    for name, text in transfers.transfers(url).items():
        safefs.write_text(env.definitions / name, text, 0o644)


def sysupdate(env: Env, *args: str, timeout: float = 3600) -> str:
    cmd = [SYSUPDATE, f"--definitions={env.definitions}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise InstallError(f"systemd-sysupdate {' '.join(args)} failed: {' '.join(out.split())[-600:]}")
    return out


def slot_device(env: Env, version: str) -> Path:
    """The partition sysupdate labelled mailstead_<version>, from the disk's own table."""
    label = f"mailstead_{version}"
    disk = env.disk or gpt.root_disk()
    found = [p for p in gpt.read(disk) if p.type == gpt.ROOT_X86_64 and p.label == label]
    if len(found) != 1:
        raise InstallError(f"{disk} has {len(found)} system slots labelled {label} after sysupdate, not one")
    return env.by_partuuid / str(found[0].uuid)


def carry_identity(env: Env, version: str) -> None:
    """Write this machine's /etc/machine-id into the new slot."""
    device = slot_device(env, version)
    machine_id = env.machine_id.read_text().strip()
    # udev probes a relabelled partition; what it read before sysupdate finished
    # may sit in the partition's own page cache (sysupdate writes through the
    # disk): wait for udev, then drop that cache, so the mount reads what is on disk.
    subprocess.run(["udevadm", "settle", "--timeout=60"], capture_output=True, timeout=90, check=False)
    subprocess.run(["blockdev", "--flushbufs", str(device)], check=True, capture_output=True, timeout=120)
    with tempfile.TemporaryDirectory(prefix="mailstead-slot-") as mnt:
        subprocess.run(["mount", "-t", "ext4", "-o", "nodev,nosuid,noexec", str(device), mnt], check=True,
                       capture_output=True, timeout=120)
        try:
            safefs.write_text(Path(mnt) / "etc" / "machine-id", machine_id + "\n", 0o444)
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True, timeout=120)
    subprocess.run(["blockdev", "--flushbufs", str(device)], check=True, capture_output=True, timeout=120)


def drop_factory_entry(env: Env) -> None:
    """The image's own Type #1 boot entry (mkosi writes it for GRUB, systemd-boot lists
    it too) names the first slot by label: once that slot may hold another version,
    it must go. Each version's kernel image is its entry from now on."""
    for entry in (env.esp / "loader" / "entries").glob("mailstead-*.conf"):
        safefs.remove(entry)


def installed_kernels(esp: Path) -> dict[str, Path]:
    """{version: its kernel image on the ESP} (any boot counter in the name)."""
    out: dict[str, Path] = {}
    for path in sorted((esp / "EFI" / "Linux").glob("mailstead_*.efi")):
        version = path.name[len("mailstead_"):-len(".efi")].split("+", 1)[0]
        if feed_mod.VERSION_RE.match(version):
            out[version] = path
    return out


def set_up_grub(env: Env, new: str) -> None:
    """Kernel and initrd of every installed version on the ESP, GRUB's menu, and one
    boot of `new` (next_entry)."""
    boots = []
    for version, uki in installed_kernels(env.esp).items():
        boot = grub.read_uki(uki, version)
        folder = env.esp / "mailstead" / version
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in (("vmlinuz", boot.kernel), ("initrd", boot.initrd)):
            safefs.write_bytes(folder / name, data, ESP_MODE)
        boots.append(boot)
    if new not in {b.version for b in boots}:
        raise InstallError(f"no kernel image of {new} on the ESP after sysupdate")
    safefs.write_text(env.esp / "grub" / "grub.cfg", grub.menu(boots), ESP_MODE)
    subprocess.run(["grub-editenv", str(env.esp / "grub" / "grubenv"), "set",
                    f"next_entry={grub.entry_id(new)}"], check=True, capture_output=True, timeout=60)


def install(env: Env, version: str | None = None) -> dict[str, str]:
    running = env.running_version()
    url = env.feed_url()
    say(f"reading the feed {url or '(none set)'}")
    offer = feed_mod.check(url, running, keyring=env.keyring)
    new = version or offer["newest"]
    if not new or (version is None and not offer["available"]):
        say(offer["message"])
        return {"installed": "", "message": offer["message"]}
    new = feed_mod.check_version(new, "--version")
    if not feed_mod.newer(new, running):
        raise InstallError(f"{new} is not newer than the running {running}: not installed (no downgrades)",
                           "refused")
    firmware = env.firmware()
    say(f"keeping a copy of the agent's state (for a rollback to {running})")
    state.begin(env.state_dir, env.update_dir, running, new, firmware)
    write_definitions(env, url)
    say(f"downloading and writing {new} (systemd-sysupdate)")
    sysupdate(env, "update", new)
    say("carrying this machine's identity into the new system slot")
    carry_identity(env, new)
    drop_factory_entry(env)
    if firmware == "bios":
        say("setting up GRUB to boot the new version once")
        set_up_grub(env, new)
    say(f"{new} is installed; it runs after the next reboot")
    return {"installed": new, "message": f"{new} is installed; it runs after the next reboot"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailstead-update")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install the newest version from the feed")
    p.add_argument("--version", default=None)
    args = parser.parse_args(argv)
    env = Env()
    try:
        if args.command == "install":
            install(env, args.version)
    except feed_mod.FeedError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
