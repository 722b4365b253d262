"""Client settings: what mail, calendar and contacts apps need, and an Apple profile.

Shown at the end of the wizard and in the dashboard's "Client setup". The
values are pure functions of the settings (domain, mail_host, stack_ports);
the pages' views live in portal/web/steps/deploy.py and portal/web/dashboard/clients.py,
the shared template is templates/_clients.html.
"""

from __future__ import annotations

import json
import plistlib
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Response, request, session
from flask_wtf import FlaskForm
from wtforms import StringField

from portal.web import state
from portal.web.jobs import show_error
from portal.agent.client import AgentError
from portal.stack.accounts import AccountError, check_address
from portal.stack.settings import DEFAULT_PORTS, SettingsError, StackSettings
from portal.stack.web import dav_url
from portal.setup import privileged as setup_ops

MOBILECONFIG_TYPE = "application/x-apple-aspen-config"
# uuid5 namespace of Mailstead's profile payloads (a fixed, random UUID).
PROFILE_NAMESPACE = uuid.UUID("8c0d5f55-7a52-4f3b-9a58-2f4c7b0e6a11")


@dataclass(frozen=True)
class Server:
    id: str
    service: str
    host: str
    port: int
    security: str


def stack_settings(values: dict[str, str]) -> StackSettings:
    """The part of the stack's settings the client page needs (SettingsError if setup is not that far)."""
    domain = (values.get("domain") or "").strip()
    if not domain:
        raise SettingsError("domain", "is not set yet; finish the Domain step first")
    host = (values.get("mail_host") or "").strip() or f"mail.{domain}"
    ports = dict(DEFAULT_PORTS)
    if values.get("stack_ports"):
        try:
            ports.update({str(k): int(v) for k, v in json.loads(values["stack_ports"]).items()})
        except (ValueError, TypeError, AttributeError):
            raise SettingsError("stack_ports", "must be a JSON object of port numbers") from None
    return StackSettings(domain=domain, hostname=host, ports=ports)


def servers(settings: StackSettings) -> list[Server]:
    """Every server a client connects to (the published ports)."""
    p = {**DEFAULT_PORTS, **settings.ports}
    host = settings.hostname
    return [
        Server("imap", "IMAP (incoming)", host, p["imaps"], "SSL/TLS"),
        Server("pop3", "POP3 (incoming)", host, p["pop3s"], "SSL/TLS"),
        Server("smtp", "SMTP (outgoing)", host, p["submissions"], "SSL/TLS"),
        Server("smtp-starttls", "SMTP (outgoing, alternative)", host, p["submission"], "STARTTLS"),
        Server("caldav", "CalDAV (calendars)", host, 443, "HTTPS"),
        Server("carddav", "CardDAV (contacts)", host, 443, "HTTPS"),
        Server("managesieve", "ManageSieve (filters, vacation replies)", host, p["managesieve"], "STARTTLS"),
    ]


def client_values(settings: StackSettings) -> dict[str, Any]:
    """Everything the page shows."""
    return {
        "domain": settings.domain,
        "host": settings.hostname,
        "servers": servers(settings),
        "dav_url": dav_url(settings),
        "autoconfig_url": f"https://autoconfig.{settings.domain}/mail/config-v1.1.xml",
        "autoconfig_host_url": f"https://{settings.hostname}/.well-known/autoconfig/mail/config-v1.1.xml",
    }


def _uuid(domain: str, part: str) -> str:
    return str(uuid.uuid5(PROFILE_NAMESPACE, f"{domain}/{part}")).upper()


def mobileconfig(settings: StackSettings, address: str = "") -> bytes:
    """An unsigned Apple configuration profile (plist XML): IMAP + SMTP mail
    (com.apple.mail.managed), CalDAV and CardDAV. No password: the device asks.
    PayloadUUIDs are stable per domain, so installing it again replaces it."""
    domain, host = settings.domain, settings.hostname
    p = {**DEFAULT_PORTS, **settings.ports}
    ident = ".".join(reversed(domain.split("."))) + ".mailstead"
    dav = dav_url(settings)
    user = {"EmailAddress": address} if address else {}

    def payload(kind: str, name: str, **fields: Any) -> dict[str, Any]:
        return {"PayloadType": kind, "PayloadVersion": 1, "PayloadIdentifier": f"{ident}.{name}",
                "PayloadUUID": _uuid(domain, name), "PayloadDisplayName": fields.pop("display"), **fields}

    mail = payload(
        "com.apple.mail.managed", "mail", display=f"Mail ({domain})",
        EmailAccountDescription=f"Mail at {domain}", EmailAccountName=address or domain,
        EmailAccountType="EmailTypeIMAP", **user,
        IncomingMailServerHostName=host, IncomingMailServerPortNumber=p["imaps"],
        IncomingMailServerUseSSL=True, IncomingMailServerAuthentication="EmailAuthPassword",
        IncomingMailServerUsername=address,
        OutgoingMailServerHostName=host, OutgoingMailServerPortNumber=p["submissions"],
        OutgoingMailServerUseSSL=True, OutgoingMailServerAuthentication="EmailAuthPassword",
        OutgoingMailServerUsername=address, OutgoingPasswordSameAsIncomingPassword=True,
        PreventMove=False, PreventAppSheet=False, SMIMEEnabled=False,
    )
    caldav = payload(
        "com.apple.caldav.account", "caldav", display=f"Calendars ({domain})",
        CalDAVAccountDescription=f"Calendars at {domain}", CalDAVHostName=host, CalDAVPort=443,
        CalDAVUseSSL=True, CalDAVPrincipalURL=dav, CalDAVUsername=address,
    )
    carddav = payload(
        "com.apple.carddav.account", "carddav", display=f"Contacts ({domain})",
        CardDAVAccountDescription=f"Contacts at {domain}", CardDAVHostName=host, CardDAVPort=443,
        CardDAVUseSSL=True, CardDAVPrincipalURL=dav, CardDAVUsername=address,
    )
    profile = {
        "PayloadType": "Configuration", "PayloadVersion": 1, "PayloadIdentifier": ident,
        "PayloadUUID": _uuid(domain, "profile"), "PayloadDisplayName": f"Mail, calendars and contacts at {domain}",
        "PayloadDescription": f"Sets up mail (IMAP and SMTP), calendars and contacts on {host}. "
                              "You are asked for your password when you install it.",
        "PayloadOrganization": domain, "PayloadRemovalDisallowed": False,
        "PayloadContent": [mail, caldav, carddav],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


# -- the page (wizard and dashboard) -----------------------------------------------------------

class ProfileForm(FlaskForm):
    """GET form: an optional address to put in the profile."""

    class Meta:
        csrf = False

    address = StringField("Your email address (optional)", filters=[lambda v: (v or "").strip()],
                          description="Put into the profile, so the device asks only for the password.")


class SendTestForm(FlaskForm):
    to = StringField("Send the test message to", filters=[lambda v: (v or "").strip()],
                     description="A mailbox of this server, normally your administrator mailbox.")


def default_recipient(values: dict[str, str]) -> str:
    return (session.get("admin") or values.get("admin_address")
            or (f"postmaster@{values['domain']}" if values.get("domain") else ""))


def _address_problem(address: str) -> str | None:
    if len(address) > 320:
        return "That is too long for an email address (at most 320 characters)."
    try:
        check_address(address, "address")
    except AccountError as err:
        return err.message
    return None


def profile_download() -> tuple[Response | None, ProfileForm]:
    """The .mobileconfig for ?address=... (optional), or (None, the form with its error)."""
    form = ProfileForm(request.args)
    address = form.address.data or ""
    problem = _address_problem(address) if address else None
    if problem:
        form.address.errors = [problem]
        return None, form
    settings = stack_settings(state.settings())
    body = mobileconfig(settings, check_address(address) if address else "")
    response = Response(body, mimetype=MOBILECONFIG_TYPE)
    response.headers["Content-Disposition"] = f'attachment; filename="mailstead-{settings.domain}.mobileconfig"'
    return response, form


def send_test(form: SendTestForm) -> tuple[str | None, str | None]:
    """Validate and ask the agent to send; returns (success message, page-level error).
    Problems with the address go on form.to."""
    if not form.validate_on_submit():
        return None, None
    to = form.to.data or ""
    problem = (_address_problem(to) if to else
               "Enter the address to send the test message to, such as your administrator mailbox.")
    if problem:
        form.to.errors = [problem]
        return None, None
    try:
        result = setup_ops.send_test_message(to=to)
    except AgentError as err:
        return None, show_error(form, err)
    return (f"Sent to {result.get('to', to)}: the mail server at {result.get('server', 'this appliance')} "
            f"accepted it. Look for “Mailstead test message” in that mailbox."), None


def page_context(test_form: SendTestForm | None = None, profile_form: ProfileForm | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The template context of the client settings page (templates/_clients.html)."""
    values = state.settings()
    try:
        client = client_values(stack_settings(values))
    except SettingsError as err:
        return {"client": None, "problem": f"The setting {err.field} {err.message}", **extra}
    return {
        "client": client,
        "problem": None,
        "test_form": test_form or SendTestForm(formdata=None, to=default_recipient(values)),
        "profile_form": profile_form or ProfileForm(formdata=None),
        **extra,
    }
