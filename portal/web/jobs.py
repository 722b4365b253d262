"""The web process's side of agent errors and background jobs.

Pages call operations through their stubs (`from portal.stack.privileged import
mailbox_create; mailbox_create(address=..., ...)`). An AgentError carries its
`field` as data: `show_error(form, err)` puts the message on that form field,
anything else is shown as a page-level message. Long work (deploy, certificate
issue, DNS check, backups) runs as agent jobs: the `jobs` blueprint starts the
ones that take no arguments (POST, CSRF-checked) and reports progress as JSON
for static/jobs.js, which polls without reloading the page. Which jobs the web
may start is the operations' own declaration (web=True, job=True).
"""

from __future__ import annotations

from flask import Blueprint, abort, jsonify
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm

from portal.agent import jobs as jobs_ops
from portal.agent.client import AgentError
from portal.agent.registry import Operation, load_all

FIELD_CODES = ("invalid", "bad_args", "not_configured")


def show_error(form: FlaskForm, err: AgentError, fields: dict[str, str] | None = None) -> str | None:
    """Attach the agent's message to the form field it names (agent names mapped to
    form names by `fields`); returns the message if no field took it."""
    target = (fields or {}).get(err.field or "", err.field or "")
    if target and target in form._fields and err.code in FIELD_CODES:
        form._fields[target].errors = [*form._fields[target].errors, err.message]
        return None
    return err.message


bp = Blueprint("jobs", __name__, url_prefix="/jobs")


def web_job(kind: str) -> Operation:
    """The job operation `kind`, if the web may start it with no arguments; else 404."""
    op = load_all().get(kind)
    if op is None or not (op.job and op.web) or any(p.required for p in op.params.values()):
        abort(404)
    return op


@bp.post("/<kind>/start")
def start(kind: str) -> ResponseReturnValue:
    """Start (or rejoin) a job; the page keeps polling /jobs/<kind>."""
    op = web_job(kind)
    try:
        job = op()
    except AgentError as err:
        status = 503 if err.code in ("unavailable", "timeout") else 409
        return jsonify({"state": "failed", "error": err.message, "field": err.field}), status
    return jsonify(job), 202


@bp.get("/<kind>")
def latest(kind: str) -> ResponseReturnValue:
    """The newest job of `kind` as JSON: {"job": null} or the job with its events."""
    web_job(kind)
    try:
        return jsonify(jobs_ops.job_latest(kind=kind))
    except AgentError as err:
        return jsonify({"job": None, "error": err.message}), 503
