"""Checks outside the zone: reverse DNS of the public IPs, outbound SMTP (port 25)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import asdict, dataclass

import dns.exception
import dns.resolver

from portal.dns.check import make_resolver


@dataclass(frozen=True)
class NetCheck:
    id: str
    status: str      # ok | missing | different | blocked | error
    message: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def ptr_check(ip: str, expected_host: str, resolvers: list[tuple[str, int]], timeout: float = 3.0) -> NetCheck:
    """The reverse DNS of `ip` through the resolvers, compared with `expected_host`."""
    host = expected_host.rstrip(".").lower()
    fix = f"ask your hosting provider to set the reverse DNS of {ip} to {host}"
    name = ipaddress.ip_address(ip).reverse_pointer
    try:
        answer = make_resolver(resolvers, timeout).resolve(name + ".", "PTR", raise_on_no_answer=False)
        got = sorted(r.target.to_text(omit_final_dot=True).lower() for r in answer.rrset or [])
    except dns.resolver.NXDOMAIN:
        got = []
    except (dns.resolver.LifetimeTimeout, dns.resolver.NoNameservers, dns.exception.DNSException) as err:
        return NetCheck(f"ptr:{ip}", "error", f"could not look up the reverse DNS of {ip} ({type(err).__name__})",
                        "check the dns_resolvers setting and the network, then check again")
    if not got:
        return NetCheck(f"ptr:{ip}", "missing", f"{ip} has no reverse DNS (PTR) name; many mail servers refuse "
                                                "mail from such addresses", fix)
    if got != [host]:
        return NetCheck(f"ptr:{ip}", "different", f"the reverse DNS of {ip} is {', '.join(got)}, not {host}", fix)
    return NetCheck(f"ptr:{ip}", "ok", f"the reverse DNS of {ip} is {host}", "")


def smtp_outbound_check(host: str, port: int = 25, timeout: float = 5.0) -> NetCheck:
    """Open a TCP connection to an SMTP server and read its 220 greeting."""
    blocked = (f"outbound port {port} appears blocked: ask your provider to open it (many VPS providers block "
               "it until asked)")
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            banner = conn.recv(512).decode("ascii", "replace").strip()
    except (TimeoutError, socket.timeout):
        return NetCheck("smtp_outbound", "blocked", f"no answer from {host} port {port} within {timeout:g} s; "
                        f"{blocked}", f"ask your provider to open outbound port {port}")
    except OSError as err:
        return NetCheck("smtp_outbound", "blocked", f"cannot connect to {host} port {port} "
                        f"({err.strerror or err}); {blocked}", f"ask your provider to open outbound port {port}")
    if not banner.startswith("220"):
        return NetCheck("smtp_outbound", "error", f"{host} port {port} answered {banner[:80]!r} instead of an "
                        "SMTP greeting (220)", "something between this server and the internet intercepts "
                        "port 25; ask your provider")
    return NetCheck("smtp_outbound", "ok", f"outbound port {port} is open ({host} greets: {banner[:80]})", "")
