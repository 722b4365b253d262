#!/usr/bin/env python3
"""Where a machine's memory goes, per process and per unit or container, as JSON.

    python3 bench/memory_budget.py [--top 30]

Standard library only, so that the VM tier can run it inside the booted image
(tests/vm: the restored BIOS machine, the journey when idle) and
put the result in its report, which bench/appliance.py prints.

- used_mb is what the issue's target counts: MemTotal - MemAvailable.
- Every process's RSS and PSS (/proc/<pid>/smaps_rollup; PSS splits shared
  pages between the processes that map them, so PSS adds up and RSS does
  not), with PSS split into anon, file and shmem. Page cache that no process
  maps is not in any process's figure.
- groups: the same summed per systemd unit (its cgroup) or per container
  (docker's systemd cgroup driver puts each in docker-<id>.scope; the name
  comes from `docker ps` when docker answers).
- kernel_mb: unreclaimable slab, kernel stacks and page tables, with the
  meminfo figures they come from; shmem (tmpfs, /dev/shm) counts as used.
- reserves: vm.min_free_kbytes and the zones' high watermarks, which
  MemAvailable leaves out, and the transparent hugepage mode (when THP is on,
  the kernel raises min_free_kbytes for compaction).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

PROC = Path("/proc")
DOCKER_SCOPE = re.compile(r"docker-([0-9a-f]{64})\.scope")
FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Swap")
MEMINFO = ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "Shmem", "AnonPages", "Slab",
           "SReclaimable", "SUnreclaim", "KernelStack", "PageTables", "SwapTotal", "SwapFree")


def mb(kib: float) -> float:
    return round(kib / 1024, 1)


def meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in (PROC / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO:
            values[key] = int(rest.split()[0])
    return values


def rollup(pid: str) -> dict[str, int] | None:
    """The process's smaps_rollup in KiB, or None for kernel threads and processes that went away."""
    try:
        text = (PROC / pid / "smaps_rollup").read_text()
    except OSError:
        return None
    values = {f: 0 for f in FIELDS}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0])
    return values if values["Rss"] else None


def cgroup_of(pid: str) -> str:
    try:
        lines = (PROC / pid / "cgroup").read_text().splitlines()
    except OSError:
        return "?"
    for line in lines:  # v2: "0::/system.slice/x.service"; v1: the systemd hierarchy names the unit
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "name=systemd"):
            return path
    return lines[0].split(":", 2)[2] if lines else "?"


def container_names() -> dict[str, str]:
    if not shutil.which("docker"):
        return {}
    try:
        out = subprocess.run(["docker", "ps", "--no-trunc", "--format", "{{.ID}} {{.Names}}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def group_name(cgroup: str, names: dict[str, str]) -> str:
    if found := DOCKER_SCOPE.search(cgroup):
        cid = found.group(1)
        return "container " + names.get(cid, cid[:12])
    leaf = cgroup.rstrip("/").rsplit("/", 1)[-1]
    if leaf.startswith("session-") or "/user.slice/" in cgroup:
        return "user sessions"
    return leaf or "/"


def process_name(pid: str) -> str:
    try:
        comm = (PROC / pid / "comm").read_text().strip()
        argv = (PROC / pid / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    # Interpreters: name the script or module (python3 -m portal.agent, gunicorn ...).
    if comm.startswith("python") or comm == "gunicorn":
        args = [a.decode(errors="replace") for a in argv[1:] if a and not a.startswith(b"-")]
        if args:
            return f"{comm} {os.path.basename(args[0])}"
    return comm


def reserves() -> dict[str, object]:
    """What the kernel keeps free (MemAvailable leaves its watermarks out) and the THP mode that sets them."""
    high = 0
    try:
        for line in (PROC / "zoneinfo").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "high":
                high += int(parts[1]) * 4
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        min_free = int((PROC / "sys/vm/min_free_kbytes").read_text())
    except (OSError, ValueError):
        return {}
    return {"min_free_mb": mb(min_free), "watermark_high_mb": mb(high), "transparent_hugepage": thp}


def budget(top: int) -> dict:
    names = container_names()
    info = meminfo()
    processes = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        values = rollup(entry.name)
        if values is None:
            continue
        processes.append({"pid": int(entry.name), "name": process_name(entry.name),
                          "group": group_name(cgroup_of(entry.name), names), **values})
    groups: dict[str, dict[str, float]] = {}
    for p in processes:
        g = groups.setdefault(p["group"], {"processes": 0, **{f: 0 for f in FIELDS}})
        g["processes"] += 1
        for f in FIELDS:
            g[f] += p[f]

    def shown(values: dict) -> dict:
        return {k.lower() + "_mb" if k in FIELDS else k: (mb(v) if k in FIELDS else v) for k, v in values.items()}

    kernel = info.get("SUnreclaim", 0) + info.get("KernelStack", 0) + info.get("PageTables", 0)
    total_pss = sum(p["Pss"] for p in processes)
    return {
        "used_mb": mb(info["MemTotal"] - info["MemAvailable"]),
        "processes_pss_mb": mb(total_pss),
        "processes_pss_anon_mb": mb(sum(p["Pss_Anon"] for p in processes)),
        "kernel_mb": mb(kernel),
        "shmem_mb": mb(info.get("Shmem", 0)),
        "reserves": reserves(),
        "meminfo_mb": {k: mb(v) for k, v in info.items()},
        "groups": {name: shown(g) for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["Pss"])},
        "processes": [shown(p) for p in sorted(processes, key=lambda p: -p["Pss"])[:top]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=30, help="how many processes to list (largest PSS first)")
    args = parser.parse_args()
    print(json.dumps(budget(args.top), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
