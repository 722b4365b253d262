"""A real authoritative DNS server (knot) on loopback, for the tests.

The tests start it with the records they need; every resolver in the tests
is pointed at it explicitly (dnspython `Resolver(configure=False)`).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

from tests.conftest import free_port, stop_process


@dataclass
class Record:
    name: str        # relative to the zone, or "@"
    rtype: str
    rdata: str
    ttl: int = 300


def txt_rdata(value: str) -> str:
    """A TXT value as zone-file text: split into quoted strings of at most 255 bytes."""
    raw = value.encode()
    chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class Knot:
    def __init__(self, workdir: Path, zone: str, records: list[Record],
                 address: str = "127.0.0.1", port: int | None = None) -> None:
        self.workdir, self.zone, self.records = workdir, zone, records
        self.address, self.port = address, port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def zone_text(self) -> str:
        lines = [
            f"$ORIGIN {self.zone}.",
            "$TTL 300",
            f"@ SOA ns1.{self.zone}. hostmaster.{self.zone}. 1 3600 600 86400 300",
            f"@ NS ns1.{self.zone}.",
            "ns1 A 127.0.0.1",
        ]
        lines += [f"{r.name} {r.ttl} {r.rtype} {r.rdata}" for r in self.records]
        return "\n".join(lines) + "\n"

    def start(self) -> Knot:
        knotd = shutil.which("knotd") or "/usr/sbin/knotd"
        run = self.workdir / "run"
        run.mkdir(parents=True, exist_ok=True)
        (self.workdir / f"{self.zone}.zone").write_text(self.zone_text())
        conf = self.workdir / "knot.conf"
        conf.write_text(
            "server:\n"
            f"  rundir: {run}\n"
            f"  listen: {self.address}@{self.port}\n"
            "log:\n  - target: stderr\n    any: warning\n"
            f"database:\n  storage: {self.workdir}/db\n"
            f"template:\n  - id: default\n    storage: {self.workdir}\n    file: \"%s.zone\"\n"
            "    zonefile-sync: -1\n    journal-content: none\n"
            f"zone:\n  - domain: {self.zone}\n"
        )
        with open(self.workdir / "knotd.log", "wb") as log:
            self.proc = subprocess.Popen([knotd, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.query(self.zone, "SOA")
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("knotd did not start: "
                                         + (self.workdir / "knotd.log").read_text()[-2000:]) from None
                time.sleep(0.2)

    def query(self, name: str, rtype: str) -> dns.message.Message:
        q = dns.message.make_query(name, dns.rdatatype.from_text(rtype))
        return dns.query.udp(q, self.address, port=self.port, timeout=2)

    def txt(self, name: str) -> list[bytes]:
        """TXT values of `name`, each joined from its strings (what a DKIM verifier sees)."""
        answer = self.query(name, "TXT").answer
        return [b"".join(rr.strings) for rrset in answer for rr in rrset]

    def stop(self) -> None:
        stop_process(self.proc)
