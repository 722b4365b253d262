"""Dashboard home (/admin/): the appliance's health at a glance, green/amber/red.

The colours come from pure functions of what the agent reports (stack_status,
cert_status, the latest dns_check job or the "dns_status" setting,
system_status), so they are tested without a stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from portal.agent import jobs as jobs_ops
from portal.agent.registry import Operation
from portal.certs import privileged as cert_ops
from portal.setup import privileged as setup_ops
from portal.stack import privileged as stack_ops
from portal.web import state
from portal.agent.client import AgentError
from portal.web.dashboard import Nav, render_dashboard

bp = Blueprint("dashboard", __name__, url_prefix="/admin")
NAV = Nav(10, "Home", "dashboard.home")

GREEN, AMBER, RED = "green", "amber", "red"
CERT_RED_DAYS = 7
CERT_AMBER_DAYS = 21
DISK_RED_FREE = 0.05  # share of the file system still free
DISK_AMBER_FREE = 0.15
MEMORY_AMBER_FREE = 0.10

Reported = dict[str, Any] | AgentError | None


@dataclass(frozen=True)
class Health:
    id: str
    title: str
    colour: str
    sentence: str
    link: str | None = None  # endpoint of the area to fix it


def _failed(err: AgentError) -> str:
    if err.code == "docker_unavailable":
        return f"docker engine unavailable ({err.message})"
    return err.message


def services_health(status: Reported) -> Health:
    title = "Mail services"
    if isinstance(status, AgentError):
        return Health("services", title, RED, f"Cannot tell: {_failed(status)}.")
    services = (status or {}).get("services") or {}
    if not services:
        return Health("services", title, RED, "No service information; deploy the stack.")
    down = sorted(s for s, st in services.items()
                  if st.get("status") in ("missing", "exited", "dead") or st.get("health") == "unhealthy")
    busy = sorted(s for s, st in services.items() if s not in down
                  and not (st.get("status") == "running" and st.get("health") in ("healthy", "none")))
    if down:
        missing = all(services[s].get("status") == "missing" for s in down)
        if missing and len(down) == len(services):
            return Health("services", title, RED, "The mail services are not running: deploy the stack.")
        return Health("services", title, RED, f"Not working: {', '.join(down)}. Mail may be "
                                              f"refused or delayed; see the logs.", "logs.index")
    if busy:
        return Health("services", title, AMBER, f"Starting: {', '.join(busy)}. Check again in a minute.")
    return Health("services", title, GREEN, f"All {len(services)} services are running and healthy.")


def cert_health(status: Reported) -> Health:
    title = "Certificate"
    if isinstance(status, AgentError):
        return Health("certificate", title, RED, f"Cannot tell: {_failed(status)}.")
    status = status or {}
    if status.get("source") in (None, "none") or "days_left" not in status:
        return Health("certificate", title, RED, "There is no certificate: mail apps cannot connect securely.")
    days = int(status["days_left"])
    when = f"expires in {days} day{'s' if days != 1 else ''}" if days >= 0 else "has expired"
    if days < CERT_RED_DAYS:
        return Health("certificate", title, RED, f"The certificate {when}: renew it now.")
    if status.get("self_signed") or status.get("source") == "bootstrap":
        return Health("certificate", title, AMBER, f"Self-signed ({when}): mail apps and other "
                                                   f"servers will warn or refuse; get one from a CA.")
    if days < CERT_AMBER_DAYS:
        return Health("certificate", title, AMBER, f"The certificate {when}; automatic renewal "
                                                   f"should have happened by now.")
    if status.get("last_error"):
        return Health("certificate", title, AMBER, f"Valid, {when}, but the last renewal "
                                                   f"failed: {status['last_error']}")
    return Health("certificate", title, GREEN, f"Valid; {when}.")


def dns_health(job: Reported, setting: str | None = None) -> Health:
    """From the newest dns_check job (its result), else the "dns_status" setting (ok/problems)."""
    title = "DNS records"
    if isinstance(job, AgentError):
        job = None
    if job and job.get("state") == "done" and isinstance(job.get("result"), dict):
        result = job["result"]
        counts = result.get("summary") or {}
        bad = {k: v for k, v in counts.items() if k != "ok" and v}
        if not result.get("required_ok", not bad):
            what = ", ".join(f"{v} {k}" for k, v in sorted(bad.items())) or "some records are wrong"
            return Health("dns", title, RED, f"Required records are not right ({what}): "
                                             f"mail to you may bounce.")
        if bad:
            what = ", ".join(f"{v} {k}" for k, v in sorted(bad.items()))
            return Health("dns", title, AMBER, f"The required records are right; optional ones are not ({what}).")
        return Health("dns", title, GREEN, "Every record is published as expected.")
    if job and job.get("state") in ("failed", "interrupted"):
        return Health("dns", title, AMBER, f"The last check did not finish: {job.get('error') or job['state']}.")
    if job and job.get("state") == "running":
        return Health("dns", title, AMBER, "A check is running.")
    if setting == "ok":
        return Health("dns", title, GREEN, "The records were right at the last check.")
    if setting:
        return Health("dns", title, AMBER, "The last check found problems; check again.")
    return Health("dns", title, AMBER, "Not checked yet.")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def disk_health(status: Reported) -> Health:
    title = "Disk and memory"
    if isinstance(status, AgentError):
        return Health("disk", title, RED, f"Cannot tell: {_failed(status)}.")
    disk = (status or {}).get("disk") or {}
    if not disk.get("total"):
        return Health("disk", title, AMBER, f"Unknown free space: {disk.get('error', 'no answer')}.")
    share = disk["free"] / disk["total"]
    sentence = f"{_size(disk['free'])} free of {_size(disk['total'])} ({share:.0%})"
    mem = (status or {}).get("memory") or {}
    mem_low = bool(mem.get("total")) and mem.get("available", 0) / mem["total"] < MEMORY_AMBER_FREE
    if mem.get("total"):
        sentence += f"; memory {_size(mem.get('available', 0))} available of {_size(mem['total'])}"
    if share < DISK_RED_FREE:
        return Health("disk", title, RED, sentence + ". The disk is nearly full: mail will soon be refused.")
    if share < DISK_AMBER_FREE or mem_low:
        return Health("disk", title, AMBER, sentence + ". Running low; make room or grow the disk.")
    return Health("disk", title, GREEN, sentence + ".")


def overall(checks: list[Health]) -> str:
    colours = {c.colour for c in checks}
    return RED if RED in colours else (AMBER if AMBER in colours else GREEN)


def _ask(op: Operation, **args: Any) -> dict[str, Any] | AgentError:
    try:
        return op(**args)
    except AgentError as err:
        return err


def health_checks() -> list[Health]:
    dns_job = _ask(jobs_ops.job_latest, kind="dns_check")
    return [
        services_health(_ask(stack_ops.stack_status)),
        cert_health(_ask(cert_ops.cert_status)),
        dns_health(dns_job.get("job") if isinstance(dns_job, dict) else dns_job, state.get_setting("dns_status")),
        disk_health(_ask(setup_ops.system_status)),
    ]


@bp.get("/")
def home() -> ResponseReturnValue:
    checks = health_checks()
    settings = state.settings()
    return render_dashboard("dashboard/home.html", current=NAV.endpoint, checks=checks,
                            overall=overall(checks), domain=settings.get("domain", ""),
                            mail_host=settings.get("mail_host", ""))
