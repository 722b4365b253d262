"""Ask the zone's authoritative servers directly (never a cache) what they serve.

`authoritative_servers` finds them (NS + A/AAAA through the configured
recursive resolvers); `query` asks one of them (UDP, TCP when truncated,
recursion off); `wait_until_served` waits for a change to reach all of them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from .update import DnsError

Server = tuple[str, str, int]  # (ns name, ip, port)


def parse_resolvers(text: str, field: str = "dns_resolvers") -> list[tuple[str, int]]:
    """'ip' or 'ip:port' (IPv6: '[ip]:port'), comma separated -> [(ip, port)]."""
    import ipaddress

    out: list[tuple[str, int]] = []
    for item in (p.strip() for p in (text or "").split(",")):
        if not item:
            continue
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                port = int(rest.lstrip(":")) if rest.lstrip(":").isdigit() else 0
        elif item.count(":") == 1:
            host, _, p = item.partition(":")
            port = int(p) if p.isdigit() else 0
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise DnsError(f"'{item[:64]}' is not an IP address (or ip:port); enter your recursive resolver's "
                           "address, e.g. 9.9.9.9 or 127.0.0.1:5353", field) from None
        if not 1 <= port <= 65535:
            raise DnsError(f"'{item[:64]}' has no valid port; use ip:port with a port from 1 to 65535", field)
        out.append((host, port))
    if not out:
        raise DnsError("give at least one recursive resolver, e.g. 9.9.9.9", field)
    return out


def make_resolver(resolvers: list[tuple[str, int]], timeout: float) -> dns.resolver.Resolver:
    """A resolver that asks exactly `resolvers` (never the system's configuration)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in resolvers]
    resolver.timeout = resolver.lifetime = timeout
    resolver.cache = None
    return resolver


def _where(resolvers: list[tuple[str, int]]) -> str:
    return ", ".join(f"{ip} port {port}" for ip, port in resolvers)


def authoritative_servers(zone: str, resolvers: list[tuple[str, int]], auth_port: int = 53,
                          timeout: float = 3.0) -> list[Server]:
    """The zone's name servers and their addresses: [(ns name, ip, auth_port)], sorted."""
    zone = zone.rstrip(".")
    resolver = make_resolver(resolvers, timeout)
    try:
        answer = resolver.resolve(zone + ".", "NS", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        raise DnsError(f"the zone {zone} does not exist in DNS (NXDOMAIN from {_where(resolvers)}); register "
                       "the domain, or check its spelling and that the registrar has delegated it to your "
                       "DNS provider", "domain") from None
    except (dns.resolver.LifetimeTimeout, dns.resolver.NoNameservers) as err:
        raise DnsError(f"the recursive resolver(s) {_where(resolvers)} could not look up the name servers of "
                       f"{zone} ({type(err).__name__}: {err}); check the dns_resolvers setting and the "
                       "network", "dns_resolvers") from None
    ns_names = sorted({rr.target.to_text(omit_final_dot=True).lower() for rr in answer.rrset or []})
    if not ns_names:
        raise DnsError(f"{zone} has no NS records (asked {_where(resolvers)}); its registrar or DNS provider "
                       "must delegate it to name servers", "domain")
    servers: list[Server] = []
    for ns in ns_names:
        for rdtype in ("A", "AAAA"):
            try:
                addrs = resolver.resolve(ns + ".", rdtype, raise_on_no_answer=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout):
                continue
            servers += [(ns, rr.address, auth_port) for rr in addrs.rrset or []]
    if not servers:
        raise DnsError(f"the name servers of {zone} ({', '.join(ns_names)}) have no addresses in DNS "
                       f"(asked {_where(resolvers)}); fix the delegation at your registrar", "domain")
    return sorted(set(servers))


def describe(server: Server) -> str:
    ns, ip, port = server
    return f"{ns} ({ip} port {port})"


def query(server: Server, name: str, rdtype: str, timeout: float = 2.0) -> dns.message.Message:
    """Ask one authoritative server directly: UDP, TCP if truncated, recursion off.
    dnspython exceptions (Timeout, OSError) propagate to the caller."""
    q = dns.message.make_query(name.rstrip(".") + ".", dns.rdatatype.from_text(rdtype), use_edns=0, payload=4096)
    q.flags &= ~dns.flags.RD
    response, _tcp = dns.query.udp_with_fallback(q, server[1], timeout=timeout, port=server[2])
    return response


def to_rdatas(rdtype: str, texts: list[str], origin: str | None = None) -> set[dns.rdata.Rdata]:
    org = dns.name.from_text(origin) if origin else dns.name.root
    return {dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), t, origin=org)
            for t in texts}


def answer_rdatas(response: dns.message.Message, name: str, rdtype: str) -> set[dns.rdata.Rdata]:
    owner = dns.name.from_text(name.rstrip(".") + ".")
    rrset = response.get_rrset(response.answer, owner, dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
    return set(rrset) if rrset else set()


def wait_until_served(name: str, rdtype: str, rdatas: list[str], servers: list[Server],
                      timeout: float = 120.0, interval: float = 1.0) -> None:
    """Return once EVERY server answers `name`/`rdtype` with all of `rdatas`;
    DnsError naming the servers that still lack it after `timeout` seconds."""
    if not servers:
        raise DnsError(f"no authoritative servers to ask for {name} {rdtype}; check the zone's NS records")
    wanted = to_rdatas(rdtype, rdatas)
    pending = list(servers)
    seen: dict[Server, str] = {}
    deadline = time.monotonic() + timeout

    def has_it(server: Server) -> bool:
        try:
            response = query(server, name, rdtype, timeout=min(2.0, max(0.2, timeout)))
        except dns.exception.Timeout:
            seen[server] = "no answer (timeout)"
            return False
        except (OSError, dns.exception.DNSException) as err:
            seen[server] = f"error {type(err).__name__}"
            return False
        got = answer_rdatas(response, name, rdtype)
        seen[server] = (dns.rcode.to_text(response.rcode()) + ": "
                        + (", ".join(sorted(r.to_text() for r in got)) or "no records"))
        return wanted <= got

    with ThreadPoolExecutor(max_workers=min(16, len(servers))) as pool:
        while True:
            results = list(pool.map(has_it, pending))
            pending = [s for s, ok in zip(pending, results) if not ok]
            if not pending:
                return
            if time.monotonic() + interval > deadline:
                lacking = "; ".join(f"{describe(s)} answers {seen.get(s, '?')[:200]}" for s in pending)
                raise DnsError(f"after {timeout:g} s, {name} {rdtype} is still not served by every "
                               f"authoritative server: {lacking}. Check that the servers receive the "
                               "zone's changes (zone transfers / NOTIFY) and try again")
            time.sleep(interval)
