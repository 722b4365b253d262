"""Checks outside the zone: reverse DNS of the public IPs, outbound SMTP (port 25).

The outbound check is the agent greeting a mail server on the internet as root,
so it is held to one purpose (net_check in portal/dns/privileged.py): port 25
only, a host that resolves (once: the connection goes to that address) to public
addresses only, and the result says whether a 220 greeting came, never what the
server said. It cannot be pointed at this machine, the local network or any
other port, nor read a service's banner.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import asdict, dataclass

import dns.exception
import dns.resolver

from portal.dns.check import make_resolver


SMTP_PORT = 25


class AddressRefused(ValueError):
    """A host name that does not resolve, or resolves to an address that is not public."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """None for a public (global unicast) address, else what it is: loopback, private, ..."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("unspecified", ip.is_unspecified), ("multicast", ip.is_multicast),
                       ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if test:
            return kind
    return None if ip.is_global else "non-public"


def resolve_public(host: str, port: int, allow_private: bool = False, setting: str = "") -> list[str]:
    """The addresses `host` resolves to, resolved once: connect to these, never to the
    name again. Unless `allow_private`, every one must be public (AddressRefused says
    which is not; `setting` names the command that allows private ones)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise AddressRefused(f"{host} does not resolve ({getattr(err, 'strerror', None) or type(err).__name__})") from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    if not addresses:
        raise AddressRefused(f"{host} does not resolve")
    if not allow_private:
        for a in addresses:
            kind = address_kind(ipaddress.ip_address(a))
            if kind:
                allow = (f" unless the owner allows private ones (as root: mailstead {setting} on)"
                         if setting else "")
                raise AddressRefused(f"{host} resolves to {a}, a {kind} address; only public addresses are "
                                     f"reached{allow}")
    return addresses


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


def smtp_outbound_check(host: str, timeout: float = 5.0, *, port: int = SMTP_PORT,
                        allow_private: bool = False) -> NetCheck:
    """Open a TCP connection to port 25 of the SMTP server `host` (resolved once, to
    public addresses only) and see whether it greets with 220. The greeting itself is
    never returned. (`port` and `allow_private` are for tests on loopback; the agent's
    net_check never passes them.)"""
    fix = f"ask your provider to open outbound port {port}"
    blocked = (f"outbound port {port} appears blocked: ask your provider to open it (many VPS providers block "
               "it until asked)")
    try:
        addresses = resolve_public(host, port, allow_private)
    except AddressRefused as err:
        return NetCheck("smtp_outbound", "error", f"{err.reason}; give the name of a mail server on the internet",
                        "leave the SMTP host empty to greet the default one")
    greeting = b""
    try:
        with socket.create_connection((addresses[0], port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            while len(greeting) < 4 and b"\n" not in greeting:
                chunk = conn.recv(512)
                if not chunk:
                    break
                greeting += chunk
    except (TimeoutError, socket.timeout):
        return NetCheck("smtp_outbound", "blocked", f"no answer from {host} port {port} within {timeout:g} s; "
                        f"{blocked}", fix)
    except OSError as err:
        return NetCheck("smtp_outbound", "blocked", f"cannot connect to {host} port {port} "
                        f"({err.strerror or type(err).__name__}); {blocked}", fix)
    if not greeting.startswith(b"220"):
        return NetCheck("smtp_outbound", "error", f"{host} port {port} answered, but not with an SMTP greeting "
                        "(220)", "something between this server and the internet intercepts port 25; ask your "
                        "provider")
    return NetCheck("smtp_outbound", "ok", f"outbound port {port} is open ({host} greets with 220)", "")
