#!/usr/bin/env python3
"""DNS check figures, printed as JSON (progress on stderr).

    PYTHONPATH=. bench/dns_check.py [--runs 20]

Starts two knot servers (127.0.0.1 and 127.0.0.2, one free port) serving the
full expected record set of a sample appliance (portal.dns.records, exported
with zone_fragment), finds them through NS (authoritative_servers) and times
portal.dns.check.check of the full set against both: median and p95 of
--runs runs (target: <= 2 s). Every run must find every record ok.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from portal.dns.check import authoritative_servers, check  # noqa: E402
from portal.dns.records import records, zone_fragment, zone_records  # noqa: E402
from portal.dns.settings import DnsSettings  # noqa: E402
from portal.stack import dkim  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.integration.knot import Knot  # noqa: E402

ZONE = "example.test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dns-bench-") as tmp:
        root = Path(tmp)
        dkim.ensure_keys(root / "dkim", ("mailstead-rsa", "mailstead-ed25519"))
        s = DnsSettings(domain=ZONE, mail_host=f"mail.{ZONE}", public_ipv4="192.0.2.10",
                        public_ipv6="2001:db8::10", dkim_dir=root / "dkim",
                        caa_issuer="letsencrypt.org", acme_account_uri="https://ca.test/acct/1")
        rs = records(s)
        port = free_port()
        ns = [("ns1", "127.0.0.1"), ("ns2", "127.0.0.2")]
        knots = []
        try:
            for i, (_, ip) in enumerate(ns, 1):
                print(f"starting knot on {ip}:{port}", file=sys.stderr)
                knots.append(Knot(root / f"k{i}", ZONE, [], address=ip, port=port, ns=ns,
                                  extra_text=zone_fragment(rs, ZONE)).start())
            t0 = time.monotonic()
            servers = authoritative_servers(ZONE, [("127.0.0.1", port)], auth_port=port)
            discover = time.monotonic() - t0
            times = []
            for _ in range(args.runs):
                t0 = time.monotonic()
                results = check(rs, ZONE, servers)
                times.append(time.monotonic() - t0)
                bad = [r.as_dict() for r in results if r.verdict != "ok"]
                if bad:
                    raise SystemExit(f"not all ok: {bad[:3]}")
        finally:
            for k in knots:
                k.stop()
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    print(json.dumps({
        "servers": len(servers),
        "records": len(zone_records(rs, ZONE)),
        "rrsets": len({(r.name, r.rtype) for r in zone_records(rs, ZONE)}),
        "queries_per_run": len(servers) * (1 + len({(r.name, r.rtype) for r in zone_records(rs, ZONE)})),
        "runs": args.runs,
        "discover_seconds": round(discover, 4),
        "check_seconds": {"median": round(statistics.median(times), 4), "p95": round(p95, 4),
                          "max": round(times[-1], 4)},
        "target_seconds": 2.0,
        "within_target": p95 <= 2.0,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
