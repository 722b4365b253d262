"""bench/memory_budget.py, which the VM tier runs inside the booted image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "memory_budget.py"


def test_the_budget_finds_its_own_process_and_adds_up():
    out = json.loads(subprocess.run([sys.executable, str(SCRIPT), "--top", "1000"], capture_output=True,
                                    text=True, check=True, timeout=60).stdout)
    me = [p for p in out["processes"] if p["name"].endswith("memory_budget.py")]
    assert len(me) == 1 and me[0]["rss_mb"] > 1 and 0 < me[0]["pss_mb"] <= me[0]["rss_mb"], me
    groups = out["groups"]
    assert me[0]["group"] in groups
    assert sum(g["processes"] for g in groups.values()) >= len(out["processes"]) > 1
    assert abs(sum(g["pss_mb"] for g in groups.values()) - out["processes_pss_mb"]) < 0.1 * len(groups) + 0.2
    info = out["meminfo_mb"]
    assert out["used_mb"] == round(info["MemTotal"] - info["MemAvailable"], 1) or \
        abs(out["used_mb"] - (info["MemTotal"] - info["MemAvailable"])) <= 0.2
    assert out["kernel_mb"] > 0 and "min_free_mb" in out["reserves"]
