"""Health checks: each returns a CheckResult(id, status, message, fix).

The dashboard, `mailstead status` and the alert mails all render these. Checks
return data, never print; every network call has a timeout; a check that
raises is reported as failed, never lost. The outside world comes from a
CheckEnv (paths, thresholds, the agent Context) so tests point it at real
local things (ports, certificates, a knot DNSBL zone, a temporary folder).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from portal.checks.env import CheckEnv

STATUSES = ("ok", "warn", "fail")


@dataclass(frozen=True)
class CheckResult:
    id: str
    status: str      # ok | warn | fail
    message: str     # what is the case, in one sentence
    fix: str = ""    # what to do about it (empty when ok)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


Check = Callable[["CheckEnv"], CheckResult]
CHECKS: dict[str, tuple[str, Check]] = {}  # id -> (title, function), in display order


def check(check_id: str, title: str) -> Callable[[Check], Check]:
    def register(func: Check) -> Check:
        CHECKS[check_id] = (title, func)
        return func
    return register


def run_one(check_id: str, env: CheckEnv) -> CheckResult:
    _title, func = CHECKS[check_id]
    try:
        result = func(env)
    except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, with its reason
        import logging

        logging.getLogger("mailstead.checks").exception("check %s raised", check_id)
        return CheckResult(check_id, "fail", f"the check itself failed ({type(exc).__name__}: "
                                             f"{' '.join(str(exc).split())[:200]})",
                           "see the agent log (journalctl -u mailstead-agent)")
    if result.id != check_id:
        result = CheckResult(check_id, result.status, result.message, result.fix)
    return result


def run_all(env: CheckEnv, only: list[str] | None = None, timeout: float = 20.0) -> list[CheckResult]:
    """Every check (or those in `only`), in parallel; a check slower than `timeout`
    seconds is reported as failed (it keeps running in the background)."""
    ids = [c for c in CHECKS if only is None or c in only]
    pool = ThreadPoolExecutor(max_workers=max(1, len(ids)), thread_name_prefix="check")
    futures = {c: pool.submit(run_one, c, env) for c in ids}
    pool.shutdown(wait=False)
    deadline = time.monotonic() + timeout
    out = []
    for c, fut in futures.items():
        try:
            out.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            out.append(CheckResult(c, "fail", f"the check gave no answer within {timeout:g} s",
                                   "see the agent log; a hung docker engine or DNS server is the usual cause"))
    return out


def load_all() -> dict[str, tuple[str, Check]]:
    """Import the modules that register the checks (cheap: heavy libraries load on use)."""
    from portal.checks import system, stack  # noqa: F401

    return CHECKS


def summary(results: list[CheckResult]) -> dict[str, Any]:
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] += 1
    worst = "fail" if counts["fail"] else "warn" if counts["warn"] else "ok"
    return {"status": worst, **counts}


def wait_healthy(ctx: Any, only: list[str], wait: float, progress: Any = None) -> list[str]:
    """Run the checks `only` until they pass, for up to `wait` seconds; [] when they do,
    else what the last round found (the upgrade's health gate, given to it by
    portal/stack/privileged.py)."""
    import time

    from portal.checks.env import env_for

    load_all()
    progress = progress or (lambda _step, _detail: None)
    deadline = time.monotonic() + wait
    said = None
    while True:
        results = run_all(env_for(ctx), only=only, timeout=30)
        bad = [f"{r.id}: {r.message}" for r in results if r.status != "ok"]
        if not bad:
            progress("health", "; ".join(r.message for r in results))
            return []
        if time.monotonic() >= deadline:
            return bad
        if bad != said:
            progress("health", "waiting: " + "; ".join(bad)[:250])
            said = bad
        time.sleep(2)
