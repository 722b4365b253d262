"""Ask the zone's authoritative servers directly (never a cache) what they serve.

`authoritative_servers` finds them (NS + A/AAAA through the configured
recursive resolvers); `query` asks one of them (UDP, TCP when truncated,
recursion off); `wait_until_served` waits for a change to reach all of them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

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

from portal.dns import DnsError

if TYPE_CHECKING:
    from portal.dns.records import Record

Server = tuple[str, str, int]  # (ns name, ip, port)



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


# -- checking the expected records ---------------------------------------------------------

VERDICTS = ("ok", "missing", "different", "conflicting", "disagree", "error")


@dataclass(frozen=True)
class Answer:
    """One server's answer for one rrset: values (zone-file text), TTL, negative TTL, or an error."""
    values: tuple[str, ...] = ()
    ttl: int = 0
    error: str = ""   # a sentence; empty when the server answered authoritatively
    fix: str = ""


@dataclass(frozen=True)
class RecordCheck:
    record: Record
    verdict: str
    expected: str
    actual: list[str]
    per_server: dict[str, list[str] | str]
    message: str
    fix: str
    visible_by: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.record.name, "type": self.record.rtype, "purpose": self.record.purpose,
                "required": self.record.required, "verdict": self.verdict, "expected": self.expected,
                "actual": self.actual, "per_server": self.per_server, "message": self.message,
                "fix": self.fix, "visible_by": self.visible_by}


def _server_problem(server: Server, zone: str, response: dns.message.Message | None,
                    err: BaseException | None, timeout: float) -> Answer | None:
    """An Answer carrying the error if the server cannot be used for `zone`, else None."""
    who = describe(server)
    if isinstance(err, dns.exception.Timeout):
        return Answer(error=f"{who} did not answer within {timeout:g} s (timeout)",
                      fix=f"make sure {server[1]} serves DNS on port {server[2]} (UDP and TCP) and is reachable; "
                          f"if it is no longer one of your DNS servers, remove {server[0]} from the NS records "
                          "at your registrar")
    if err is not None:
        return Answer(error=f"{who} could not be asked ({type(err).__name__}: {err})",
                      fix=f"check that {server[1]} port {server[2]} is a DNS server reachable from here")
    assert response is not None
    rcode = response.rcode()
    lame_fix = (f"{server[0]} is listed in the NS records of {zone} but does not serve the zone: set the zone up "
                f"on that server, or remove it from the NS records at your registrar")
    if rcode == dns.rcode.REFUSED:
        return Answer(error=f"{who} refuses queries for {zone} (REFUSED: lame delegation)", fix=lame_fix)
    if rcode == dns.rcode.SERVFAIL:
        return Answer(error=f"{who} answers SERVFAIL for {zone}: the zone failed to load there or its DNSSEC "
                            "signatures are broken",
                      fix="check the zone at your DNS provider (syntax errors, expired DNSSEC signatures)")
    if rcode == dns.rcode.NXDOMAIN:
        return Answer(error=f"{who} says the zone {zone} does not exist (NXDOMAIN)",
                      fix=f"create the zone {zone} at your DNS provider, or fix the NS records at your registrar")
    if rcode != dns.rcode.NOERROR:
        return Answer(error=f"{who} answers {dns.rcode.to_text(rcode)} for {zone}",
                      fix="check the zone at your DNS provider")
    if not response.flags & dns.flags.AA:
        return Answer(error=f"{who} answers for {zone} but not authoritatively (lame delegation)", fix=lame_fix)
    return None


def _ask(server: Server, name: str, rdtype: str, timeout: float) -> Answer:
    try:
        response = query(server, name, rdtype, timeout)
    except (OSError, dns.exception.DNSException) as err:
        return _server_problem(server, name, None, err, timeout) or Answer()
    if response.rcode() == dns.rcode.NXDOMAIN and response.flags & dns.flags.AA:
        return Answer(ttl=_negative_ttl(response))
    problem = _server_problem(server, name, response, None, timeout)
    if problem:
        return problem
    owner = dns.name.from_text(name.rstrip(".") + ".")
    rrset = response.get_rrset(response.answer, owner, dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
    if not rrset:
        return Answer(ttl=_negative_ttl(response))
    return Answer(values=tuple(sorted(_text(rdtype, r) for r in rrset)), ttl=rrset.ttl)


def _negative_ttl(response: dns.message.Message) -> int:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, rrset[0].minimum)
    return 0


def _text(rdtype: str, rdata: dns.rdata.Rdata) -> str:
    """Comparable text: TXT as the joined value, other types in canonical zone-file form."""
    if rdtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text().lower() if rdtype not in ("CAA",) else rdata.to_text()


def canonical(record: Record) -> str:
    if record.rtype == "TXT":
        return record.value
    rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(record.rtype), record.value)
    return _text(record.rtype, rd)


def competes(record: Record, value: str) -> bool:
    """Whether `value` (found at the record's name and type) stands in for the same
    thing: for TXT only values of the same kind (v=spf1, v=DMARC1, ...), else all."""
    if record.rtype != "TXT":
        return True
    kind = record.value.split(";", 1)[0].split(" ", 1)[0].lower()
    if not kind.startswith("v="):
        return True
    return value.split(";", 1)[0].split(" ", 1)[0].lower() == kind


def visible_by(seconds: int, now: float | None = None) -> dict[str, Any]:
    when = datetime.fromtimestamp((now or time.time()) + seconds, timezone.utc)
    if seconds <= 0:
        return {"seconds": 0, "at": when.isoformat(timespec="seconds"), "text": "Resolvers see it now."}
    pretty = f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
    return {"seconds": seconds, "at": when.isoformat(timespec="seconds"),
            "text": f"Once the record is right on your DNS servers, resolvers that cached the old answer see "
                    f"the change within {pretty} (by {when:%H:%M} UTC)."}


def _judge(record: Record, expected_here: list[Record], answers: dict[Server, Answer]) -> RecordCheck:
    want = canonical(record)
    rivals_wanted = {canonical(r) for r in expected_here if competes(record, canonical(r))}
    per_server: dict[str, list[str] | str] = {
        describe(s): (a.error if a.error else list(a.values)) for s, a in answers.items()}
    errors = [a for a in answers.values() if a.error]
    good = {s: a for s, a in answers.items() if not a.error}
    label = f"{record.name} {record.rtype}"

    def result(verdict: str, actual: list[str], message: str, fix: str, wait: int) -> RecordCheck:
        return RecordCheck(record, verdict, want, actual, per_server, message, fix, visible_by(wait))

    if errors:
        return result("error", [], "; ".join(a.error for a in errors), "; ".join(dict.fromkeys(a.fix for a in errors)),
                      0)
    value_sets = {a.values for a in good.values()}
    if len(value_sets) > 1:
        shown = "; ".join(f"{describe(s)}: {', '.join(a.values) or 'nothing'}" for s, a in good.items())
        return result("disagree", sorted({v for vs in value_sets for v in vs}),
                      f"the authoritative servers give different answers for {label}: {shown}",
                      "the servers are out of sync: check that zone transfers (NOTIFY/AXFR) from the primary "
                      "work, or wait for the secondaries to refresh", max(a.ttl for a in good.values()))
    values = next(iter(value_sets))
    ttl = max(a.ttl for a in good.values())
    same_kind = [v for v in values if competes(record, v)]
    record_text = f"{record.rtype} {record.value}"
    if want in same_kind:
        extra = [v for v in same_kind if v not in rivals_wanted]
        if extra:
            return result("conflicting", list(values),
                          f"{label} has the expected value but also {', '.join(extra)}",
                          f"remove {', '.join(extra)} from {record.name} ({record.rtype}); only {record_text} "
                          "should be there", ttl)
        return result("ok", list(values), f"{label} is published as expected", "", 0)
    if not same_kind:
        return result("missing", list(values), f"{label} is missing",
                      f"add {record.name} {record.rtype} {record.rdata()}", ttl)
    return result("different", list(values),
                  f"{label} is {', '.join(same_kind)} instead of {want}",
                  f"change {record.name} {record.rtype} to {record.rdata()}", ttl)


def check(rs: list[Record], zone: str, servers: list[Server], timeout: float = 2.0,
          workers: int = 32) -> list[RecordCheck]:
    """Ask every server for every expected rrset of `zone` (concurrently) and judge each record."""
    from portal.dns.records import zone_records

    if not servers:
        raise DnsError(f"no authoritative servers to ask for {zone}; check the zone's NS records")
    rs = zone_records(rs, zone)
    rrsets = list(dict.fromkeys((r.name, r.rtype) for r in rs))
    with ThreadPoolExecutor(max_workers=min(workers, len(servers) * (len(rrsets) + 1))) as pool:
        probes = {s: pool.submit(_probe_zone, s, zone, timeout) for s in servers}
        health = {s: f.result() for s, f in probes.items()}
        futures = {(s, key): pool.submit(_ask, s, key[0], key[1], timeout)
                   for key in rrsets for s in servers if health[s] is None}
        answers = {k: f.result() for k, f in futures.items()}
    out = []
    for r in rs:
        key = (r.name, r.rtype)
        here = [x for x in rs if (x.name, x.rtype) == key]
        per = {s: health[s] or answers[(s, key)] for s in servers}
        out.append(_judge(r, here, per))
    return out


def _probe_zone(server: Server, zone: str, timeout: float) -> Answer | None:
    """None if the server serves `zone` authoritatively, else the Answer with the error."""
    try:
        response = query(server, zone, "SOA", timeout)
    except (OSError, dns.exception.DNSException) as err:
        return _server_problem(server, zone, None, err, timeout)
    return _server_problem(server, zone, response, None, timeout)


def detect_dnssec(zone: str, servers: list[Server], timeout: float = 2.0) -> bool:
    """Whether the zone publishes DNSKEY records (asked of each server until one answers)."""
    for server in servers:
        answer = _ask(server, zone, "DNSKEY", timeout)
        if not answer.error:
            return bool(answer.values)
    return False
