#!/usr/bin/env python3
"""How long issuing a certificate takes against a local ACME CA, printed as JSON
(progress on stderr).

    PYTHONPATH=. bench/acme_issue.py [--runs 5]

Starts knot (the zone example.test, TSIG updates allowed) and pebble
(PEBBLE_VA_NOSLEEP=1, resolving through that knot) on loopback, plus a token
server standing in for the host nginx on port 80. Each run is one full
portal.certs issuance for mail.example.test, mta-sts. and autoconfig.
(account lookup, order, three challenges, finalize, download) followed by the
verified install into a fresh state folder; the DNS-01 runs include the RFC
2136 updates, the wait until the authoritative server serves the TXT records,
and their removal. Figures are seconds: median, min and max of the runs.
acme's ClientV2 polls the order once a second, which sets the floor (~1 s).
Nothing leaves loopback. The figures leave out the real world's part: the CA's
own validation delays and DNS propagation to secondaries.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portal.certs.challenges import DnsChallenge, HttpChallenge  # noqa: E402
from portal.certs.issue import issue  # noqa: E402
from portal.certs.settings import AcmeSettings, acme_names  # noqa: E402
from portal.certs.store import install  # noqa: E402
from portal.dns.update import TsigKey, UpdateTarget  # noqa: E402
from tests.integration.knot import Knot, KnotKey, Record  # noqa: E402
from tests.integration.pebble import Pebble, TokenServer  # noqa: E402

ZONE = "example.test"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def figures(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3), "runs": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    key = KnotKey("bench-key", base64.b64encode(os.urandom(32)).decode())
    with tempfile.TemporaryDirectory(prefix="acme-bench-") as tmp:
        root = Path(tmp)
        knot = Knot(root / "knot", ZONE, [Record(n, "A", "127.0.0.1") for n in ("mail", "mta-sts", "autoconfig")],
                    key=key).start()
        pebble = tokens = None
        try:
            pebble = Pebble(root / "pebble", knot.port).start()
            tokens = TokenServer(root / "acme", pebble.http_port)
            (root / "acme").mkdir()
            tokens.start()
            acme = AcmeSettings(directory=pebble.directory_url, names=acme_names(ZONE, f"mail.{ZONE}", False),
                                ca_bundle=pebble.ca_bundle, contact=f"postmaster@{ZONE}")
            target = UpdateTarget("127.0.0.1", knot.port, ZONE, TsigKey.parse(key.name, key.secret, key.algorithm))
            state = root / "state"
            results: dict[str, dict[str, float]] = {}
            for kind in ("http-01", "dns-01"):
                times = []
                for run in range(args.runs):
                    handler = (HttpChallenge(root / "acme") if kind == "http-01" else
                               DnsChallenge(target, [("127.0.0.1", knot.port)], knot.port))
                    start = time.monotonic()
                    files = issue(acme, handler, state)
                    install(state / "tls", files.fullchain_pem, files.key_pem, acme.names)
                    times.append(time.monotonic() - start)
                    log(f"{kind} run {run + 1}: {times[-1]:.2f} s")
                results[kind.replace("-", "")] = figures(times)
            print(json.dumps({"names": list(acme.names), "key": "ECDSA P-256", "ca": "pebble (VA no sleep)",
                              **results}, indent=2))
        finally:
            if tokens:
                tokens.stop()
            if pebble:
                pebble.stop()
            knot.stop()


if __name__ == "__main__":
    main()
