"""TLS audit with testssl.sh (offline-safe): protocols and cipher categories."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

# testssl finding ids that must all be "not offered".
TLS_WEAK = ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT",
            "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_AVERAGE", "cipherlist_OBSOLETED")


def run_testssl(target: str, starttls: str | None, out: Path) -> list[dict]:
    cmd = ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--protocols", "--std",
           "--jsonfile", str(out), "--connect-timeout", "10", "--openssl-timeout", "10"]
    if starttls:
        cmd += ["--starttls", starttls]
    proc = subprocess.run([*cmd, target], capture_output=True, text=True, timeout=600, check=False)
    assert out.exists(), f"testssl wrote no results for {target}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return json.loads(out.read_text())


def tls_problems(target: str, starttls: str | None, out: Path) -> list[str]:
    """What testssl finds below TLS 1.2 or weak at `target` (empty: nothing)."""
    by_id = {f["id"]: f["finding"] for f in run_testssl(target, starttls, out)}
    if "TLS1_2" not in by_id:
        return [f"testssl did not test TLS 1.2: {sorted(by_id)[:20]}"]
    problems = []
    if not (by_id["TLS1_2"].startswith("offered") or by_id.get("TLS1_3", "").startswith("offered")):
        problems.append(f"neither TLS 1.2 nor 1.3 offered: {by_id['TLS1_2']}")
    problems += [f"{weak}: {by_id[weak]}" for weak in TLS_WEAK
                 if weak in by_id and not by_id[weak].startswith("not offered")]
    return problems
