"""A booted Mailstead image, driven like the NixOS test driver.

``machine.succeed(cmd)`` runs a shell command as root in the guest over the
test profile's backdoor (a root shell on a virtio serial port; see
mkosi.profiles/test) and returns its output; ``fail`` expects a non-zero
status; ``wait_for_unit``, ``wait_for_open_port`` and ``wait_until_succeeds``
are built on the one ``retry`` that reports what it last saw.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from mailstead_vm import (  # noqa: E402
    FPR_RX,
    PORTAL_RX,
    TOKEN_RX,
    VM,
    VMConfig,
    VMError,
    free_port,
    retry,
)

__all__ = ["Machine", "VM", "VMConfig", "VMError", "boot", "free_port", "retry", "subtest", "PORTAL_RX", "TOKEN_RX",
           "FPR_RX"]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "vm"
BOOT_TIMEOUT = 900  # TCG on 2 cores: 90-300 s is normal


@contextmanager
def subtest(name: str, report: dict | None = None) -> Iterator[None]:
    """A named, timed phase of a VM test (the NixOS test driver's `subtest`): the log says
    when it starts and ends, a failure names it, and its duration goes to report["phases"]."""
    started = time.monotonic()
    print(f"== subtest: {name}", flush=True)
    try:
        yield
    except BaseException as exc:
        seconds = time.monotonic() - started
        print(f"== subtest failed after {seconds:.1f} s: {name}", flush=True)
        if isinstance(exc, AssertionError):
            exc.args = (f"[{name}] {exc.args[0] if exc.args else ''}", *exc.args[1:])
        raise
    finally:
        seconds = round(time.monotonic() - started, 1)
        if report is not None:
            report.setdefault("phases", {})[name] = seconds
    print(f"== subtest done in {seconds:.1f} s: {name}", flush=True)


class Machine(VM):
    def __init__(self, cfg: VMConfig):
        cfg.backdoor = True
        super().__init__(cfg)
        self._sock: socket.socket | None = None
        self._buf = b""

    # -- the backdoor shell ---------------------------------------------------
    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stop(self, timeout: float = 10) -> None:
        self._disconnect()
        super().stop(timeout)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(self.backdoor_path))
            self._sock = s
            self._buf = b""
        return self._sock

    def _read_until(self, marker: bytes, timeout: float) -> bytes:
        sock = self._connect()
        deadline = time.monotonic() + timeout
        while marker not in self._buf:
            self.check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the guest shell within {timeout:.0f}s")
            sock.settimeout(min(left, 2.0))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                self._disconnect()
                raise ConnectionError("guest shell closed the connection")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def boot_id(self) -> str:
        return self.succeed("cat /proc/sys/kernel/random/boot_id").strip()

    def reboot(self, timeout: float = 900) -> float:
        """A clean `systemctl reboot` (qemu keeps running); returns the seconds until the shell answers again."""
        before = self.boot_id()
        started = time.monotonic()
        self.succeed("systemd-run --on-active=1 --unit=mailstead-test-reboot systemctl reboot")
        self.wait_for_new_boot(before, timeout, "the guest to come back from the reboot")
        return time.monotonic() - started

    def wait_for_new_boot(self, before: str, timeout: float, what: str = "the guest to reboot by itself") -> float:
        """Wait until the guest's shell answers from a boot other than `before` (a boot ID);
        the seconds it took."""
        started = time.monotonic()

        def rebooted() -> bool:
            self.check_alive()
            try:
                return self.execute("cat /proc/sys/kernel/random/boot_id", timeout=10)[1].strip() not in ("", before)
            except (OSError, TimeoutError, ConnectionError):
                self._disconnect()
                return False

        retry(rebooted, timeout, what, interval=3)
        return time.monotonic() - started

    def wait_for_shell(self, timeout: float = 600) -> None:
        """Wait until the guest's backdoor shell answers (i.e. the guest reached multi-user)."""

        def ping() -> bool:
            self.check_alive()
            try:
                return self.execute("echo ready", timeout=10)[1].strip() == "ready"
            except (OSError, TimeoutError, ConnectionError):
                self._disconnect()
                return False

        retry(ping, timeout, "the guest's backdoor shell", interval=2)

    def execute(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run command in the guest; return (status, stdout+stderr)."""
        marker = f"__MAILSTEAD_{uuid.uuid4().hex}__"
        payload = base64.b64encode(command.encode()).decode()
        line = (
            f"__o=$(echo {payload} | base64 -d | bash 2>&1); __rc=$?; "
            f"printf '%s' \"$__o\" | base64 -w0; echo ' {marker}' $__rc\n"
        )
        sock = self._connect()
        sock.sendall(line.encode())
        raw = self._read_until(marker.encode(), timeout)
        rest = self._read_until(b"\n", 10)
        status = int(rest.strip())
        encoded = raw.decode(errors="replace").strip().split()[-1] if raw.strip() else ""
        return status, base64.b64decode(encoded).decode(errors="replace") if encoded else ""

    def succeed(self, command: str, timeout: float = 120) -> str:
        status, out = self.execute(command, timeout)
        if status != 0:
            raise AssertionError(f"command failed in the guest (status {status}): {command}\n{out}")
        return out

    def fail(self, command: str, timeout: float = 120) -> str:
        status, out = self.execute(command, timeout)
        if status == 0:
            raise AssertionError(f"command unexpectedly succeeded in the guest: {command}\n{out}")
        return out

    def wait_until_succeeds(self, command: str, timeout: float = 300) -> str:
        def attempt() -> tuple[str]:
            status, out = self.execute(command, timeout=min(60, timeout))
            if status != 0:
                raise AssertionError(f"status {status}: {out.strip()[-500:]}")
            return (out,)  # truthy even when the output is empty

        return retry(attempt, timeout, f"`{command}` to succeed", interval=2)[0]

    def wait_for_unit(self, unit: str, timeout: float = 300) -> None:
        def active() -> bool:
            state = self.execute(f"systemctl is-active {unit}", timeout=30)[1].strip()
            if state == "failed":
                status = self.execute(f"systemctl status --no-pager -l {unit}; journalctl -b -n 30 -u {unit}")[1]
                raise VMError(f"unit {unit} failed:\n{status}")
            if state != "active":
                raise AssertionError(f"{unit} is {state}")
            return True

        retry(active, timeout, f"unit {unit} to be active", interval=2)

    def wait_for_open_port(self, port: int, timeout: float = 300) -> None:
        self.wait_until_succeeds(f"ss -Htln 'sport = :{port}' | grep -q .", timeout)

    def memory_budget(self) -> dict:
        """bench/memory_budget.py run in the guest: used memory, per process and per unit or container."""
        script = (Path(__file__).resolve().parents[2] / "bench" / "memory_budget.py").read_bytes()
        payload = base64.b64encode(script).decode()
        return json.loads(self.succeed(f"echo {payload} | base64 -d | python3 - --top 25", timeout=120))

    def busy_percent(self, seconds: int = 20) -> float:
        """The guest's CPU time not idle over `seconds`, in percent of all its CPUs (/proc/stat)."""
        out = self.succeed(f"head -1 /proc/stat; sleep {seconds}; head -1 /proc/stat", timeout=seconds + 60)
        (a, b) = ([int(x) for x in line.split()[1:]] for line in out.splitlines()[:2])
        delta = [y - x for x, y in zip(a, b)]
        idle = delta[3] + delta[4]  # idle + iowait
        return round(100 * (1 - idle / sum(delta)), 1)

    def screenshot(self, path: Path) -> Path:
        """The VM's screen (tty1, with the console banner) as PNG, through QMP."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.qmp("screendump", filename=str(path), format="png")
        return path

    # -- what first boot printed ----------------------------------------------
    def first_boot_banner(self, timeout: float = 600) -> dict[str, str]:
        token = self.wait_for_console(TOKEN_RX, timeout).group(1)
        fpr = self.wait_for_console(FPR_RX, 30).group(1)
        urls = re.findall(PORTAL_RX, self.console())
        return {"token": token, "fingerprint": fpr, "urls": " ".join(urls)}


def boot(image: Path, name: str, report: dict, workdir: Path, forwards: dict[int, int],
         firmware: str = "uefi", cache: str = "unsafe") -> tuple[Machine, dict[str, str]]:
    """Boot a fresh copy of the image; read first boot's banner (token, fingerprint, URLs).

    On a guest kernel failure or a hang retry once, and report it; when KVM is there
    but guests die on it, the retry emulates (TCG)."""
    incidents = report.setdefault("incidents", [])
    accel = None  # auto: KVM when it works
    for attempt in (1, 2):
        m = Machine(VMConfig(image=image, firmware=firmware, forwards=forwards, accel=accel, cache=cache,
                             workdir=workdir / f"{name}-{attempt}"))
        m.start()
        try:
            banner = m.first_boot_banner(timeout=BOOT_TIMEOUT)
            report[f"{name}_seconds_to_banner"] = round(m.boot_seconds(), 1)
            report[f"{name}_accel"] = m.accel
            m.wait_for_shell(timeout=300)
            return m, banner
        except (VMError, TimeoutError) as exc:
            keep = ARTIFACTS / f"{name}-attempt{attempt}-serial.log"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(m.serial_log, keep)
            m.stop()
            incidents.append({"vm": name, "attempt": attempt, "error": str(exc)[:2000]})
            print(f"boot attempt {attempt} ({name}) failed, serial log in {keep}: {exc}")
            if "KVM" in str(exc):
                accel = "tcg"
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
