"""The agent's DNS operations: records, check, push, push configuration, network checks.

Thin calls into portal.dns; JSON-able results; DnsErrors become OpErrors that
name the field. The TSIG secret is written to <state>/secrets/rfc2136.key and
never returned or logged.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from portal.agent.registry import Context, OpError, privileged
from portal.core.store import write_settings
from portal.stack import dkim
from portal.dns import DnsError

if TYPE_CHECKING:
    from portal.dns.settings import DnsSettings

# dnspython, idna and the record builders are imported by the operations that
# use them: the agent imports this module at start (see portal/certs/privileged.py).

DEFAULT_SMTP_PROBE = "gmail-smtp-in.l.google.com"


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    try:
        yield
    except DnsError as exc:
        raise OpError("invalid" if exc.field else "dns", exc.message, exc.field) from None
    except dkim.DkimError as exc:
        raise OpError("dkim", str(exc)) from None


def _settings(ctx: Context, dnssec: bool | None = None) -> DnsSettings:
    from portal.dns.settings import load_dns_settings

    s = load_dns_settings(ctx.state_dir, dnssec=dnssec)
    dkim.ensure_keys(s.dkim_dir, s.dkim_selectors)  # the records publish them: make them if missing
    return s


def _servers(s: DnsSettings) -> list[tuple[str, str, int]]:
    from portal.dns.check import authoritative_servers

    if not s.resolvers:
        raise DnsError("dns_resolvers is not set; enter the recursive resolver(s) to look up your zone's name "
                       "servers with, e.g. 9.9.9.9", "dns_resolvers")
    return authoritative_servers(s.zone, list(s.resolvers), auth_port=s.auth_port)


@privileged(web=True, timeout=30.0)
def dns_records(ctx: Context, dnssec: bool = False) -> dict[str, Any]:
    """The expected records, as a BIND fragment and as a table (with notes and the MTA-STS policy)."""
    from portal.dns import records as rec
    from portal.dns.names import normalize_domain

    with refusals():
        s = _settings(ctx, dnssec=dnssec or None)
        rs = rec.records(s)
        return {"domain": s.domain, "domain_unicode": normalize_domain(s.domain).unicode,
                "zone": rec.zone_fragment(rs, s.zone), "table": rec.table(rs), "notes": rec.notes(s),
                "mta_sts_policy": rec.mta_sts_policy_text(s)}


@privileged(web=True, job=True, timeout=10.0)
def dns_check(ctx: Context, progress: Callable[[str, str], None]) -> dict[str, Any]:
    """Ask each authoritative server for every expected record (a job: the wizard's
    "Check now", the dashboard, the daily check)."""
    progress("check", "asking each authoritative server")
    from portal.dns import records as rec
    from portal.dns.check import check, detect_dnssec
    from portal.dns.settings import load_dns_settings

    with refusals():
        s = _settings(ctx)
        servers = _servers(s)
        signed = detect_dnssec(s.zone, servers)
        results = check(rec.records(load_dns_settings(ctx.state_dir, dnssec=signed)), s.zone, servers)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        required_ok = all(r.verdict == "ok" for r in results if r.record.required)
        return {"servers": [list(x) for x in servers], "dnssec": signed, "summary": counts,
                "required_ok": required_ok, "results": [r.as_dict() for r in results]}


@privileged(web=True, timeout=120.0)
def dns_push(ctx: Context, dry_run: bool = False) -> dict[str, Any]:
    """Bring the zone's owned rrsets to the expected records with RFC 2136 (dry_run: only the plan)."""
    from portal.dns import records as rec
    from portal.dns.update import load_update_target, push

    with refusals():
        target = load_update_target(ctx.state_dir)
        if target is None:
            raise OpError("not_configured", "DNS updates are not configured; run "
                                            "dns_configure_push with your DNS provider's server and TSIG key", "rfc2136_server")
        s = _settings(ctx)
        changes = push(target, rec.records(s), dry_run=dry_run)
        return {"dry_run": dry_run, "server": f"{target.server}:{target.port}", "zone": target.zone,
                "changed": sum(c.action != "unchanged" for c in changes) if not dry_run else 0,
                "changes": [c.as_dict() for c in changes]}


@privileged(web=True, timeout=30.0, secret=("secret",))
def dns_configure_push(ctx: Context, server: str, key_name: str, secret: str, algorithm: str = "hmac-sha256",
                       port: int = 53) -> dict[str, Any]:
    """Store the RFC 2136 server and TSIG key (the secret goes to a 0600 file, never back to the caller)."""
    from portal.dns.names import normalize_domain
    from portal.dns.names import parse_port
    from portal.dns.update import TsigKey, write_secret

    with refusals():
        server = (server or "").strip()
        try:
            server = ipaddress.ip_address(server).compressed
        except ValueError:
            server = normalize_domain(server, "rfc2136_server").ascii
        port = parse_port(port, "rfc2136_port")
        key = TsigKey.parse(key_name, secret, algorithm)
        write_secret(ctx.state_dir, key.secret)
        values = {"rfc2136_server": server, "rfc2136_port": str(port), "rfc2136_key_name": key.name,
                  "rfc2136_algorithm": key.algorithm}
        write_settings(ctx.state_dir, values)
        return {**values, "secret_file": str(ctx.state_dir / "secrets" / "rfc2136.key")}


def check_smtp_host(value: str) -> str:
    """The SMTP host net_check greets: empty for the default probe, else a host name
    or a public address (the name is resolved, and checked public, when it is used)."""
    from portal.dns.netcheck import address_kind

    host = value.strip().rstrip(".").lower()
    if not host:
        return DEFAULT_SMTP_PROBE
    fix = "give the name of a mail server on the internet (e.g. an MX host), or leave it empty"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        labels = host.split(".")
        if (len(host) > 253 or len(labels) < 2
                or not all(re.fullmatch(r"(?!-)[a-z0-9-]{1,63}(?<!-)", label) for label in labels)):
            raise DnsError(f"'{value[:60]}' is not a host name; {fix}", "smtp_host") from None
        return host
    kind = address_kind(ip)
    if kind:
        raise DnsError(f"{host} is a {kind} address; {fix}", "smtp_host")
    return host


@privileged(timeout=60.0)
def net_check(ctx: Context, smtp_host: str = "", timeout: float = 5.0) -> dict[str, Any]:
    """Reverse DNS of the public addresses, and whether outbound SMTP gets a greeting:
    port 25 of `smtp_host` (default: a large public MX), which must resolve to public
    addresses only; the result says ok or why not, never what the server said."""
    from portal.dns.netcheck import ptr_check, smtp_outbound_check
    from portal.dns.settings import load_dns_settings

    with refusals():
        if not 1 <= timeout <= 30:
            raise DnsError("give a number of seconds from 1 to 30", "timeout")
        host = check_smtp_host(smtp_host)
        s = load_dns_settings(ctx.state_dir)
        if not s.resolvers:
            raise DnsError("dns_resolvers is not set; enter the recursive resolver(s), e.g. 9.9.9.9",
                           "dns_resolvers")
        results = [ptr_check(ip, s.mail_host, list(s.resolvers), timeout=timeout)
                   for ip in (s.public_ipv4, s.public_ipv6) if ip]
        results.append(smtp_outbound_check(host, timeout=timeout))
        return {"checks": [r.as_dict() for r in results]}
