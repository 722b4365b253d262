#!/usr/bin/env python3
"""Seconds from pressing Deploy (the wizard's last step) to every service healthy,
printed as JSON (progress on stderr).

    PYTHONPATH=. bench/wizard_deploy.py [--runs 3]

What the Deploy button does, without the browser: a real agent process (root,
the host's docker engine) gets `job_start setup_deploy` for a state folder in
which the earlier steps are done (domain, admin with its pending mailbox,
bootstrap certificate), and the job is polled once a second as the page polls
it, until it is done. Each run starts from no containers (`compose down`), with
the images already loaded (on the appliance they are loaded at first boot,
while the owner walks through the wizard). The stack publishes on 127.0.0.1 at
30000 + the standard port % 1000. Figures: seconds per run, median, and the
per-service times from the job's progress events of the last run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portal.web import db  # noqa: E402
from portal.admin.privileged import put_pending_mailbox  # noqa: E402
from portal.agent.client import AgentClient  # noqa: E402
from portal.stack import deploy as deploy_mod  # noqa: E402
from portal.stack.settings import DEFAULT_PORTS  # noqa: E402
from portal.stack.store import load_settings  # noqa: E402
from tests.conftest import launch_agent  # noqa: E402
from tests.integration.stackharness import (DOMAIN, HOSTNAME, IMAGES_DIR, SHARED_DKIM, ensure_images,  # noqa: E402
                                            make_tls, shared_dns)

PROJECT, PORT_BASE = "msbench-deploy", 30000


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> int:
    import docker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ensure_images(docker.from_env(timeout=120))
    root = Path(tempfile.mkdtemp(prefix="mailstead-bench-deploy-"))
    state, run = root / "state", root / "run"
    (state / "tls").mkdir(parents=True)
    run.mkdir()
    cert, key = make_tls(root / "bootstrap", [HOSTNAME])
    shutil.copy(cert, state / "tls" / "bootstrap.crt")
    shutil.copy(key, state / "tls" / "bootstrap.key")
    shutil.copytree(SHARED_DKIM, state / "secrets" / "dkim")
    ports = {name: PORT_BASE + port % 1000 for name, port in DEFAULT_PORTS.items()}
    db.write_settings(state / "state.db", {
        "domain": DOMAIN, "mail_host": HOSTNAME, "stack_project": PROJECT, "stack_ports": json.dumps(ports),
        "publish_addresses": "127.0.0.1", "dns_servers": shared_dns().address,
    })
    env = {"MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_IMAGES_DIR": str(IMAGES_DIR),
           "MAILSTEAD_NGINX_DIR": str(root / "nginx"), "MAILSTEAD_WWW_DIR": str(root / "www"),
           "MAILSTEAD_RELOAD_NGINX": "0"}
    agent = launch_agent(run, "--docker-host", "unix:///var/run/docker.sock", env=env)
    client = AgentClient(str(agent.socket), timeout=30)
    seconds: list[float] = []
    services: dict[str, float] = {}
    try:
        for i in range(args.runs):
            subprocess.run(["docker", "compose", "-p", PROJECT, "down", "--volumes", "--remove-orphans"],
                           capture_output=True, check=False)
            put_pending_mailbox(state, f"postmaster@{DOMAIN}", "bench-correct-horse-battery")
            start = time.monotonic()
            job = client.call("job_start", kind="setup_deploy")
            while job["state"] == "running":
                time.sleep(1)
                job = client.call("job_status", job_id=job["id"])
            took = time.monotonic() - start
            if job["state"] != "done":
                raise SystemExit(f"run {i + 1}: the deploy job {job['state']}: {job.get('error')}")
            seconds.append(round(took, 1))
            services = {e["step"]: e["t"] for e in job["events"] if e["detail"] == "healthy"}
            say(f"run {i + 1}: {took:.1f} s")
    finally:
        agent.stop()
        try:
            deploy_mod.down(load_settings(state), volumes=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "runs": seconds, "median_seconds": statistics.median(seconds), "target_seconds": 45,
        "within_target": statistics.median(seconds) <= 45,
        "healthy_at_seconds_last_run": services, "images": "preloaded (as after first boot)",
        "machine": "2 cores, host docker engine",
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
