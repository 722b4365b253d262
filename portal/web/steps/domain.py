"""Domain step: the mail domain, the mail server's host name, the public
addresses and the DNS resolver.

Names go through portal.dns.names.normalize_domain (the one rule for names
the appliance puts into DNS): the ASCII (punycode) form is stored, both forms
are shown. Addresses are checked with portal.dns.settings.check_ip: public
(global) addresses only, unless the setting dns_allow_private is "1" (labs,
tests). The defaults come from the agent (net_addresses: the interfaces'
global addresses and /etc/resolv.conf's nameservers).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import Field, StringField
from wtforms.validators import ValidationError

from portal.web import state, security, wizard
from portal.agent.client import AgentError
from portal.dns.names import parse_resolvers
from portal.dns.names import Name, normalize_domain
from portal.dns.settings import check_ip, flag
from portal.dns.update import DnsError
from portal.admin import privileged as admin_ops
from portal.setup import privileged as setup_ops
from portal.web.jobs import show_error

bp = Blueprint("domain", __name__, url_prefix="/setup")
STEP = wizard.Step(id="domain", endpoint="domain.index", order=10, title="Domain")

MAX_INPUT = 1000  # longer input is refused before any parsing


def dns_name_problem(value: str, field_label: str, example: str = "") -> str | None:
    """Why `value` is not a usable domain/host name, as a sentence naming the field
    and the fix; None if it is fine."""
    try:
        normalize_domain(value, field_label)
    except DnsError as exc:
        return exc.message
    return None


def strip(value: str | None) -> str:
    return (value or "").strip()


def too_long(field: Field) -> None:
    if len(field.data or "") > MAX_INPUT:
        raise ValidationError(f"{field.label.text} is far too long ({len(field.data)} characters); "
                              "check what you pasted.")


def unicode_form(name: str) -> str:
    """The Unicode form of a stored ASCII name, for display (the name itself if not decodable)."""
    try:
        return normalize_domain(name).unicode if name else ""
    except DnsError:
        return name


def format_resolvers(resolvers: list[tuple[str, int]]) -> str:
    def one(host: str, port: int) -> str:
        if port == 53:
            return host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    return ", ".join(one(h, p) for h, p in resolvers)


class DomainForm(FlaskForm):
    domain = StringField(
        "Domain name", filters=[strip],
        description="The part after the @ in your addresses, e.g. example.org. International names "
                    "(such as bücher.example) are fine.",
    )
    mail_host = StringField(
        "Mail server host name", filters=[strip],
        description="The name other mail servers and your devices connect to. Leave it empty for "
                    "mail. plus your domain.",
    )
    public_ipv4 = StringField(
        "Public IPv4 address", filters=[strip],
        description="The address the internet reaches this server at (your hosting provider shows it). "
                    "It goes into your DNS records.",
    )
    public_ipv6 = StringField(
        "Public IPv6 address (optional)", filters=[strip],
        description="Leave empty if this server has no public IPv6 address.",
    )
    dns_resolvers = StringField(
        "DNS resolver", filters=[strip],
        description="The recursive DNS server(s) this appliance asks to look up your domain's name servers "
                    "when it checks your records and requests certificates; usually your provider's resolver "
                    "(pre-filled from this server's settings) or a public one such as 9.9.9.9. Separate "
                    "several with commas; add a port as 192.0.2.53:5353.",
    )

    def __init__(self, *args: Any, allow_private: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_private = allow_private
        self.domain_name: Name | None = None
        self.mail_host_name: Name | None = None

    def validate_domain(self, field: Field) -> None:
        too_long(field)
        try:
            self.domain_name = normalize_domain(field.data, str(field.label.text))
        except DnsError as exc:
            raise ValidationError(exc.message) from None

    def validate_mail_host(self, field: Field) -> None:
        too_long(field)
        if not field.data:
            if self.domain_name is None:
                return  # the domain's own error says what to do
            field.data = f"mail.{self.domain_name.unicode}"
        try:
            self.mail_host_name = normalize_domain(field.data, str(field.label.text))
        except DnsError as exc:
            raise ValidationError(exc.message) from None

    def _ip(self, field: Field, version: int, required: bool) -> None:
        too_long(field)
        if not field.data and required:
            raise ValidationError(f"Enter this server's public IPv{version} address, e.g. 203.0.113.10; "
                                  "mail servers everywhere need it to reach you.")
        try:
            field.data = check_ip(field.data, version, str(field.label.text), self.allow_private) or ""
        except DnsError as exc:
            raise ValidationError(exc.message) from None

    def validate_public_ipv4(self, field: Field) -> None:
        self._ip(field, 4, required=True)

    def validate_public_ipv6(self, field: Field) -> None:
        self._ip(field, 6, required=False)

    def validate_dns_resolvers(self, field: Field) -> None:
        too_long(field)
        try:
            field.data = format_resolvers(parse_resolvers(field.data, str(field.label.text)))
        except DnsError as exc:
            raise ValidationError(exc.message) from None


def detected() -> tuple[dict[str, list[str]], str | None]:
    """The agent's net_addresses, or empty lists and why they are missing."""
    try:
        found = admin_ops.net_addresses()
    except AgentError as err:
        return {"ipv4": [], "ipv6": [], "resolvers": []}, err.message
    return {k: [str(a) for a in found.get(k, [])] for k in ("ipv4", "ipv6", "resolvers")}, None


@bp.route("/domain", methods=["GET", "POST"])
def index() -> ResponseReturnValue:
    saved = state.settings()
    form = DomainForm(allow_private=flag(saved, "dns_allow_private"))
    error = None
    if form.validate_on_submit():
        assert form.domain_name is not None and form.mail_host_name is not None
        try:  # the agent checks every value again before it stores them
            setup_ops.wizard_domain(domain=form.domain_name.ascii, mail_host=form.mail_host_name.ascii,
                                    public_ipv4=form.public_ipv4.data or "",
                                    public_ipv6=form.public_ipv6.data or "",
                                    dns_resolvers=form.dns_resolvers.data or "")
        except AgentError as err:
            error = show_error(form, err)
        else:
            state.forget()
            security.rotate_csrf()
            return redirect(url_for(wizard.INDEX), code=303)
    found, detect_error = detected()
    if not form.is_submitted():
        form.domain.data = unicode_form(saved.get("domain", ""))
        form.mail_host.data = unicode_form(saved.get("mail_host", ""))
        form.public_ipv4.data = saved.get("public_ipv4") or next(iter(found["ipv4"]), "")
        form.public_ipv6.data = (saved.get("public_ipv6", "") if "domain" in saved
                                 else next(iter(found["ipv6"]), ""))
        form.dns_resolvers.data = saved.get("dns_resolvers") or ", ".join(found["resolvers"])
    names = {key: {"ascii": saved[key], "unicode": unicode_form(saved[key])}
             for key in ("domain", "mail_host") if saved.get(key)}
    return wizard.render_wizard("wizard/domain.html", current=STEP, form=form, names=names,
                                detected=found, detect_error=detect_error or error)
