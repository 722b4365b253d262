"""A real authoritative DNS server (knot) on loopback, for the tests.

The tests start it with the records they need; every resolver in the tests
is pointed at it explicitly (dnspython `Resolver(configure=False)`).
"""

from __future__ import annotations

import shutil
import socket
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


@dataclass(frozen=True)
class KnotKey:
    """A TSIG key knot accepts RFC 2136 updates with (for every zone it serves)."""
    name: str
    secret: str      # base64
    algorithm: str = "hmac-sha256"


class Knot:
    """knotd serving `zone` (SOA, NS per `ns`, then `records`) on address@port.

    Options for the DNS tests: `key` allows signed updates from 127.0.0.0/8
    (changes kept in the journal); `extra_zones` {zone: full zone text} serves
    more zones (e.g. a reverse zone); `dnssec` signs the zones with knot's
    default policy; `soa_minimum` is the negative-caching TTL."""

    def __init__(self, workdir: Path, zone: str, records: list[Record],
                 address: str = "127.0.0.1", port: int | None = None, *,
                 ns: list[tuple[str, str]] | None = None, key: KnotKey | None = None,
                 extra_zones: dict[str, str] | None = None, dnssec: bool = False,
                 soa_minimum: int = 300, extra_text: str = "") -> None:
        self.workdir, self.zone, self.records = workdir, zone, records
        self.address, self.port = address, port or free_port()
        self.ns = ns if ns is not None else [("ns1", "127.0.0.1")]
        self.key, self.extra_zones, self.dnssec = key, dict(extra_zones or {}), dnssec
        self.soa_minimum = soa_minimum
        self.extra_text = extra_text  # appended to the zone file (e.g. an exported fragment)
        self.proc: subprocess.Popen[bytes] | None = None

    def zone_text(self) -> str:
        lines = [
            f"$ORIGIN {self.zone}.",
            "$TTL 300",
            f"@ SOA {self.ns[0][0] if self.ns else 'ns1'}.{self.zone}. hostmaster.{self.zone}. "
            f"1 3600 600 86400 {self.soa_minimum}",
        ]
        lines += [f"@ NS {name}.{self.zone}." for name, _ in self.ns]
        lines += [f"{name} {'AAAA' if ':' in ip else 'A'} {ip}" for name, ip in self.ns]
        lines += [f"{r.name} {r.ttl} {r.rtype} {r.rdata}" for r in self.records]
        return "\n".join(lines) + "\n" + self.extra_text

    def _conf(self, run: Path) -> str:
        updates = self.key is not None
        text = (
            "server:\n"
            f"  rundir: {run}\n"
            f"  listen: {self.address}@{self.port}\n"
            "log:\n  - target: stderr\n    any: warning\n"
            f"database:\n  storage: {self.workdir}/db\n"
        )
        if self.key:
            text += (f"key:\n  - id: {self.key.name}\n    algorithm: {self.key.algorithm}\n"
                     f"    secret: {self.key.secret}\n"
                     f"acl:\n  - id: update\n    address: 127.0.0.0/8\n    key: {self.key.name}\n"
                     "    action: update\n")
        text += (f"template:\n  - id: default\n    storage: {self.workdir}\n    file: \"%s.zone\"\n"
                 "    zonefile-sync: -1\n"
                 f"    journal-content: {'changes' if updates else 'none'}\n")
        if updates:
            text += "    acl: update\n"
        if self.dnssec:
            text += "    dnssec-signing: on\n"
        text += "zone:\n" + "".join(f"  - domain: {z}\n" for z in [self.zone, *self.extra_zones])
        return text

    def start(self) -> Knot:
        self._port_is_free()
        knotd = shutil.which("knotd") or "/usr/sbin/knotd"
        run = self.workdir / "run"
        run.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)  # journal, timers, DNSSEC keys
        (self.workdir / f"{self.zone}.zone").write_text(self.zone_text())
        for zone, text in self.extra_zones.items():
            (self.workdir / f"{zone}.zone").write_text(text)
        conf = self.workdir / "knot.conf"
        conf.write_text(self._conf(run))
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

    def _port_is_free(self) -> None:
        """Refuse to start when something already answers on our address and port:
        the tests would then talk to that server (say, another test session's knot
        on the docker bridge) and fail later in puzzling ways."""
        probe = socket.socket(socket.AF_INET6 if ":" in self.address else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((self.address, self.port))
        except OSError as err:
            raise AssertionError(f"cannot start knot on {self.address} port {self.port}: {err.strerror}; "
                                 "another DNS server (another test session's knot?) is listening there") from None
        finally:
            probe.close()

    def query(self, name: str, rtype: str) -> dns.message.Message:
        q = dns.message.make_query(name, dns.rdatatype.from_text(rtype), use_edns=0, payload=4096)
        return dns.query.udp_with_fallback(q, self.address, port=self.port, timeout=2)[0]

    def serial(self, zone: str | None = None) -> int:
        answer = self.query(zone or self.zone, "SOA").answer
        return int(answer[0][0].serial)

    def txt(self, name: str) -> list[bytes]:
        """TXT values of `name`, each joined from its strings (what a DKIM verifier sees)."""
        answer = self.query(name, "TXT").answer
        return [b"".join(rr.strings) for rrset in answer for rr in rrset]

    def stop(self) -> None:
        stop_process(self.proc)
