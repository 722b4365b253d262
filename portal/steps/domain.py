"""Domain step: the mail domain and the mail server's host name."""

from __future__ import annotations

import re

from flask import Blueprint, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import Field, StringField
from wtforms.validators import ValidationError

from .. import db, security, wizard

bp = Blueprint("domain", __name__, url_prefix="/setup")
STEP = wizard.Step(id="domain", endpoint="domain.index", order=10, title="Domain")

LABEL_RE = re.compile(r"^[a-z0-9-]+$")


def dns_name_problem(value: str, field_label: str, example: str) -> str | None:
    """Why `value` (already stripped and lower-cased) is not a usable DNS host
    name, as a sentence naming the field and the fix; None if it is fine."""
    if not value:
        return f"{field_label} is required. Enter a name such as {example}."
    if "@" in value:
        return (f"{field_label} “{value}” is an email address. "
                f"Enter only the name after the @, such as {example}.")
    if "/" in value or ":" in value:
        return (f"{field_label} “{value}” looks like a web address. "
                f"Enter only the name, without http:// or slashes, such as {example}.")
    labels = value.split(".")
    ascii_labels = []
    for label in labels:
        try:
            ascii_labels.append(label if label.isascii() else label.encode("idna").decode("ascii"))
        except UnicodeError:
            return (f"{field_label} “{value}” is not a valid domain name. "
                    f"Use letters, digits and hyphens between dots, such as {example}.")
    if any(label and not LABEL_RE.match(label) for label in ascii_labels):
        return (f"{field_label} “{value}” contains characters that are not allowed. "
                f"Use only letters, digits and hyphens between the dots, such as {example}.")
    if len(labels) < 2:
        return (f"{field_label} “{value}” needs at least one dot: enter the full name, "
                f"such as {example}.")
    if "" in labels:
        return (f"{field_label} “{value}” has an empty part between dots. "
                f"Remove the extra dot, as in {example}.")
    for label in ascii_labels:
        if len(label) > 63:
            return (f"{field_label} has a part longer than 63 characters (“{label[:20]}…”). "
                    f"Each part between dots must be 1 to 63 characters.")
        if label.startswith("-") or label.endswith("-"):
            return (f"{field_label} “{value}”: a part between dots cannot start or end "
                    f"with a hyphen (“{label}”). Remove or move the hyphen.")
    ascii_name = ".".join(ascii_labels)
    if len(ascii_name) > 253:
        return (f"{field_label} is too long ({len(ascii_name)} characters); "
                f"a domain name has at most 253. Use a shorter name such as {example}.")
    if ascii_labels[-1].isdigit():
        return (f"{field_label} “{value}” looks like an IP address. "
                f"Enter a domain name ending in a top-level domain, such as {example}.")
    return None


def normalize(value: str | None) -> str:
    return (value or "").strip().lower().rstrip(".")


class DnsName:
    """WTForms validator wrapping :func:`dns_name_problem`."""

    def __init__(self, example: str) -> None:
        self.example = example

    def __call__(self, form: FlaskForm, field: Field) -> None:
        problem = dns_name_problem(field.data, str(field.label.text), self.example)
        if problem:
            raise ValidationError(problem)


class DomainForm(FlaskForm):
    domain = StringField(
        "Domain name",
        filters=[normalize],
        validators=[DnsName("example.com")],
        description="The part after the @ in your addresses.",
    )
    mail_host = StringField(
        "Mail server host name",
        filters=[normalize],
        validators=[DnsName("mail.example.com")],
        description="The name other mail servers connect to; usually mail. plus your domain.",
    )


@bp.route("/domain", methods=["GET", "POST"])
def index() -> ResponseReturnValue:
    form = DomainForm()
    if form.validate_on_submit():
        db.save_step("domain", {"domain": form.domain.data, "mail_host": form.mail_host.data})
        security.rotate_csrf()
        return redirect(url_for(wizard.INDEX), code=303)
    if not form.is_submitted():
        saved = db.get_settings()
        form.domain.data = saved.get("domain", "")
        form.mail_host.data = saved.get("mail_host", "")
    return wizard.render_wizard("wizard/domain.html", current=STEP, form=form)
