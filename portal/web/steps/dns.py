"""DNS step: the records to publish, the authoritative check, an optional RFC 2136 push.

The page logic lives in `DnsPages` so the dashboard's DNS area (portal/web/dashboard/dns.py)
serves the same table, check and push with its own layout and URLs. Everything
goes through agent operations: dns_records, the dns_check job, dns_configure_push
(the TSIG secret goes to the agent and is never shown again), dns_push.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, flash, jsonify, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import BooleanField, PasswordField, SelectField, StringField, SubmitField
from wtforms.validators import ValidationError

from portal.web import security, state, wizard
from portal.agent.client import AgentError
from portal.agent import jobs as jobs_ops
from portal.dns import privileged as dns_ops
from portal.setup import privileged as setup_ops
from portal.web.jobs import show_error

bp = Blueprint("dns", __name__, url_prefix="/setup")
STEP = wizard.Step(id="dns", endpoint="dns.index", order=30, title="DNS")

ALGORITHMS = [("hmac-sha256", "HMAC-SHA256"), ("hmac-sha512", "HMAC-SHA512")]
HOST_RE = re.compile(r"^[A-Za-z0-9.:-]+$")


# -- forms -----------------------------------------------------------------------------

def strip(value: str | None) -> str:
    return (value or "").strip()


def _required(label: str) -> Callable[[FlaskForm, Any], None]:
    def check(form: FlaskForm, field: Any) -> None:
        if not field.data:
            raise ValidationError(f"{label} is required.")
    return check


def _server(form: FlaskForm, field: Any) -> None:
    value = field.data
    if not value:
        raise ValidationError("DNS server is required: the name or IP address of your provider's "
                              "primary (update) server, e.g. ns1.example.net or 192.0.2.53.")
    if len(value) > 253 or not HOST_RE.match(value):
        raise ValidationError("DNS server must be a host name or an IP address (letters, digits, "
                              "dots, hyphens; IPv6 with colons), e.g. ns1.example.net.")


def _port(form: FlaskForm, field: Any) -> None:
    value = field.data or "53"
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValidationError("Port must be a number from 1 to 65535 (usually 53).")


def _key_name(form: FlaskForm, field: Any) -> None:
    if not field.data:
        raise ValidationError("Key name is required: the TSIG key name your DNS provider gave you, "
                              "e.g. mailstead-key.")
    if len(field.data) > 253 or not re.match(r"^[A-Za-z0-9._-]+$", field.data):
        raise ValidationError("Key name may contain only letters, digits, dots, hyphens and "
                              "underscores, e.g. mailstead-key.")


def _secret(form: FlaskForm, field: Any) -> None:
    value = "".join((field.data or "").split())
    if not value:
        raise ValidationError("Secret is required (enter it again to change these settings; "
                              "the stored one is never shown).")
    try:
        ok = len(value) <= 1024 and bool(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise ValidationError("The secret is not base64 text: paste it exactly as your DNS provider "
                              "shows it (letters, digits, + / and = padding).")


class PushConfigForm(FlaskForm):
    rfc2136_server = StringField("DNS server", filters=[strip], validators=[_server],
                                 description="Your DNS provider's primary server that accepts updates.")
    rfc2136_port = StringField("Port", filters=[strip], validators=[_port], default="53")
    rfc2136_key_name = StringField("Key name", filters=[strip], validators=[_key_name],
                                   description="The TSIG key's name, as your provider shows it.")
    rfc2136_secret = PasswordField("Secret", validators=[_secret],
                                   description="The TSIG key's secret (base64). Stored by the appliance "
                                               "in a file only it can read; never shown again.")
    rfc2136_algorithm = SelectField("Algorithm", choices=ALGORITHMS, default="hmac-sha256",
                                    validate_choice=False)
    save_push_config = SubmitField("Save update settings")

    def validate_rfc2136_algorithm(self, field: Any) -> None:
        if field.data not in dict(ALGORITHMS):
            raise ValidationError("Choose HMAC-SHA256 or HMAC-SHA512 (the algorithm your provider "
                                  "gave with the key).")


class PushForm(FlaskForm):
    push_records = SubmitField("Push records")
    push_dry_run = SubmitField("Dry run")


class ContinueForm(FlaskForm):
    accept_problems = BooleanField("I understand what will not work yet and want to continue anyway.")
    dns_continue = SubmitField("Continue")


# -- what problems mean ----------------------------------------------------------------

CONSEQUENCES: list[tuple[Callable[[dict[str, Any]], bool], str]] = [
    (lambda r: r["type"] == "MX", "no mail will reach you: other servers do not know where to deliver it"),
    (lambda r: r["type"] in ("A", "AAAA") and r["purpose"].startswith("the mail server"),
     "other servers and your mail apps cannot find this server: no mail will reach you and apps cannot "
     "connect by name"),
    (lambda r: r["purpose"].startswith("SPF"),
     "receivers cannot tell your mail from forgeries: much of what you send lands in spam or is rejected"),
    (lambda r: r["purpose"].startswith("DKIM"),
     "your outgoing mail carries a signature nobody can verify: big providers send it to spam or reject it"),
    (lambda r: r["purpose"].startswith("DMARC"),
     "receivers have no policy for forged mail in your name, and you get no reports about it"),
    (lambda r: r["purpose"].startswith("MTA-STS"),
     "senders do not insist on encrypted delivery to you (a network attacker can downgrade it)"),
    (lambda r: r["purpose"].startswith("TLS-RPT"), "you get no reports when senders fail to reach you over TLS"),
    (lambda r: r["purpose"].startswith("mail client setup") or r["purpose"].startswith("calendar/contacts"),
     "mail, calendar and contacts apps cannot set themselves up from your address: enter the server "
     "names by hand"),
    (lambda r: r["purpose"].startswith("CAA"), "any certificate authority may issue certificates for your domain"),
    (lambda r: r["purpose"].startswith("DANE"), "senders that use DANE cannot authenticate this server"),
]


def consequence(row: dict[str, Any]) -> str:
    return next((text for match, text in CONSEQUENCES if match(row)), "this record's purpose is not served")


VERDICT_WORDS = {"ok": "OK", "missing": "Missing", "different": "Different", "conflicting": "Conflicting",
                 "disagree": "Servers disagree", "error": "Error"}


# -- shared page logic (wizard step and dashboard area) ----------------------------------

def latest_job(kind: str) -> tuple[dict[str, Any] | None, str | None]:
    """The newest job of `kind`, or (None, why the agent could not say)."""
    try:
        return jobs_ops.job_latest(kind=kind).get("job"), None
    except AgentError as err:
        return None, err.message


def job_status_json(kind: str) -> ResponseReturnValue:
    """/jobs/<kind> for jobs.js, except that the finished job the page already shows
    (`?after=<id>`) is not reported again: jobs.js would otherwise reload the page
    (data-done-url) every time it loads."""
    job, error = latest_job(kind)
    if error is not None:
        return jsonify({"job": None, "error": error}), 503
    after = request.args.get("after", "")
    if job and after and job.get("id") == after and job.get("state") == "done":
        return jsonify({"job": None})
    return jsonify({"job": job})


def start_job(kind: str) -> str | None:
    """Start a job of `kind` (no-JavaScript path; jobs.js posts to /jobs/<kind>/start)."""
    from portal.web.jobs import web_job

    try:
        web_job(kind)()
    except AgentError as err:
        return err.message
    return None


def check_summary(job: dict[str, Any] | None) -> dict[str, Any]:
    """What the latest dns_check job says, for the page and the continue decision."""
    if job is None:
        return {"state": "none", "problems": [], "checked": False}
    out: dict[str, Any] = {"state": job.get("state"), "job": job, "checked": False, "problems": []}
    result = job.get("result") if job.get("state") == "done" else None
    if not isinstance(result, dict):
        out["error"] = job.get("error")
        return out
    results = result.get("results") or []
    out.update(checked=True, results=results, counts=result.get("summary") or {},
               servers=result.get("servers") or [], dnssec=result.get("dnssec"),
               required_ok=result.get("required_ok"),
               finished=job.get("finished"))
    problems = [r for r in results if r.get("verdict") != "ok"]
    out["problems"] = [{**r, "consequence": consequence(r)} for r in problems]
    waits = [r.get("visible_by") or {} for r in problems]
    slowest = max(waits, key=lambda v: v.get("seconds", 0), default=None)
    out["visible_by"] = (slowest or {}).get("text") if problems else "Every record is published as expected."
    return out


def merge_rows(table: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The record table with each row's check result (matched by name, type and purpose);
    checked records the table lacks (e.g. TLSA found by the check) are added."""
    results = {(r["name"], r["type"], r["purpose"]): r for r in summary.get("results") or []}
    rows = []
    for i, row in enumerate(table):
        rows.append({**row, "index": i, "check": results.pop((row["name"], row["type"], row["purpose"]), None)})
    for r in results.values():
        rows.append({"name": r["name"], "type": r["type"], "value": r.get("expected", ""), "rdata": r.get("expected", ""),
                     "ttl": "", "purpose": r["purpose"], "required": r.get("required"), "index": len(rows),
                     "check": r})
    return rows


def push_config() -> dict[str, str]:
    s = state.settings()
    return {k: s.get(k, "") for k in ("rfc2136_server", "rfc2136_port", "rfc2136_key_name", "rfc2136_algorithm")}


def attach_error(form: FlaskForm, err: AgentError, fields: dict[str, str] | None = None) -> str | None:
    """The agent's message on the field it names (its `field`); returns what no field took."""
    return show_error(form, err, fields)


class DnsPages:
    """The DNS table, check, zone download and RFC 2136 push for blueprint `bp`,
    whose page endpoint is `<bp>.index` rendered by `render(**context)`."""

    def __init__(self, bp: Blueprint, render: Callable[..., str]) -> None:
        self.bp, self.render = bp, render
        bp.add_url_rule("/dns/zone", "zone", self.zone)
        bp.add_url_rule("/dns/check", "check", self.check, methods=["POST"])
        bp.add_url_rule("/dns/check-status", "check_status", self.check_status)
        bp.add_url_rule("/dns/push-config", "push_config", self.push_config, methods=["POST"])
        bp.add_url_rule("/dns/push", "push", self.push, methods=["POST"])

    @property
    def ep(self) -> str:
        return self.bp.name

    def page(self, status: int = 200, **extra: Any) -> ResponseReturnValue:
        records, records_error = None, None
        try:
            records = dns_ops.dns_records()
        except AgentError as err:
            records_error = err.message
        job, job_error = latest_job("dns_check")
        summary = check_summary(job)
        config = push_config()
        extra.setdefault("config_form", self._config_form(config))
        extra.setdefault("push_form", PushForm())
        context = dict(
            ep=self.ep, records=records, records_error=records_error,
            rows=merge_rows((records or {}).get("table") or [], summary), check=summary, job_error=job_error,
            after=job["id"] if job and job.get("state") == "done" else "",
            push_configured=bool(config["rfc2136_server"]), config=config,
            verdict_words=VERDICT_WORDS, **extra)
        return self.render(**context), status

    def _config_form(self, config: dict[str, str]) -> PushConfigForm:
        form = PushConfigForm(formdata=None)
        form.rfc2136_server.data = config["rfc2136_server"]
        form.rfc2136_port.data = config["rfc2136_port"] or "53"
        form.rfc2136_key_name.data = config["rfc2136_key_name"]
        form.rfc2136_algorithm.data = config["rfc2136_algorithm"] or "hmac-sha256"
        return form

    def zone(self) -> ResponseReturnValue:
        try:
            records = dns_ops.dns_records()
        except AgentError as err:
            return self.page(status=409, page_error=f"The zone file cannot be made: {err.message}")
        domain = re.sub(r"[^a-z0-9.-]", "", str(records.get("domain", "zone")).lower()) or "zone"
        return Response(records["zone"], mimetype="text/plain",
                        headers={"Content-Disposition": f'attachment; filename="{domain}.zone"'})

    def check(self) -> ResponseReturnValue:
        form = FlaskForm()
        if not form.validate_on_submit():
            return self.page(status=400, page_error="The form expired; press Check now again.")
        error = start_job("dns_check")
        if error:
            return self.page(status=503, page_error=f"The check could not start: {error}")
        return redirect(url_for(f"{self.ep}.index", _anchor="dns-check"), code=303)

    def check_status(self) -> ResponseReturnValue:
        return job_status_json("dns_check")

    def push_config(self) -> ResponseReturnValue:
        form = PushConfigForm()
        if form.validate_on_submit():
            try:
                dns_ops.dns_configure_push(server=form.rfc2136_server.data,
                              port=int(form.rfc2136_port.data or "53"), key_name=form.rfc2136_key_name.data,
                              secret="".join(form.rfc2136_secret.data.split()),
                              algorithm=form.rfc2136_algorithm.data)
            except AgentError as err:
                left = attach_error(form, err)
                form.rfc2136_secret.data = ""
                return self.page(status=200, config_form=form, config_error=left)
            security.rotate_csrf()
            flash("DNS update settings saved. Press “Push records” to publish the records.", "ok")
            return redirect(url_for(f"{self.ep}.index", _anchor="dns-push"), code=303)
        form.rfc2136_secret.data = ""
        return self.page(status=200, config_form=form)

    def push(self) -> ResponseReturnValue:
        form = PushForm()
        if not form.validate_on_submit():
            return self.page(status=400, page_error="The form expired; press the button again.")
        dry_run = bool(form.push_dry_run.data)
        try:
            result = dns_ops.dns_push(dry_run=dry_run)
        except AgentError as err:
            return self.page(status=200, push_error=err.message, push_form=form)
        if not dry_run:
            security.rotate_csrf()
        return self.page(status=200, push_result=result, push_form=PushForm(formdata=None))


def _render_step(**context: Any) -> str:
    context.setdefault("continue_form", ContinueForm(formdata=None))
    return wizard.render_wizard("wizard/dns.html", current=STEP, **context)


pages = DnsPages(bp, _render_step)


@bp.before_request
def earlier_steps_first() -> ResponseReturnValue | None:
    """The step's helper routes (zone, check, push) wait for the earlier steps too."""
    nxt = wizard.next_unfinished(wizard.all_steps(), state.done_steps())
    if nxt is not None and nxt.order < STEP.order:
        return redirect(url_for(nxt.endpoint), code=303 if request.method == "POST" else 302)
    return None


def dns_status(summary: dict[str, Any]) -> str:
    return "ok" if summary.get("checked") and not summary.get("problems") else "problems"


@bp.route("/dns", methods=["GET", "POST"])
def index() -> ResponseReturnValue:
    form = ContinueForm()
    if form.is_submitted() and form.dns_continue.data:
        if not form.validate():
            return pages.page(status=400, continue_form=form,
                              continue_error="The form expired; press Continue again.")
        job, error = latest_job("dns_check")
        if error is not None:
            return pages.page(status=503, continue_form=form, continue_error=f"The agent is unavailable: {error}")
        status = dns_status(check_summary(job))
        if status != "ok" and not form.accept_problems.data:
            form.accept_problems.errors = [
                "Tick this box to continue with the problems listed above, or fix them and check again."]
            return pages.page(status=200, continue_form=form)
        try:  # the agent decides again from its own record of the check
            setup_ops.wizard_dns_done(accept_problems=bool(form.accept_problems.data))
        except AgentError as err:
            left = show_error(form, err)
            return pages.page(status=409 if left else 200, continue_form=form, continue_error=left)
        state.forget()
        security.rotate_csrf()
        return redirect(url_for(wizard.INDEX), code=303)
    return pages.page(continue_form=ContinueForm(formdata=None))
