#!/usr/bin/env python3
"""Backup figures, printed as JSON (progress on stderr).

    PYTHONPATH=. bench/backup.py [--messages 10000] [--size 4096] [--change 0.01] [--repo DIR]

Makes N message files (random bytes: incompressible, like mail encrypted at
rest; default 10,000 of ~4 KiB) in 2 mailboxes of a folder standing in for
the mail volume (FolderVolumes), configures a local restic repository, and
times portal.backup.service: a full backup, an incremental one after
changing `--change` of the messages (half rewritten, half new), the restore
of the latest snapshot onto a fresh state (files and volumes put back,
manifest checked), and the verification. Targets (issue 15; issue 6's
were 10 s and 60 s): incremental <= 3 s, restore of 10,000 messages <= 8 s.
`steps` gives each run's seconds per progress step (staging copies, upload,
retention...), from the service's own progress reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from portal.backup import config as cfg  # noqa: E402
from portal.backup.contents import FolderVolumes  # noqa: E402
from portal.backup.service import Env, backup, configure, restore, verify  # noqa: E402
from portal.core.store import write_settings  # noqa: E402


T0 = time.monotonic()


def say(text: str) -> None:
    print(f"{time.monotonic() - T0:7.2f} {text}", file=sys.stderr, flush=True)


def make_mail(vols: Path, n: int, size: int) -> list[Path]:
    files = []
    for i in range(n):
        box = ("alice", "bob")[i % 2]
        d = vols / "mail" / "example.test" / box / "mail" / "mailboxes" / "INBOX" / "dbox-Mails"
        if i < 2:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"u.{i + 1}"
        p.write_bytes(os.urandom(size // 2 + (i * 7919) % size))
        files.append(p)
    return files


STEPS: dict[str, list[tuple[str, float]]] = {}


def timed(fn, *args, **kwargs):
    """fn's seconds and result; its progress steps' seconds go to STEPS[fn's name]."""
    steps = STEPS.setdefault(fn.__name__ if fn.__name__ not in STEPS else f"incremental_{fn.__name__}", [])
    last = [time.monotonic(), None]

    def progress(step: str, detail: str) -> None:
        now = time.monotonic()
        if last[1] is not None:
            steps.append((last[1], round(now - last[0], 2)))
        last[:] = [now, f"{step}: {detail[:60]}"]
        say(f"  {step}: {detail}")

    start = time.monotonic()
    result = fn(*args, progress, **kwargs)
    end = time.monotonic()
    if last[1] is not None:
        steps.append((last[1], round(end - last[0], 2)))
    return round(end - start, 2), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096, help="average message size in bytes")
    parser.add_argument("--change", type=float, default=0.01, help="share of messages changed before the incremental")
    parser.add_argument("--repo", type=Path, help="repository folder (default: in the temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="backup-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        state, vols = root / "state", root / "vols"
        write_settings(state, {"domain": "example.test", "stack_project": "bench"})
        say(f"making {args.messages} messages")
        files = make_mail(vols, args.messages, args.size)
        env = Env(state, "0.1.0", volumes=FolderVolumes(vols), timeout=3600)
        repo = args.repo or root / "repo"
        configure(env, cfg.validate("local", path=str(repo)))
        say("full backup")
        full_s, full = timed(backup, env)
        changed = max(1, int(args.messages * args.change))
        for p in files[: changed // 2]:
            p.write_bytes(os.urandom(args.size))
        d = files[0].parent
        for i in range(changed - changed // 2):
            (d / f"u.new{i}").write_bytes(os.urandom(args.size))
        say(f"incremental backup after changing {changed} messages")
        inc_s, inc = timed(backup, env)
        password = (state / "secrets" / "backup-password").read_text().strip()
        new_state, new_vols = root / "new-state", root / "new-vols"
        env2 = Env(new_state, "0.1.0", volumes=FolderVolumes(new_vols), timeout=3600)
        configure(env2, cfg.validate("local", path=str(repo)), password=password)
        say("restore onto a fresh state")
        restore_s, restored = timed(restore, env2, "latest")
        say("verify")
        verify_s, verified = timed(verify, env)
        print(json.dumps({
            "messages": args.messages, "avg_size_bytes": args.size, "changed": changed,
            "full_backup_s": full_s, "full_data_added_bytes": full["data_added"],
            "incremental_backup_s": inc_s, "incremental_files_new": inc["files_new"],
            "incremental_files_changed": inc["files_changed"], "incremental_data_added_bytes": inc["data_added"],
            "restore_s": restore_s, "restored_messages": restored["messages"],
            "verify_s": verify_s, "verify_ok": verified["ok"],
            "steps": STEPS,
            "targets": {"incremental_backup_s": 3, "restore_s": 8},
            "met": {"incremental_backup": inc_s <= 3, "restore": restore_s <= 8},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
