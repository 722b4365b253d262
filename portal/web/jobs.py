"""The web process's way to the agent: calls, field-tied errors, background jobs.

Pages call `call(op, **args)`; an AgentError whose message starts with
"<field>:" (the agent's convention for bad input) is shown on that form field
by `show_error(form, err)`, anything else as a page-level message. Long work
(deploy, certificate issue, DNS check) runs as agent jobs: the `jobs`
blueprint starts them (POST, CSRF-checked) and reports progress as JSON for
static/jobs.js, which polls without reloading the page.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, current_app, jsonify
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm

from portal.agent.client import AgentClient, AgentError

# The jobs the web may start (the agent has its own allowlist too).
WEB_JOBS = frozenset({"stack_deploy", "cert_issue", "dns_check", "setup_deploy", "backup_run", "backup_verify"})


def call(op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
    """Run agent operation `op`; raises AgentError (its message is safe to show)."""
    client = AgentClient(current_app.config["AGENT_SOCKET"],
                         timeout=timeout or current_app.config.get("AGENT_CALL_TIMEOUT", 30.0))
    return client.call(op, **args)


def show_error(form: FlaskForm, err: AgentError, fields: dict[str, str] | None = None) -> str | None:
    """Attach the agent's "<field>: message" to the form's field (names mapped by
    `fields`, agent name -> form name); returns the message if no field took it."""
    name, sep, message = err.message.partition(":")
    name = name.strip()
    target = (fields or {}).get(name, name)
    if sep and target in form._fields and err.code in ("invalid", "bad_args", "not_configured"):
        form._fields[target].errors = [*form._fields[target].errors, message.strip()]
        return None
    return err.message


bp = Blueprint("jobs", __name__, url_prefix="/jobs")


def _kind(kind: str) -> str:
    if kind not in WEB_JOBS:
        abort(404)
    return kind


@bp.post("/<kind>/start")
def start(kind: str) -> ResponseReturnValue:
    """Start (or rejoin) a job; the page keeps polling /jobs/<kind>."""
    try:
        job = call("job_start", kind=_kind(kind))
    except AgentError as err:
        return jsonify({"state": "failed", "error": err.message}), 503
    return jsonify(job), 202


@bp.get("/<kind>")
def latest(kind: str) -> ResponseReturnValue:
    """The newest job of `kind` as JSON: {"job": null} or the job with its events."""
    try:
        return jsonify(call("job_latest", kind=_kind(kind)))
    except AgentError as err:
        return jsonify({"job": None, "error": err.message}), 503
