"""Deploy step: start the mail stack (live progress per service), then the client
settings, a test message, and Finish (which ends setup and deletes the token).

The deploy runs as the agent job `setup_deploy` (portal/setup/privileged.py), so a
reload, a second tab or a restarted agent find it again; an interrupted or
failed deploy is offered again ("Deploy again"), which is safe to repeat.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, redirect, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from werkzeug.routing import BuildError

from portal.web import clientsetup, security, state, wizard
from portal.agent.client import AgentError
from portal.stack.settings import SERVICES
from portal.agent import jobs as jobs_ops
from portal.setup import privileged as setup_ops

bp = Blueprint("deploy", __name__, url_prefix="/setup")
STEP = wizard.Step(id="deploy", endpoint="deploy.index", order=50, title="Deploy")
JOB = "setup_deploy"

# What a service's last progress event means, in words and as a state class.
STATE_WORDS = {"healthy": "running and healthy", "waiting": "waiting to start"}


class StartForm(FlaskForm):
    """The Deploy / Deploy again button (CSRF only)."""


class FinishForm(FlaskForm):
    """The Finish button (CSRF only)."""


def service_progress(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each service's latest state from a deploy job's events (pure): postfix "healthy",
    dovecot "running/starting", ... or "waiting" before its first event."""
    latest: dict[str, str] = {}
    for event in events or []:
        step = str(event.get("step", ""))
        if step in SERVICES:
            latest[step] = str(event.get("detail", ""))
    out = []
    for service in SERVICES:
        detail = latest.get(service, "waiting")
        state = "ok" if detail == "healthy" else ("waiting" if detail == "waiting" else
                                                  ("bad" if "unhealthy" in detail or "exited" in detail
                                                   else "busy"))
        out.append({"service": service, "detail": STATE_WORDS.get(detail, detail), "state": state})
    return out


def login_url() -> str:
    try:
        return url_for("auth.login")
    except BuildError:  # the login page's module is not there (yet)
        return "/login"


def deployed() -> bool:
    return state.get_setting("stack_deployed") == "1"


@bp.before_request
def earlier_steps_first() -> ResponseReturnValue | None:
    """This blueprint's other pages (client settings, Finish) need the steps before Deploy done."""
    nxt = wizard.next_unfinished(wizard.all_steps(), state.done_steps())
    if nxt is not None and nxt.order < STEP.order:
        return redirect(url_for(nxt.endpoint), code=303)
    return None


def latest_job() -> tuple[dict[str, Any] | None, str | None]:
    try:
        return jobs_ops.job_latest(kind=JOB).get("job"), None
    except AgentError as err:
        return None, err.message


@bp.get("/deploy")
def index() -> ResponseReturnValue:
    job, agent_error = latest_job()
    job_state = job["state"] if job else None
    return wizard.render_wizard(
        "wizard/deploy.html", current=STEP, form=StartForm(), job=job, job_state=job_state,
        services=service_progress(job["events"] if job else []), deployed=deployed(),
        agent_error=agent_error,
        again=job_state in ("failed", "interrupted") or (deployed() and job_state != "running"),
    )


@bp.post("/deploy/start")
def start() -> ResponseReturnValue:
    """Without JavaScript (static/jobs.js posts to /jobs/setup_deploy/start instead)."""
    form = StartForm()
    if form.validate_on_submit():
        try:
            setup_ops.setup_deploy()
        except AgentError as err:
            job, _ = latest_job()
            return wizard.render_wizard(
                "wizard/deploy.html", current=STEP, form=form, job=job, job_state=job and job["state"],
                services=service_progress(job["events"] if job else []), deployed=deployed(),
                agent_error=err.message, again=True), 503
    return redirect(url_for("deploy.index"), code=303)


def _clients_page(status: int = 200, **context: Any) -> ResponseReturnValue:
    ctx = clientsetup.page_context(**context)
    if ctx["client"] is None:
        status = 409
    return wizard.render_wizard("wizard/clients.html", current=STEP,
                                urls={"test": url_for("deploy.test_message"),
                                      "profile": url_for("deploy.profile")}, **ctx), status


@bp.get("/deploy/clients")
def clients() -> ResponseReturnValue:
    if not deployed():
        return redirect(url_for("deploy.index"), code=303)
    return _clients_page()


@bp.post("/deploy/clients/test")
def test_message() -> ResponseReturnValue:
    if not deployed():
        return redirect(url_for("deploy.index"), code=303)
    form = clientsetup.SendTestForm()
    sent, error = clientsetup.send_test(form)
    status = 200 if sent else (422 if form.errors else (502 if error else 200))
    return _clients_page(status, test_form=form, sent=sent, test_error=error)


@bp.get("/deploy/profile.mobileconfig")
def profile() -> ResponseReturnValue:
    if not clientsetup.page_context()["client"]:
        return _clients_page()
    response, form = clientsetup.profile_download()
    if response is None:
        return _clients_page(422, profile_form=form)
    return response


@bp.post("/deploy/finish")
def finish() -> ResponseReturnValue:
    form = FinishForm()
    if not form.validate_on_submit():
        return redirect(url_for("deploy.clients"), code=303)
    try:
        setup_ops.setup_finish()
    except AgentError as err:
        return _clients_page(409 if err.code == "not_ready" else 503, finish_error=err.message)
    session.clear()
    security.rotate_csrf()
    return redirect(login_url(), code=303)
