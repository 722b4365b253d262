"""Deploy the stack with `docker compose`; read its state with the docker SDK.

A deploy renders the stack folder afresh, runs `compose up`, and waits until
every service is healthy. If that fails, the previous folder is put back and
brought up again, so a bad change never leaves the owner without mail; the
error names the service that failed and why.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from portal.core import safefs
from portal.stack.accounts import Accounts
from portal.stack.render import render, replace_tree, restore_tree, tree_holds
from portal.stack.settings import SERVICES, StackSettings

Progress = Callable[[str, str], None]


from portal.core.errors import MailsteadError  # noqa: E402


class DeployError(MailsteadError, RuntimeError):
    """`failures` maps each failed service to a plain-words reason."""

    def __init__(self, message: str, failures: dict[str, str] | None = None,
                 rolled_back: bool = False) -> None:
        super().__init__(message, code="deploy_failed")
        self.failures = failures or {}
        self.rolled_back = rolled_back


@dataclass
class ServiceState:
    service: str
    status: str          # running, exited, missing, ...
    health: str          # healthy, starting, unhealthy, none
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "running" and self.health in ("healthy", "none")


@dataclass
class DeployResult:
    seconds_to_healthy: float
    services: dict[str, ServiceState] = field(default_factory=dict)


# -- secrets the stack needs ----------------------------------------------------

def stack_secrets(secrets_dir: Path) -> dict[str, str]:
    """The stack's generated secrets, made once (0600) and then reused."""
    safefs.ensure_dir(secrets_dir, 0o700)
    path = secrets_dir / "redis-password"
    safefs.write_new(path, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)  # kept if there
    return {"redis_password": safefs.read_text(path, 4096, owner_uid=os.geteuid()).strip()}


# -- compose and the SDK --------------------------------------------------------

def compose(settings: StackSettings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", "compose", "-p", settings.project,
           "-f", str(settings.stack_dir / "compose.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def engine_start_interval(client: Any) -> bool:
    """Whether the engine checks a starting container's health at its own pace (docker
    Engine 25.0, API 1.44); an engine that does not say is taken as older."""
    try:
        major, minor = (int(part) for part in str(client.version()["ApiVersion"]).split(".")[:2])
    except Exception:  # noqa: BLE001 - no answer, or not a version: the 5 s checks work everywhere
        return False
    return (major, minor) >= (1, 44)


def service_states(client: Any, project: str, services: tuple[str, ...] = SERVICES) -> dict[str, ServiceState]:
    found = {}
    for c in client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"}):
        service = c.labels.get("com.docker.compose.service", "")
        state = c.attrs.get("State", {})
        health = (state.get("Health") or {}).get("Status", "none")
        error = state.get("Error", "")
        if health == "unhealthy":
            log = (state.get("Health") or {}).get("Log") or []
            if log:
                error = error or " ".join(str(log[-1].get("Output", "")).split())[:300]
        found[service] = ServiceState(service, state.get("Status", "unknown"), health, error)
    return {s: found.get(s, ServiceState(s, "missing", "none", "no container")) for s in services}


def wait_healthy(client: Any, project: str, timeout: float, progress: Progress,
                 services: tuple[str, ...] = SERVICES) -> dict[str, ServiceState]:
    deadline = time.monotonic() + timeout
    said: dict[str, str] = {}
    while True:
        states = service_states(client, project, services)
        for s, st in states.items():
            now = "healthy" if st.ok else f"{st.status}/{st.health}"
            if said.get(s) != now:
                progress(s, now)
                said[s] = now
        if all(st.ok for st in states.values()):
            return states
        dead = {s: st for s, st in states.items() if st.status in ("exited", "dead", "missing")
                or st.health == "unhealthy"}
        if dead or time.monotonic() > deadline:
            bad = dead or {s: st for s, st in states.items() if not st.ok}
            raise DeployError(
                "services did not become healthy: " + ", ".join(sorted(bad)),
                {s: describe(client, project, st) for s, st in bad.items()},
            )
        time.sleep(0.5)


def describe(client: Any, project: str, st: ServiceState) -> str:
    """Why a service failed, from its state and the last lines of its log."""
    reason = st.error or f"{st.status}, health {st.health}"
    try:
        c = client.containers.get(f"{project}-{st.service}")
        tail = c.logs(tail=5).decode(errors="replace").strip()
    except Exception:
        tail = ""
    return f"{reason}" + (f"; last log lines: {tail[-600:]}" if tail else "")


def up(client: Any, settings: StackSettings, timeout: float, progress: Progress,
       force: bool = True) -> dict[str, ServiceState]:
    """`compose up`: every container recreated (force), or only those whose definition
    changed or that are missing, with stopped ones started; then wait for health."""
    args = ("up", "-d", *(("--force-recreate",) if force else ()), "--remove-orphans")
    r = compose(settings, *args, timeout=timeout + 120)
    if r.returncode != 0:
        states = service_states(client, settings.project)
        failures = {s: describe(client, settings.project, st) for s, st in states.items() if not st.ok}
        message = " ".join(r.stderr.split())[-800:]
        raise DeployError(f"docker compose up failed: {message}", failures or {"compose": message})
    return wait_healthy(client, settings.project, timeout, progress)


def deploy(client: Any, settings: StackSettings, *, timeout: float = 180,
           progress: Progress | None = None, recreate: bool = True) -> DeployResult:
    """Render `settings` (images must be loaded; settings.images pins their IDs),
    bring the stack up and wait for health. On failure, roll back.

    Every container is recreated, so that each reads its rendered config afresh;
    recreate=False keeps the containers when the rendered folder is the one deployed
    already (at boot, the stack docker restarts is left to finish starting), and
    recreates them all only if they do not come up healthy that way."""
    say = progress or (lambda _s, _m: None)
    settings = replace(settings.validate(), engine_start_interval=engine_start_interval(client))
    files = render(settings, stack_secrets(settings.secrets_dir))
    keep = not recreate and tree_holds(files, settings.stack_dir)
    # The accounts database exists (with the appliance's domain) before
    # postfix and dovecot first open it.
    Accounts(settings.accounts_db).add_domain(settings.domain)
    safefs.ensure_dir(settings.secrets_dir, 0o700)
    safefs.ensure_dir(settings.dkim_dir, 0o700)
    prev = replace_tree(files, settings.stack_dir)
    start = time.monotonic()
    try:
        if keep:
            try:
                states = up(client, settings, timeout, say, force=False)
            except DeployError as err:
                say("deploy", f"not healthy as they were ({err}); recreating every service")
                states = up(client, settings, timeout, say)
        else:
            states = up(client, settings, timeout, say)
    except DeployError as err:
        if prev is None:
            raise
        say("deploy", "failed; bringing the previous stack back")
        restore_tree(settings.stack_dir, prev)
        try:
            up(client, settings, timeout, say)
        except DeployError as again:
            raise DeployError(f"{err}; rolling back failed too: {again}", err.failures) from err
        raise DeployError(f"{err} (the previous stack is running again)", err.failures,
                          rolled_back=True) from err
    return DeployResult(time.monotonic() - start, states)


def down(settings: StackSettings, volumes: bool = False) -> None:
    args = ["down", "--remove-orphans"] + (["--volumes"] if volumes else [])
    compose(settings, *args)
