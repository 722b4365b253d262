"""Installing a version from the feed: run as root by mailstead-update.service,
never inside the agent (it writes a partition and the ESP, which the agent's
sandbox does not allow).

    mailstead-update install [--version V] [--reboot]
    mailstead-update rollback [--reboot]   (the owner's "go back to the previous version")
    mailstead-update boot       (mailstead-update-boot.service, before the agent)
    mailstead-update verify     (mailstead-update-verify.service, before boot-complete.target)
    mailstead-update deadline   (mailstead-update-deadline.timer)

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

The reboot is the caller's (`--reboot`: now, as the maintenance window's run
and "Install now" ask). Every step says what it does on stdout, for the journal.

After the reboot:

- `boot` runs before the agent starts: on a trial boot it only says so; when
  the old version is back (the new one failed, and the boot loader came back by
  itself) it puts the agent's state from before the update back (state.py).
- `verify` runs once the agent, docker and the portal are up, and orders
  boot-complete.target after itself. On a trial boot it asks the agent to bring
  the stack to this version's images and to check it (update_trial: every
  service healthy, port 25 accepting mail), and checks the portal itself. Passed:
  the update is recorded as installed, systemd-bless-boot marks the boot good
  when boot-complete.target is reached (UEFI), and GRUB's default becomes this
  version (BIOS). Failed: recorded, the boot is marked bad (UEFI; on BIOS the
  one-shot entry is already spent), and it reboots into the old version.
  Back on the old version, it has the agent bring the stack up again and send
  the owner one alert mail.
- `deadline` (mailstead-update-deadline.timer, 50 minutes after boot): a new
  version still on trial by then fails as above (it hung somewhere).
"""

from __future__ import annotations

import argparse
import http.client
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from portal.core import safefs
from portal.core.layout import state_dir_from_env
from portal.core.store import read_settings
from portal.update import feed as feed_mod
from portal.update import gpt, grub, state, transfers

SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
BLESS_BOOT = "/usr/lib/systemd/systemd-bless-boot"
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
    portal: tuple[str, int] = ("127.0.0.1", 443)
    portal_wait: float = 180
    reboot: bool = True           # a failed trial reboots into the old version

    def running_version(self) -> str:
        for line in self.os_release.read_text().splitlines():
            if line.startswith("IMAGE_VERSION="):
                return feed_mod.check_version(line.split("=", 1)[1].strip().strip('"'), "the running version")
        raise InstallError(f"{self.os_release} names no IMAGE_VERSION: this is not a Mailstead image")

    def firmware(self) -> str:
        return "uefi" if self.efi_firmware.is_dir() else "bios"

    def feed_url(self) -> str:
        """The owner's setting update_feed_url, else the address the image was built with."""
        return read_settings(self.state_dir).get("update_feed_url", "").strip() or state.default_feed_url()


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


def set_up_grub(env: Env, running: str, new: str) -> None:
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
    # The default stays the running version (a factory image has none yet) until
    # the new one passed its checks.
    grub_env(env, f"saved_entry={grub.entry_id(running)}", f"next_entry={grub.entry_id(new)}")


def grub_env(env: Env, *assignments: str) -> None:
    subprocess.run(["grub-editenv", str(env.esp / "grub" / "grubenv"), "set", *assignments], check=True,
                   capture_output=True, timeout=60)


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
    # A kernel image of `new` left by an earlier try (failed, or taken back: its boot
    # counter says "bad") goes, so that sysupdate installs the version afresh.
    earlier = installed_kernels(env.esp).get(new)
    if earlier is not None:
        safefs.remove(earlier)
    say(f"keeping a copy of the agent's state (for a rollback to {running})")
    state.begin(env.state_dir, env.update_dir, running, new, firmware)
    try:
        write_definitions(env, url)
        say(f"downloading and writing {new} (systemd-sysupdate)")
        sysupdate(env, "update", new)
        say("carrying this machine's identity into the new system slot")
        carry_identity(env, new)
        drop_factory_entry(env)
        if firmware == "bios":
            say("setting up GRUB to boot the new version once")
            set_up_grub(env, running, new)
    except BaseException as exc:
        why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        # A half-installed version must never boot: without its kernel image it cannot.
        kernel = installed_kernels(env.esp).get(new)
        if kernel is not None:
            safefs.remove(kernel)
        state.abort(env.update_dir, f"installing {new} failed: {why}"[:1500])
        raise
    say(f"{new} is installed; it runs after the next reboot")
    return {"installed": new, "message": f"{new} is installed; it runs after the next reboot"}


def rollback(env: Env) -> str:
    """Boot the version the running one was installed over, once more as the default;
    the next boot puts back the state from before that update (state.on_boot)."""
    running = env.running_version()
    target = state.rollback_target(env.update_dir, running)
    if not target:
        raise InstallError("there is no previous version to go back to (none was updated from, or its copy "
                           "of the settings is gone)", "no_previous")
    kernels = installed_kernels(env.esp)
    if target not in kernels:
        raise InstallError(f"the kernel of {target} is no longer on the ESP: it cannot be booted", "no_previous")
    slot_device(env, target)
    firmware = env.firmware()
    state.begin_rollback(env.update_dir, running, target, firmware)
    if firmware == "uefi":
        # systemd-boot sorts an image with no tries left after every other one.
        current = kernels.get(running)
        if current is not None:
            safefs.rename(current, current.with_name(f"mailstead_{running}+0-1.efi"))
    else:
        grub_env(env, f"saved_entry={grub.entry_id(target)}")
    say(f"{target} boots next, with the settings from before the update to {running}")
    return target


# -- after the reboot ---------------------------------------------------------------

def boot(env: Env) -> str:
    """Before the agent starts: what this boot is for a pending update (state.on_boot)."""
    running = env.running_version()
    outcome = state.on_boot(env.state_dir, env.update_dir, running)
    said = {"none": f"{running}: no update under way",
            "trial": f"{running} is new: on trial until its health checks pass",
            "rolled_back": f"back on {running} after a failed update: the agent's state from before it is "
                           "back in place",
            "abandoned": f"running {running}, neither version of the pending update: it is dropped"}
    say(said[outcome])
    return outcome


def portal_answers(env: Env, wait: float) -> str | None:
    """None when the portal answers its /healthz through nginx, else why not after `wait` s."""
    host, port = env.portal
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # this machine's own front, by address: its name is not known here
    deadline = time.monotonic() + wait
    while True:
        try:
            conn = http.client.HTTPSConnection(host, port, timeout=15, context=context)
            try:
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
            finally:
                conn.close()
            if status == 200:
                return None
            why = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as err:
            why = f"{type(err).__name__}: {err}"[:160]
        if time.monotonic() >= deadline:
            return f"the portal (https://{host}:{port}/healthz) does not answer: {why}"
        time.sleep(3)


def call_agent(name: str, **args: object) -> dict[str, object]:
    """An operation of portal/update/privileged.py, over the agent's socket."""
    from portal.agent.client import AgentError
    from portal.agent.registry import load_all

    op = load_all()[name]
    try:
        return op(**args)
    except AgentError as err:
        return {"ok": False, "problems": [f"the agent: {err.message}"], "error": err.message}


def verify(env: Env) -> int:
    """After the agent, docker and the portal started (see the module's text); 0 when
    this boot may count as good."""
    running = env.running_version()
    doc = state.read_record(env.update_dir)
    pending = doc["pending"]
    if pending and pending.get("to") == running and pending.get("by") != "owner":
        return trial(env, running, pending)
    last = doc["history"][-1] if doc["history"] else {}
    if last.get("outcome") == "rolled_back" and not last.get("alerted"):
        chosen = last.get("by") == "owner"  # the owner went back: nothing to tell them
        say(f"bringing the mail stack back on {running}" + ("" if chosen else " and telling the owner"))
        try:
            done = call_agent("update_recover", message=str(last.get("message", "")), alert=not chosen)
            say(f"stack: {done.get('stack', done.get('error'))}; alert: {done.get('alerts')}")
            state.mark_alerted(env.update_dir, str(done.get("alerts", done.get("error", ""))))
        except Exception as err:  # noqa: BLE001 - this boot is the good version's: never fail it
            say(f"recovering after the rollback failed: {type(err).__name__}: {err}")
    return 0


def trial(env: Env, running: str, pending: dict[str, object]) -> int:
    say(f"checking {running} (updated from {pending.get('from')}): stack, port 25, agent, portal")
    done = call_agent("update_trial")
    problems = [str(p) for p in done.get("problems", [])]  # type: ignore[union-attr]
    why = portal_answers(env, env.portal_wait)
    if why:
        problems.append(why)
    if not problems:
        message = f"{running} passed its health checks ({done.get('stack')})"
        state.finish(env.update_dir, running, True, message)
        if pending.get("firmware") == "bios":
            grub_env(env, f"saved_entry={grub.entry_id(running)}")
        say(message)
        return 0
    fail_trial(env, running, pending, f"{running} failed its health checks: " + "; ".join(problems))
    return 1


def fail_trial(env: Env, running: str, pending: dict[str, object], message: str) -> None:
    """Record the failure, make sure the boot loader goes back, and reboot."""
    state.finish(env.update_dir, running, False, message[:1500])
    say(message)
    if pending.get("firmware") == "uefi":
        # Its boot counter may have tries left: none, so the boot loader goes back.
        try:
            subprocess.run([BLESS_BOOT, "bad"], capture_output=True, timeout=60, check=False)
        except OSError as err:
            say(f"systemd-bless-boot bad: {err}")
    say(f"rebooting into {pending.get('from')}")
    if env.reboot:
        reboot()


def deadline(env: Env) -> int:
    """mailstead-update-deadline.timer: a new version still on trial (not judged) by now
    counts as failed."""
    running = env.running_version()
    pending = state.read_record(env.update_dir)["pending"]
    if not pending or pending.get("to") != running or pending.get("by") == "owner":
        return 0
    fail_trial(env, running, pending, f"{running} was not judged healthy within its time limit")
    return 1


def reboot() -> None:
    subprocess.run(["systemctl", "reboot", "--no-block"], check=True, capture_output=True, timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailstead-update")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install the newest version from the feed")
    p.add_argument("--version", default=None)
    p.add_argument("--reboot", action="store_true", help="reboot into it once installed")
    p = sub.add_parser("rollback", help="go back to the version that ran before the last update")
    p.add_argument("--reboot", action="store_true", help="reboot into it")
    sub.add_parser("boot", help="on every boot, before the agent: put the state back after a failed update")
    sub.add_parser("verify", help="on every boot: judge a new version, or recover from a failed one")
    sub.add_parser("deadline", help="a new version still on trial at its time limit goes back")
    args = parser.parse_args(argv)
    env = Env()
    try:
        if args.command == "install":
            if install(env, args.version)["installed"] and args.reboot:
                say("rebooting")
                reboot()
        elif args.command == "rollback":
            rollback(env)
            if args.reboot:
                say("rebooting")
                reboot()
        elif args.command == "boot":
            boot(env)
        elif args.command == "verify":
            return verify(env)
        elif args.command == "deadline":
            return deadline(env)
    except feed_mod.FeedError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except state.UpdateStateError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
