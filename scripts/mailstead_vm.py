"""Boot a Mailstead disk image in QEMU: shared by scripts/boot and tests/vm.

QEMU comes from mkosi's tools tree (``mkosi sandbox -- qemu-system-x86_64``):
it is far newer and faster under TCG than Debian 12's QEMU 7.2, and brings
OVMF and SeaBIOS with it. KVM is used only when it really works: on this
kind of machine /dev/kvm is a software PVM without the ``vmx``/``svm`` CPU
flag, on which guests die with "KVM internal error ... emulation failure",
so that case falls back to TCG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import struct
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MAILSTEAD_CACHE", "/var/cache/mailstead"))
MKOSI = CACHE / "bin" / "mkosi"
BACKDOOR_PORT = "org.mailstead.backdoor"
KVM_FAILURE = re.compile(r"KVM internal error|emulation failure|failed to initialize kvm", re.I)
# Guest kernel failures: oopses seen under TCG with -smp 2 (issue 2), and a
# disk that stopped answering (hung tasks) once under TCG. Reported, then the
# boot is retried once.
OOPS = re.compile(r"Kernel panic|BUG: |Oops: |general protection fault|blocked for more than \d+ seconds")

T = TypeVar("T")


class VMError(RuntimeError):
    pass


def retry(fn: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    """Call fn until it returns a truthy value or raises nothing; report the last thing seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except VMError:
            raise  # the guest is dead: waiting longer cannot help
        except Exception as exc:  # noqa: BLE001 - we report it below
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last saw: {last!r}")
        time.sleep(interval)


def kvm_usable() -> tuple[bool, str]:
    """KVM only with hardware virtualisation: a PVM /dev/kvm without vmx/svm kills guests."""
    if os.environ.get("MAILSTEAD_ACCEL") == "tcg":
        return False, "MAILSTEAD_ACCEL=tcg"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    flags = Path("/proc/cpuinfo").read_text()
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
        return False, "/dev/kvm is present but the CPU has no vmx/svm flag (software PVM): guests die there"
    return True, "hardware virtualisation available"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VMConfig:
    image: Path
    firmware: str = "uefi"  # or "bios"
    memory_mb: int = 2048
    cpus: int = 2
    disk_size: str | None = "16G"  # grow the disk before boot (an overlay: the image is untouched)
    forwards: dict[int, int] = field(default_factory=dict)  # host port -> guest port (tcp)
    # "unsafe" is fastest; "writeback" keeps every write the guest saw flushed when qemu is
    # killed (a power loss test: qcow2's metadata cache would otherwise die with qemu).
    cache: str = "unsafe"
    backdoor: bool = False  # needs the image's `test` profile
    workdir: Path | None = None
    accel: str | None = None  # None: auto (kvm if usable, else tcg)
    # Direct kernel boot (skips firmware and boot loader): kernel, initrd, command line.
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    extra_args: list[str] = field(default_factory=list)  # more qemu arguments, e.g. -smbios ones


class VM:
    """One QEMU process running a Mailstead image."""

    def __init__(self, cfg: VMConfig):
        self.cfg = cfg
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="mailstead-vm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.backdoor_path = self.workdir / "backdoor.sock"
        self.qmp_path = self.workdir / "qmp.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.accel = cfg.accel
        self.started_at = 0.0

    # -- command line -------------------------------------------------------
    def _disk(self, fresh: bool = True) -> Path:
        disk = self.workdir / "disk.qcow2"
        if not fresh and disk.exists():
            return disk  # boot again from what the last run left on the disk
        disk.unlink(missing_ok=True)
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.cfg.image.resolve()), str(disk)]
        if self.cfg.disk_size:
            cmd.append(self.cfg.disk_size)
        subprocess.run(cmd, check=True)
        return disk

    def _firmware_args(self) -> list[str]:
        if self.cfg.firmware == "bios":
            return []
        if self.cfg.firmware != "uefi":
            raise VMError(f"firmware must be 'uefi' or 'bios', not {self.cfg.firmware!r}")
        tools_path("usr/share/OVMF/OVMF_CODE_4M.fd")  # QEMU runs in the tools tree: /usr is the tools' /usr
        vars_src = tools_path("usr/share/OVMF/OVMF_VARS_4M.fd")
        vars_copy = self.workdir / "OVMF_VARS.fd"
        shutil.copyfile(vars_src, vars_copy)
        return [
            "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]  # fmt: skip

    def command(self, fresh_disk: bool = True) -> list[str]:
        accel = self.accel or ("kvm" if kvm_usable()[0] else "tcg")
        self.accel = accel
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in self.cfg.forwards.items())
        cmd = [
            str(MKOSI), "-C", str(ROOT), "sandbox",
            "qemu-system-x86_64",
            "-machine", "q35,smm=off" if self.cfg.firmware == "uefi" else "q35",
            "-accel", accel if accel == "kvm" else "tcg,thread=multi,tb-size=512",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(self.cfg.cpus),
            "-m", str(self.cfg.memory_mb),
            "-nodefaults", "-display", "none", "-device", "VGA",  # the screen: screenshots show tty1
            "-device", "virtio-rng-pci",
            "-chardev", f"file,id=serial0,path={self.serial_log}",
            "-serial", "chardev:serial0",
            "-nic", f"user,id=net0,model=virtio-net-pci{fwd}",  # id: QMP set_link can cut the cable
            "-drive", f"if=virtio,format=qcow2,cache={self.cfg.cache},discard=unmap,file={self._disk(fresh_disk)}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *self._firmware_args(),
        ]  # fmt: skip
        if self.cfg.kernel:
            cmd += ["-kernel", str(self.cfg.kernel), "-initrd", str(self.cfg.initrd), "-append", self.cfg.append]
        cmd += self.cfg.extra_args
        if self.cfg.backdoor:
            cmd += [
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=backdoor,path={self.backdoor_path},server=on,wait=off",
                "-device", f"virtserialport,chardev=backdoor,name={BACKDOOR_PORT}",
            ]  # fmt: skip
        return cmd

    # -- lifecycle -----------------------------------------------------------
    def start(self, fresh_disk: bool = True) -> None:
        """Start qemu; `fresh_disk=False` boots the disk the last run left (after a reboot or power loss)."""
        if not MKOSI.exists():
            raise VMError(f"{MKOSI} is missing: run scripts/build-image first (it unpacks mkosi)")
        self.serial_log.write_bytes(b"")
        cmd = self.command(fresh_disk)
        self.started_at = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def power_loss(self) -> None:
        """Pull the plug: SIGKILL qemu, no shutdown, no flush beyond what the guest already saw done."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def boot_seconds(self) -> float:
        """Seconds since qemu was started."""
        return time.monotonic() - self.started_at

    def console(self) -> str:
        return self.serial_log.read_text(errors="replace")

    def qemu_output(self) -> str:
        return self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""

    def check_alive(self) -> None:
        """Raise with QEMU's own words when the guest died (or KVM failed, or the kernel oopsed)."""
        if not self.running():
            raise VMError(f"qemu exited ({self.proc.returncode if self.proc else '?'}): {self.qemu_output()[-2000:]}")
        if KVM_FAILURE.search(self.qemu_output()):
            raise VMError(f"KVM failed: {self.qemu_output()[-1000:]}")
        if m := OOPS.search(self.console()):
            tail = self.console()[m.start() : m.start() + 1500]
            raise VMError(f"guest kernel failure on the serial console: {tail}")

    def wait_for_console(self, pattern: str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern, re.M)

        def seen() -> re.Match[str] | None:
            self.check_alive()
            return rx.search(self.console())

        try:
            return retry(seen, timeout, f"/{pattern}/ on the serial console", interval=0.5)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- serial console (tail) ---\n{self.console()[-3000:]}") from None

    def wait_for_portal(self, port: int, timeout: float, interval: float = 1.0) -> None:
        """Until the portal forwarded to host `port` answers over https (or the guest dies)."""

        def answers() -> bool:
            self.check_alive()
            return portal_answers(port)

        retry(answers, timeout, "the portal over https", interval=interval)

    def qmp(self, command: str, **arguments: object) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.qmp_path))
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            for msg in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(msg) + "\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "event" not in reply:
                        break
            if "error" in reply:
                raise VMError(f"QMP {command}: {reply['error']}")
            return reply.get("return", {})


def portal_answers(port: int, timeout: float = 10) -> bool:
    """The forwarded portal's token page answers 200 over https.

    The certificate is self-signed: the owner checks it by fingerprint, tests
    compare the fingerprint separately. No proxy from the environment is used.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    with opener.open(f"https://127.0.0.1:{port}/setup/token", timeout=timeout) as r:
        return r.status == 200


def root_partuuid(image: Path) -> str:
    """The PARTUUID of the image's root partition (for direct kernel boot's root=), read from the GPT."""
    root_type = uuid.UUID("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709")  # root-x86-64
    with open(image, "rb") as f:
        f.seek(512)
        header = f.read(92)
        if header[:8] != b"EFI PART":
            raise VMError(f"{image} has no GPT")
        first_lba, count, size = struct.unpack_from("<QII", header, 72)
        f.seek(first_lba * 512)
        table = f.read(count * size)
    for i in range(count):
        entry = table[i * size : (i + 1) * size]
        if uuid.UUID(bytes_le=entry[:16]) == root_type:
            return str(uuid.UUID(bytes_le=entry[16:32]))
    raise VMError(f"{image} has no x86-64 root partition")


def tools_path(rel: str) -> Path:
    """A file inside mkosi's tools tree (the host path)."""
    p = ROOT / "mkosi.output" / "tools" / rel
    if not p.exists():
        raise VMError(f"{p} is missing: build the image first (scripts/build-image builds the tools tree)")
    return p


PORTAL_RX = r"Mailstead setup portal: (https://\S+)"
TOKEN_RX = r"Setup token: ([A-Za-z0-9_-]{22,})"
FPR_RX = r"Certificate SHA-256 fingerprint: ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})"
