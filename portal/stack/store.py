"""The stack's settings from state.db, checked again where they are used."""

from __future__ import annotations

import json
from pathlib import Path

from portal.core.store import read_settings

from portal.stack.accounts import check_domain
from portal.stack.settings import SettingsError, StackSettings


def load_settings(state_dir: Path) -> StackSettings:
    """StackSettings from state.db; names the missing setting if setup is not that far,
    and refuses (naming it) a stored value that does not pass its check."""
    values = read_settings(state_dir, strict=True)
    domain = values.get("domain", "").strip()
    if not domain:
        raise SettingsError("domain", "is not set yet; finish the Domain step of the setup wizard first")
    hostname = values.get("mail_host", "").strip() or f"mail.{domain}"
    domain, hostname = check_domain(domain, "domain"), check_domain(hostname, "mail_host")
    kwargs: dict = {}
    if values.get("publish_addresses"):
        kwargs["publish_addresses"] = tuple(a.strip() for a in values["publish_addresses"].split(",") if a.strip())
    if values.get("stack_ports"):
        try:
            kwargs["ports"] = {str(k): int(v) for k, v in json.loads(values["stack_ports"]).items()}
        except (ValueError, TypeError, AttributeError):
            raise SettingsError("stack_ports", "must be a JSON object of port numbers, e.g. {\"smtp\": 25}") from None
    for key in ("message_size_limit_mb", "default_quota_mb"):
        if values.get(key):
            try:
                kwargs[key] = int(values[key])
            except ValueError:
                raise SettingsError(key, "must be a whole number") from None
    if values.get("stack_project"):  # the compose project (several stacks on one engine, e.g. tests)
        kwargs["project"] = values["stack_project"].strip()
    if values.get("dns_servers"):  # where the stack's resolver forwards (default: it recurses itself)
        kwargs["dns_servers"] = tuple(a.strip() for a in values["dns_servers"].split(",") if a.strip())
    if values.get("stack_subnet"):
        kwargs["subnet"] = values["stack_subnet"].strip()
    if values.get("mta_sts_mode"):
        kwargs["mta_sts_mode"] = values["mta_sts_mode"].strip()
    if values.get("tls_cert") and values.get("tls_key"):
        kwargs["tls_cert"], kwargs["tls_key"] = Path(values["tls_cert"]), Path(values["tls_key"])
    return StackSettings(domain=domain, hostname=hostname, state_dir=state_dir, **kwargs).validate()
