"""Certificates step: the CA and challenge (acme_configure), the issue job with live
progress, and the way on: with the CA's certificate, or knowingly self-signed.

`CertPages` holds what the dashboard's Certificates area shares (portal/web/dashboard/certs.py):
the ACME settings form, the issue job and the certificate status.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import BooleanField, RadioField, StringField, SubmitField, TextAreaField
from wtforms.validators import ValidationError

from portal.web import security, state, wizard
from portal.agent.client import AgentError
from portal.web.steps.dns import attach_error, job_status_json, latest_job, start_job, strip
from portal.certs import privileged as cert_ops
from portal.setup import privileged as setup_ops

bp = Blueprint("certs", __name__, url_prefix="/setup")
STEP = wizard.Step(id="certs", endpoint="certs.index", order=40, title="Certificates")

CA_CHOICES = [
    ("letsencrypt", "Let's Encrypt"),
    ("letsencrypt-staging", "Let's Encrypt staging (test certificates that browsers and servers do not trust)"),
    ("custom", "Another CA: enter its ACME directory URL"),
]
CHALLENGE_CHOICES = [
    ("http-01", "HTTP-01: the CA fetches a file from this server on port 80"),
    ("dns-01", "DNS-01: the appliance publishes a TXT record through your DNS updates (RFC 2136)"),
]
LE_URLS = {"https://acme-v02.api.letsencrypt.org/directory": "letsencrypt",
           "https://acme-staging-v02.api.letsencrypt.org/directory": "letsencrypt-staging"}
EMAIL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
MAX_PEM = 48 * 1024
# agent field name -> form field name
AGENT_FIELDS = {"acme_ca_bundle": "acme_ca_bundle_pem"}


def rfc2136_configured(settings: dict[str, str]) -> bool:
    return bool(settings.get("rfc2136_server", "").strip() and settings.get("rfc2136_key_name", "").strip())


class AcmeForm(FlaskForm):
    acme_ca = RadioField("Certificate authority", choices=CA_CHOICES, default="letsencrypt",
                         validate_choice=False)
    acme_directory = StringField("ACME directory URL", filters=[strip],
                                 description="Only for another CA: its ACME directory, e.g. "
                                             "https://acme.example.net/directory.")
    acme_ca_bundle_pem = TextAreaField("CA bundle (PEM, optional)",
                                       description="Only for another CA whose HTTPS certificate this system does "
                                                   "not trust: paste its root certificate(s), "
                                                   "-----BEGIN CERTIFICATE----- … -----END CERTIFICATE-----.")
    acme_contact = StringField("Contact email", filters=[strip],
                               description="The CA may write here about your certificates (optional).")
    acme_challenge = RadioField("How the CA checks that you control the names", choices=CHALLENGE_CHOICES,
                                default="http-01", validate_choice=False)
    save_acme = SubmitField("Save certificate settings")

    def __init__(self, *args: Any, dns01_allowed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dns01_allowed = dns01_allowed

    def validate_acme_ca(self, field: Any) -> None:
        if field.data not in dict(CA_CHOICES):
            raise ValidationError("Choose Let's Encrypt, Let's Encrypt staging or another CA.")

    def validate_acme_directory(self, field: Any) -> None:
        if self.acme_ca.data != "custom":
            return
        if not field.data:
            raise ValidationError("ACME directory URL is required for another CA, e.g. "
                                  "https://acme.example.net/directory.")
        try:
            parts = urlsplit(field.data)
            ok = parts.scheme == "https" and bool(parts.hostname) and len(field.data) <= 2000
        except ValueError:
            ok = False
        if not ok or any(c.isspace() for c in field.data):
            raise ValidationError("ACME directory URL must be an https:// address, e.g. "
                                  "https://acme.example.net/directory.")

    def validate_acme_ca_bundle_pem(self, field: Any) -> None:
        text = (field.data or "").strip()
        if not text or self.acme_ca.data != "custom":
            return
        if len(text) > MAX_PEM:
            raise ValidationError(f"The CA bundle is larger than {MAX_PEM // 1024} KiB; paste only the CA's "
                                  "root certificate(s).")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValidationError("The CA bundle must be PEM certificates: lines from -----BEGIN CERTIFICATE----- "
                                  "to -----END CERTIFICATE-----.")

    def validate_acme_contact(self, field: Any) -> None:
        value = field.data.removeprefix("mailto:")
        if value and (len(value) > 254 or not EMAIL_RE.fullmatch(value)):
            raise ValidationError("Contact email must be an address such as postmaster@example.org, or empty.")

    def validate_acme_challenge(self, field: Any) -> None:
        if field.data not in dict(CHALLENGE_CHOICES):
            raise ValidationError("Choose HTTP-01 or DNS-01.")
        if field.data == "dns-01" and not self.dns01_allowed:
            raise ValidationError("DNS-01 needs DNS updates (RFC 2136): set them up in the DNS step first, "
                                  "or use HTTP-01.")


class ContinueForm(FlaskForm):
    accept_self_signed = BooleanField("I understand the risks and want to continue with the self-signed "
                                      "certificate for now.")
    certs_continue = SubmitField("Continue")
    continue_self_signed = SubmitField("Continue with the self-signed certificate")


def cert_status() -> tuple[dict[str, Any] | None, str | None]:
    try:
        return cert_ops.cert_status(), None
    except AgentError as err:
        return None, err.message


def has_ca_cert(status: dict[str, Any] | None) -> bool:
    return bool(status and status.get("source") == "ca")


def acme_form_from_settings(s: dict[str, str]) -> AcmeForm:
    form = AcmeForm(formdata=None, dns01_allowed=rfc2136_configured(s))
    directory = s.get("acme_directory", "").strip()
    word = LE_URLS.get(directory, directory.lower() if directory.lower() in dict(CA_CHOICES) else "")
    if directory and not word:
        form.acme_ca.data, form.acme_directory.data = "custom", directory
    else:
        form.acme_ca.data = word or "letsencrypt"
    form.acme_contact.data = s.get("acme_contact") or (f"postmaster@{s['domain']}" if s.get("domain") else "")
    form.acme_challenge.data = s.get("acme_challenge") or "http-01"
    return form


def flag(s: dict[str, str], key: str) -> bool:
    return (s.get(key) or "").strip().lower() in ("1", "true", "yes", "on")


class CertPages:
    """The ACME settings form, the issue job and the certificate status for blueprint `bp`
    (its page endpoint `<bp>.index`, rendered by `render(**context)`)."""

    def __init__(self, bp: Blueprint, render: Callable[..., str]) -> None:
        self.bp, self.render = bp, render
        bp.add_url_rule("/certs/settings", "settings", self.settings, methods=["POST"])
        bp.add_url_rule("/certs/issue", "issue", self.issue, methods=["POST"])
        bp.add_url_rule("/certs/issue-status", "issue_status", self.issue_status)

    @property
    def ep(self) -> str:
        return self.bp.name

    def page(self, status: int = 200, **extra: Any) -> ResponseReturnValue:
        s = state.settings()
        cert, cert_error = cert_status()
        job, job_error = latest_job("cert_issue")
        extra.setdefault("acme_form", acme_form_from_settings(s))
        context = dict(
            ep=self.ep, settings=s, cert=cert, cert_error=cert_error, job=job, job_error=job_error,
            after=job["id"] if job and job.get("state") == "done" else "",
            configured=bool(s.get("acme_challenge")), dns01_allowed=rfc2136_configured(s),
            has_ca_cert=has_ca_cert(cert), bundle_stored=bool(s.get("acme_ca_bundle")), **extra)
        return self.render(**context), status

    def settings(self) -> ResponseReturnValue:
        s = state.settings()
        form = AcmeForm(dns01_allowed=rfc2136_configured(s))
        if not form.validate_on_submit():
            return self.page(acme_form=form)
        custom = form.acme_ca.data == "custom"
        pem = (form.acme_ca_bundle_pem.data or "").strip() if custom else ""
        try:
            cert_ops.acme_configure(
                directory=form.acme_directory.data if custom else form.acme_ca.data, contact=form.acme_contact.data, challenge=form.acme_challenge.data,
                include_apex=flag(s, "acme_include_apex"), reuse_key=flag(s, "acme_reuse_key"),
                keep_ca_bundle=custom and not pem, caa_issuer=s.get("acme_caa_issuer", ""), ca_bundle_pem=pem)
        except AgentError as err:
            left = attach_error(form, err, AGENT_FIELDS)
            return self.page(acme_form=form, acme_error=left)
        state.forget()
        security.rotate_csrf()
        flash("Certificate settings saved. Press “Get the certificate” to ask the CA.", "ok")
        return redirect(url_for(f"{self.ep}.index", _anchor="cert-issue"), code=303)

    def issue(self) -> ResponseReturnValue:
        if not FlaskForm().validate_on_submit():
            return self.page(status=400, page_error="The form expired; press the button again.")
        error = start_job("cert_issue")
        if error:
            return self.page(status=503, page_error=f"The request could not start: {error}")
        return redirect(url_for(f"{self.ep}.index", _anchor="cert-issue"), code=303)

    def issue_status(self) -> ResponseReturnValue:
        return job_status_json("cert_issue")


def _render_step(**context: Any) -> str:
    context.setdefault("continue_form", ContinueForm(formdata=None))
    return wizard.render_wizard("wizard/certs.html", current=STEP, **context)


pages = CertPages(bp, _render_step)


@bp.before_request
def earlier_steps_first() -> ResponseReturnValue | None:
    nxt = wizard.next_unfinished(wizard.all_steps(), state.done_steps())
    if nxt is not None and nxt.order < STEP.order:
        return redirect(url_for(nxt.endpoint), code=303 if request.method == "POST" else 302)
    return None


@bp.route("/certs", methods=["GET", "POST"])
def index() -> ResponseReturnValue:
    form = ContinueForm()
    if not form.is_submitted():
        return pages.page(continue_form=ContinueForm(formdata=None))
    if not form.validate():
        return pages.page(status=400, continue_form=form, continue_error="The form expired; press the button again.")
    if form.continue_self_signed.data:
        if not form.accept_self_signed.data:
            form.accept_self_signed.errors = ["Tick this box to continue without a certificate from a CA."]
            return pages.page(continue_form=form)
        choice = "self-signed"
    else:
        cert, error = cert_status()
        if error is not None:
            return pages.page(status=503, continue_form=form, continue_error=f"The agent is unavailable: {error}")
        if not has_ca_cert(cert):
            return pages.page(continue_form=form, continue_error=(
                "No certificate from a CA is installed yet: get one above, or continue with the self-signed "
                "certificate."))
        choice = "ca"
    try:
        setup_ops.wizard_certs_done(choice=choice)
    except AgentError as err:
        return pages.page(status=409, continue_form=form, continue_error=err.message)
    state.forget()
    security.rotate_csrf()
    return redirect(url_for(wizard.INDEX), code=303)
