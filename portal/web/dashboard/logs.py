"""Dashboard: the last lines of each service's log (agent stack_logs, at most 500 lines)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import IntegerField, SelectField
from wtforms.validators import InputRequired, NumberRange

from portal.agent.client import AgentError
from portal.setup.privileged import MAX_LOG_LINES
from portal.stack.settings import SERVICES
from portal.web.dashboard import Nav, render_dashboard
from portal.setup import privileged as setup_ops

bp = Blueprint("logs", __name__, url_prefix="/admin/logs")
NAV = Nav(70, "Logs", "logs.index")

DEFAULT_LINES = 50
LINES_MESSAGE = f"Enter a number of lines from 1 to {MAX_LOG_LINES}."


class LogsForm(FlaskForm):
    """A GET form (nothing changes), so no CSRF token."""

    class Meta:
        csrf = False

    service = SelectField("Service", choices=[("all", "All services")] + [(s, s) for s in SERVICES],
                          default="all")
    lines = IntegerField("Lines", default=DEFAULT_LINES,
                         validators=[InputRequired(LINES_MESSAGE), NumberRange(1, MAX_LOG_LINES, LINES_MESSAGE)])


def explain(err: AgentError) -> str:
    if err.code == "docker_unavailable":
        return f"The docker engine is unavailable: {err.message}"
    return err.message


def fetch(services: list[str], lines: int) -> list[dict[str, Any]]:
    out = []
    for service in services:
        try:
            result = setup_ops.stack_logs(service=service, lines=lines)
            out.append({"service": service, "lines": result.get("lines", []), "error": None})
        except AgentError as err:
            out.append({"service": service, "lines": [], "error": explain(err)})
            if err.code in ("docker_unavailable", "unavailable", "timeout"):
                # the same answer for every service: say it once
                return out
    return out


@bp.get("/")
def index() -> ResponseReturnValue:
    form = LogsForm(request.args if request.args else None)
    status = 200
    if request.args and not form.validate():
        if form.lines.errors:
            form.lines.errors = [LINES_MESSAGE]
        return render_dashboard("dashboard/logs.html", current=NAV.endpoint, form=form, logs=[]), 422
    chosen = form.service.data if form.service.data in SERVICES else "all"
    services = list(SERVICES) if chosen == "all" else [chosen]
    logs = fetch(services, form.lines.data or DEFAULT_LINES)
    return render_dashboard("dashboard/logs.html", current=NAV.endpoint, form=form, logs=logs), status
