"""Proving control of the names: HTTP-01 token files and DNS-01 TXT records.

A handler publishes every challenge of an order at once (`publish`), and takes
them all away again (`cleanup`, always called, also after a failure).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from acme import challenges

from portal.certs import CertError
from portal.core import safefs

TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
Progress = Callable[[str, str], None]


def no_progress(step: str, detail: str) -> None:
    pass


@dataclass(frozen=True)
class Pending:
    """One name's challenge: `validation` is what must be served (the key
    authorization for HTTP-01, the TXT value for DNS-01)."""

    name: str
    chall: challenges.KeyAuthorizationChallenge
    validation: str


class ChallengeHandler(Protocol):
    kind: type[challenges.KeyAuthorizationChallenge]

    def publish(self, pending: list[Pending], progress: Progress) -> None: ...
    def cleanup(self, progress: Progress) -> None: ...
    def fix(self, name: str) -> str: ...


@dataclass
class HttpChallenge:
    """HTTP-01: token files in `acme_dir`, which the host nginx serves on port 80 at
    /.well-known/acme-challenge/ (image/extra/etc/nginx/conf.d/mailstead.conf)."""

    acme_dir: Path
    kind: type[challenges.KeyAuthorizationChallenge] = challenges.HTTP01
    written: list[Path] = field(default_factory=list)

    def publish(self, pending: list[Pending], progress: Progress) -> None:
        safefs.ensure_dir(self.acme_dir, 0o755)
        for item in pending:
            assert isinstance(item.chall, challenges.HTTP01)
            token = item.chall.encode("token")
            if not TOKEN.fullmatch(token):
                raise CertError(f"the CA sent a challenge token that is not a safe file name for {item.name}")
            path = self.acme_dir / token
            safefs.write_bytes(path, item.validation.encode("ascii"), 0o644)
            self.written.append(path)
            progress(f"challenge {item.name}", f"http-01 token at {item.chall.path}")

    def cleanup(self, progress: Progress) -> None:
        for path in self.written:
            safefs.remove(path)
        self.written.clear()

    def fix(self, name: str) -> str:
        return (f"is port 80 of {name} reachable from the internet, and do its A/AAAA records point at "
                "this server?")


@dataclass
class DnsChallenge:
    """DNS-01: `_acme-challenge.<name>` TXT records pushed by RFC 2136 (portal.dns),
    answered only once EVERY authoritative server of the zone serves them."""

    target: object  # portal.dns.update.UpdateTarget
    resolvers: list[tuple[str, int]]
    auth_port: int = 53
    propagation_timeout: float = 120.0
    kind: type[challenges.KeyAuthorizationChallenge] = challenges.DNS01
    published: list[str] = field(default_factory=list)

    def publish(self, pending: list[Pending], progress: Progress) -> None:
        from portal.dns.check import authoritative_servers, wait_until_served
        from portal.dns.update import DnsError, replace_rrset

        values: dict[str, list[str]] = {}
        for item in pending:
            assert isinstance(item.chall, challenges.DNS01)
            values.setdefault(item.chall.validation_domain_name(item.name), []).append(f'"{item.validation}"')
        try:
            for rrname, rdatas in values.items():
                self.published.append(rrname)
                replace_rrset(self.target, rrname, "TXT", rdatas, ttl=60)
                progress(f"challenge {rrname.removeprefix('_acme-challenge.')}", f"TXT {rrname} sent by RFC 2136")
            zone = getattr(self.target, "zone")
            servers = authoritative_servers(zone, self.resolvers, self.auth_port)
            for rrname, rdatas in values.items():
                progress("propagation", f"waiting until {len(servers)} authoritative server(s) serve {rrname}")
                wait_until_served(rrname, "TXT", rdatas, servers, timeout=self.propagation_timeout)
        except DnsError as err:
            raise CertError(f"the DNS-01 record could not be published: {err}; the current certificate "
                            "stays in place", err.field) from None

    def cleanup(self, progress: Progress) -> None:
        from portal.dns.update import DnsError, delete_rrset

        for rrname in self.published:
            try:
                delete_rrset(self.target, rrname, "TXT")
            except DnsError as err:
                progress("cleanup", f"could not delete {rrname}: {err}")
        self.published.clear()

    def fix(self, name: str) -> str:
        return (f"is _acme-challenge.{name} TXT served by every authoritative server of the zone, and does "
                "the zone's NS set match its servers?")
