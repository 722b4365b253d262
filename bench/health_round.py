#!/usr/bin/env python3
"""One full round of health checks against a running stack, timed (JSON on stdout, progress on stderr).

    PYTHONPATH=. bench/health_round.py [--rounds 5] [--state /var/lib/mailstead]

With --state, the checks read that appliance's state.db (its stack must be
running). Without it, a test stack comes up on the host's docker engine
(tests/integration/stackharness.py; compose project mstest-i6a, ports
31000 + the standard port % 1000; the mkosi-built image tars must exist) and
is taken down at the end. Each round runs every check in parallel, as
health_run does (history recorded in the state folder, alerts off); then
each check runs alone to show where the time goes. Target: a round <= 5 s.

Measured here (2 cores, test stack): first round 1.83 s (the `apt list` of
the updates check, kept afterwards until apt's lists or dpkg change), then
0.08-0.14 s; postfix's `postqueue -j` (docker exec, 0.1 s) is the slowest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 5.0


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def measure(state: Path, rounds: int) -> dict[str, Any]:
    from portal.agent import registry as ops
    from portal.checks import CHECKS, load_all, run_one
    from portal.checks import privileged as agentops
    from portal.checks.env import CheckEnv

    load_all()
    ctx = ops.Context(docker=ops.docker_factory("unix:///var/run/docker.sock"), state_dir=state)
    times, last = [], None
    for i in range(rounds):
        t0 = time.monotonic()
        last = agentops.health_round(ctx, alert=False, env=CheckEnv(ctx))
        times.append(time.monotonic() - t0)
        say(f"round {i + 1}: {times[-1]:.2f} s ({last['summary']})")
    per_check: dict[str, list[float]] = {c: [] for c in CHECKS}
    for _ in range(rounds):
        for c in CHECKS:
            t0 = time.monotonic()
            run_one(c, CheckEnv(ctx))
            per_check[c].append(time.monotonic() - t0)
    assert last is not None
    return {
        "rounds": rounds,
        "round_seconds": stats(times),
        "per_check_seconds_median": {c: round(statistics.median(v), 3) for c, v in per_check.items()},
        "statuses": {r["id"]: r["status"] for r in last["results"]},
        "messages": {r["id"]: r["message"] for r in last["results"] if r["status"] != "ok"},
        "target_seconds": TARGET,
        "met": max(times) <= TARGET,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--state", type=Path, help="an appliance's state folder (its stack running)")
    p.add_argument("--project", default="mstest-i6a")
    p.add_argument("--port-base", type=int, default=31000)
    args = p.parse_args()
    if args.state:
        out = measure(args.state, args.rounds)
        out["stack"] = f"existing ({args.state})"
        print(json.dumps(out, indent=2))
        return 0

    from tests.integration.test_checks_stack import appliance_settings, make_stack

    state = Path(tempfile.mkdtemp(prefix=f"{args.project}-bench-", dir="/var/tmp"))
    say(f"starting a test stack ({args.project}, port base {args.port_base}) in {state}")
    stack = make_stack(state, args.project, args.port_base)
    try:
        t0 = time.monotonic()
        stack.deploy()
        say(f"stack healthy after {time.monotonic() - t0:.0f} s")
        appliance_settings(stack, public_ipv4="127.0.0.1", dns_resolvers=f"{stack.settings.dns_servers[0]}:53",
                           dnsbl_zones="zen.spamhaus.org,bl.spamcop.net")
        out = measure(state, args.rounds)
        out["stack"] = f"test stack {args.project} (tests/integration/stackharness.py)"
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
