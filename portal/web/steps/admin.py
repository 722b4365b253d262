"""Admin step: the administrator's address and password, TOTP enrolment and
recovery codes.

The agent makes and keeps the TOTP secret (admin_totp_begin; the same one
until admin_setup succeeds, so a reload shows the same QR code) and stores the
admin record (admin_setup). This page renders the QR code as inline SVG from
the otpauth:// URI the agent returns, shows the recovery codes once, and marks
the step done when the owner says they have saved them.
"""

from __future__ import annotations

import functools
from typing import Any

from flask import Blueprint, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from markupsafe import Markup
from wtforms import PasswordField, StringField
from wtforms.validators import EqualTo, ValidationError

from portal.web import state, security, wizard
from portal.agent.client import AgentError
from portal.web.jobs import show_error
from portal.dns.names import normalize_domain
from portal.dns.update import DnsError
from portal.admin import privileged as admin_ops
from portal.setup import privileged as setup_ops

bp = Blueprint("admin", __name__, url_prefix="/setup")
STEP = wizard.Step(id="admin", endpoint="admin.index", order=20, title="Administrator")

MIN_PASSWORD = 12
MAX_PASSWORD = 1024


def check_new_password(password: str) -> None:
    """The rules for a new administrator password (the wizard's and the Account page's);
    ValidationError with the fix."""
    if len(password) < MIN_PASSWORD:
        raise ValidationError(f"Use at least {MIN_PASSWORD} characters (this one has {len(password)}).")
    if len(password) > MAX_PASSWORD:
        raise ValidationError(f"Use at most {MAX_PASSWORD} characters.")
    if any(ch in password for ch in "\0\n\r"):
        raise ValidationError("The password must not contain line breaks or NUL characters.")


def repeats(field_name: str, what: str = "password") -> EqualTo:
    """The validator of a new password's second field: the same as `field_name`."""
    return EqualTo(field_name, message=f"The two {what}s are not the same; type the {what} again.")


@functools.lru_cache(maxsize=4)
def qr_svg(uri: str) -> Markup:
    """The QR code of `uri` as an inline <svg> (path only: nothing from the URI is in the markup).

    Rendering takes tens of milliseconds and the page is reloaded on every
    form error, so the last four are kept in this process's memory (which
    is given the pending secret on every render anyway; nothing is written)."""
    import qrcode
    import qrcode.image.svg

    svg = qrcode.make(uri, image_factory=qrcode.image.svg.SvgPathImage, border=2).to_string(encoding="unicode")
    svg = svg[svg.index("<svg"):]  # no XML declaration inside HTML
    svg = svg.replace("<svg ", '<svg id="totp-qr" class="qr" role="img" '
                               'aria-label="QR code for your authenticator app" ', 1)
    return Markup(svg)  # noqa: S704 - made by qrcode from a fixed alphabet, see docstring


def domain_unicode(ascii_domain: str) -> str:
    try:
        return normalize_domain(ascii_domain).unicode
    except DnsError:
        return ascii_domain


class AdminForm(FlaskForm):
    address = StringField(
        "Administrator address",
        description="Your own mailbox on this appliance and the name you sign in to the dashboard with. "
                    "It must be in your domain.",
    )
    password = PasswordField(
        "Password",
        description=f"At least {MIN_PASSWORD} characters; a few random words work well. "
                    "It is for both the dashboard and the mailbox.",
    )
    password_confirm = PasswordField("Password again", validators=[repeats("password")])
    totp_code = StringField(
        "Code from your authenticator app",
        description="After scanning the QR code, enter the 6-digit code the app shows.",
    )

    def __init__(self, *args: Any, domain: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.domain = domain

    def validate_address(self, field: StringField) -> None:
        field.data = (field.data or "").strip()
        if not field.data:
            raise ValidationError(f"Enter the administrator's address, e.g. postmaster@{self.domain}.")
        if len(field.data) > 254 or field.data.count("@") != 1:
            raise ValidationError(f"Enter one address as name@domain, e.g. postmaster@{self.domain}.")

    def validate_password(self, field: PasswordField) -> None:
        password = field.data or ""
        check_new_password(password)
        address = (self.address.data or "").strip().lower()
        if address and password.strip().lower() in (address, address.partition("@")[0]):
            raise ValidationError("The password must not be the address itself; choose something others "
                                  "cannot guess.")

    def validate_totp_code(self, field: StringField) -> None:
        field.data = "".join((field.data or "").split())
        if not (len(field.data) == 6 and field.data.isascii() and field.data.isdigit()):
            raise ValidationError("Enter the 6-digit code your authenticator app shows (digits only).")


class SavedForm(FlaskForm):
    pass


def enrolment(address: str, fallback: str) -> tuple[dict[str, Any] | None, str | None]:
    """The agent's pending TOTP enrolment for `address` (or `fallback` if the agent
    refuses `address`): (result, None) or (None, why not)."""
    for candidate in dict.fromkeys((address, fallback)):
        try:
            return admin_ops.admin_totp_begin(address=candidate), None
        except AgentError as err:
            problem = err.message
            if err.code not in ("invalid", "bad_args"):
                break
    return None, problem


def admin_status() -> dict[str, Any]:
    try:
        return admin_ops.admin_status()
    except AgentError:
        return {"configured": False}


@bp.route("/admin", methods=["GET", "POST"])
def index() -> ResponseReturnValue:
    settings = state.settings()
    domain = domain_unicode(settings.get("domain", ""))
    default_address = settings.get("admin_address") or f"postmaster@{domain}"
    form = AdminForm(domain=domain)
    error = None
    if form.validate_on_submit():
        try:
            result = admin_ops.admin_setup(address=form.address.data, password=form.password.data,
                          totp_code=form.totp_code.data)
        except AgentError as err:
            error = show_error(form, err)
        else:
            state.forget()
            security.rotate_csrf()
            return wizard.render_wizard("wizard/admin_codes.html", current=STEP,
                                        address=result["address"], codes=result["recovery_codes"],
                                        saved_form=SavedForm())
    if not form.is_submitted():
        form.address.data = default_address
    totp, totp_error = enrolment(form.address.data or default_address, default_address)
    admin_state = admin_status()
    return wizard.render_wizard(
        "wizard/admin.html", current=STEP, form=form, error=error, totp=totp, totp_error=totp_error,
        qr=qr_svg(totp["uri"]) if totp else None, admin_state=admin_state, saved_form=SavedForm(),
        step_done="admin" in state.done_steps(),
    )


@bp.post("/admin/saved")
def saved() -> ResponseReturnValue:
    """The owner has saved the recovery codes: the step is done."""
    form = SavedForm()
    if not form.validate_on_submit():
        return redirect(url_for("admin.index"), code=303)
    try:
        setup_ops.wizard_admin_done()
    except AgentError:
        return redirect(url_for("admin.index"), code=303)
    state.forget()
    security.rotate_csrf()
    return redirect(url_for(wizard.INDEX), code=303)
