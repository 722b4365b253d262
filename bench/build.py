#!/usr/bin/env python3
"""Image build figures, printed as JSON.

    bench/build.py [--cold] [--profile test]

warm_rebuild_seconds: scripts/build-image run twice in a row; the second
run's time (caches warm, nothing changed). With --cold, first a build with
an empty cache directory and no tools tree (downloads every package from
the mirror: minutes), reported as cold_build_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(args: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    subprocess.run([str(ROOT / "scripts" / "build-image"), *args], check=True, env=env,
                   stdout=sys.stderr, stderr=sys.stderr)
    return round(time.monotonic() - start, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--profile")
    args = ap.parse_args()
    extra = ["--profile", args.profile] if args.profile else []
    figures: dict[str, object] = {}
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="mailstead-cold-", dir="/var/tmp") as cache:
            shutil.rmtree(ROOT / "mkosi.output" / "tools", ignore_errors=True)
            figures["cold_build_seconds"] = build(extra, env=os.environ | {"MAILSTEAD_CACHE": cache})
        shutil.rmtree(ROOT / "mkosi.output" / "tools", ignore_errors=True)
    build(extra)  # make sure the real caches are warm
    figures["warm_rebuild_seconds"] = build(extra)
    figures["warm_rebuild_raw_only_seconds"] = build([*extra, "--raw-only"])
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
