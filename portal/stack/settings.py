"""The settings the mail stack is rendered from (a typed, immutable value)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from portal import __version__

SERVICES = ("postfix", "dovecot", "rspamd", "redis", "radicale", "unbound")
VERSION = re.compile(r"[0-9][0-9A-Za-z.+~-]{0,39}")
IMAGE = re.compile(r"sha256:[0-9a-f]{64}|mailstead-[a-z]+:[0-9][0-9A-Za-z.+~-]{0,39}")
SELECTOR = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

# Container port -> default host port, per published service port.
DEFAULT_PORTS = {
    "smtp": 25,
    "submissions": 465,
    "submission": 587,
    "imaps": 993,
    "pop3s": 995,
    "dav": 5232,
    "managesieve": 4190,
}


# One error for a bad setting, wherever it is found (portal/core/settings.py).
from portal.core.settings import SettingsError  # noqa: E402


@dataclass(frozen=True)
class StackSettings:
    domain: str
    hostname: str
    state_dir: Path = Path("/var/lib/mailstead")
    version: str = __version__
    # Where the published ports listen: every address in production,
    # 127.0.0.1 in tests. radicale is always published on 127.0.0.1 only.
    publish_addresses: tuple[str, ...] = ("0.0.0.0",)
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dkim_selectors: tuple[str, str] = ("mailstead-rsa", "mailstead-ed25519")
    message_size_limit_mb: int = 50
    default_quota_mb: int = 2048
    # Where the stack's resolver (unbound) sends its queries: these servers
    # (IPs, port 53), or, when empty, the internet's own (it resolves from the root).
    dns_servers: tuple[str, ...] = ()
    # The stack network (IPv4, private). Containers take addresses from its lower
    # half; the resolver has a fixed one in the upper half (resolver_address), so
    # rspamd can be pointed at it by address, and so has dovecot (dovecot_address),
    # the one client postfix relays sieve's replies for.
    subnet: str = "172.31.53.0/24"
    # MTA-STS policy mode: enforce, testing or none.
    mta_sts_mode: str = "enforce"
    # Image IDs by service (pinned in compose.yaml); filled in after loading.
    images: dict[str, str] = field(default_factory=dict)
    project: str = "mailstead"
    # The engine checks a starting service every 5 s on its own (docker 25+, its
    # default start interval): then a healthy service is checked once a minute
    # (compose.py). Set by the deploy from the engine it talks to.
    engine_start_interval: bool = False

    @property
    def stack_dir(self) -> Path:
        return self.state_dir / "stack"

    @property
    def accounts_dir(self) -> Path:
        return self.state_dir / "accounts"

    @property
    def accounts_db(self) -> Path:
        return self.accounts_dir / "accounts.db"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def dkim_dir(self) -> Path:
        return self.secrets_dir / "dkim"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def cert_path(self) -> Path:
        """The certificate served: settings' own, else the CA's (tls/live, see
        portal/certs/store.py) once one is installed, else the bootstrap one."""
        if self.tls_cert:
            return self.tls_cert
        live = self.tls_dir / "live"
        return live / "fullchain.pem" if live.exists() else self.tls_dir / "bootstrap.crt"

    @property
    def key_path(self) -> Path:
        if self.tls_key:
            return self.tls_key
        live = self.tls_dir / "live"
        return live / "privkey.pem" if live.exists() else self.tls_dir / "bootstrap.key"

    def tls_bind_mounts(self) -> list[tuple[str, str]]:
        """(host path, container path) read-only bind mounts for postfix and dovecot.
        Files under tls_dir: the whole folder at /etc/mailstead/tls (so a renewed live/
        is seen without a redeploy); files elsewhere: each on its own."""
        cert, key, base = self.cert_path, self.key_path, Path("/etc/mailstead/tls")
        if cert.is_relative_to(self.tls_dir) and key.is_relative_to(self.tls_dir):
            return [(str(self.tls_dir), str(base))]
        return [(str(cert), f"{base}/cert.pem"), (str(key), f"{base}/key.pem")]

    def tls_container_paths(self) -> tuple[list[str], str, str]:
        """(the mounts as "host:container:ro" text for display, cert path, key path as the
        containers see them)."""
        cert, key, base = self.cert_path, self.key_path, Path("/etc/mailstead/tls")
        mounts = [f"{src}:{dst}:ro" for src, dst in self.tls_bind_mounts()]
        if cert.is_relative_to(self.tls_dir) and key.is_relative_to(self.tls_dir):
            return mounts, str(base / cert.relative_to(self.tls_dir)), str(base / key.relative_to(self.tls_dir))
        return mounts, f"{base}/cert.pem", f"{base}/key.pem"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def dynamic_range(self) -> str:
        """The lower half of the subnet: where docker gives containers their addresses."""
        return str(next(self.network.subnets(prefixlen_diff=1)))

    @property
    def resolver_address(self) -> str:
        """unbound's fixed address: the subnet's last host (outside dynamic_range)."""
        return str(self.network[-2])

    @property
    def dovecot_address(self) -> str:
        """dovecot's fixed address, next below the resolver's (outside dynamic_range): postfix
        relays the mail sieve sends (vacation replies, redirects) for it alone."""
        return str(self.network[-3])

    def with_images(self, images: dict[str, str]) -> StackSettings:
        return replace(self, images=dict(images))

    def validate(self) -> StackSettings:
        """Check every value again where it is used (the store checked them when they were
        written): a value that reaches a generated file must be exactly what it claims to be."""
        from portal.core import settings as rules
        from portal.stack.accounts import check_domain  # one domain rule for settings and accounts

        check_domain(self.domain, "domain")
        check_domain(self.hostname, "hostname")
        rules.dns_name("domain", self.domain)
        rules.dns_name("hostname", self.hostname)
        if not self.publish_addresses:
            raise SettingsError("publish_addresses", "give at least one address, e.g. 0.0.0.0")
        for addr in self.publish_addresses:
            if not isinstance(addr, str):
                raise SettingsError("publish_addresses", "must be IP addresses")
            rules.ip()("publish_addresses", addr)
            if rules.ip()("publish_addresses", addr) != ipaddress.ip_address(addr).compressed:
                raise SettingsError("publish_addresses", f"'{addr[:64]}' is not in its usual form")
        for addr in self.dns_servers:
            if not isinstance(addr, str):
                raise SettingsError("dns_servers", "must be IP addresses")
            rules.ip(4)("dns_servers", addr)
        if (not isinstance(self.subnet, str) or not self.subnet
                or rules.private_subnet("stack_subnet", self.subnet) != self.subnet):
            raise SettingsError("stack_subnet", "must be a private IPv4 network such as 172.31.53.0/24")
        if not isinstance(self.project, str) or not rules.PROJECT.fullmatch(self.project):
            raise SettingsError("stack_project", "must be lower-case letters, digits, '-' and '_', e.g. mailstead")
        if not isinstance(self.version, str) or not VERSION.fullmatch(self.version):
            raise SettingsError("version", "is not a version number such as 0.1.0")
        for name, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key), ("state_dir", self.state_dir)):
            if path is not None and rules.safe_path(name, str(path)) != str(path):
                raise SettingsError(name, "must be an absolute path without '..'")
        for selector in self.dkim_selectors:
            if not isinstance(selector, str) or not SELECTOR.fullmatch(selector):
                raise SettingsError("dkim_selectors", f"'{str(selector)[:40]}' is not a DKIM selector name")
        unknown = set(self.ports) - set(DEFAULT_PORTS)
        if unknown:
            raise SettingsError("ports", f"unknown port name(s) {sorted(unknown)}; known: {sorted(DEFAULT_PORTS)}")
        for name, port in self.ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise SettingsError(f"ports.{name}", "must be a port number from 1 to 65535")
        if len(set(self.ports.values())) != len(self.ports):
            raise SettingsError("ports", "two services cannot share one host port")
        if not 1 <= self.message_size_limit_mb <= 1024:
            raise SettingsError("message_size_limit_mb", "must be between 1 and 1024")
        if self.mta_sts_mode not in ("enforce", "testing", "none"):
            raise SettingsError("mta_sts_mode", "must be enforce, testing or none")
        if not isinstance(self.engine_start_interval, bool):
            raise SettingsError("engine_start_interval", "must be true or false")
        if self.default_quota_mb < 0:
            raise SettingsError("default_quota_mb", "must be 0 (no limit) or more")
        for service, image in self.images.items():
            if service not in SERVICES or not isinstance(image, str) or not IMAGE.fullmatch(image):
                raise SettingsError("images", f"'{str(image)[:80]}' is not an image ID or a mailstead image name")
        return self

    def as_template_vars(self) -> dict[str, Any]:
        ports = dict(DEFAULT_PORTS)
        ports.update(self.ports)
        tls_mounts, tls_cert_file, tls_key_file = self.tls_container_paths()
        return {
            "domain": self.domain,
            "hostname": self.hostname,
            "version": self.version,
            "project": self.project,
            "publish_addresses": list(self.publish_addresses),
            "dns_servers": list(self.dns_servers),
            "subnet": self.subnet,
            "resolver_address": self.resolver_address,
            "dovecot_address": self.dovecot_address,
            "ports": ports,
            "stack_dir": str(self.stack_dir),
            "accounts_dir": str(self.accounts_dir),
            "dkim_dir": str(self.dkim_dir),
            "dkim_selectors": {"rsa": self.dkim_selectors[0], "ed25519": self.dkim_selectors[1]},
            "tls_cert": str(self.cert_path),
            "tls_key": str(self.key_path),
            "tls_mounts": tls_mounts,
            "tls_cert_file": tls_cert_file,
            "tls_key_file": tls_key_file,
            "message_size_limit": self.message_size_limit_mb * 1024 * 1024,
            "default_quota_mb": self.default_quota_mb,
            "images": {svc: self.images.get(svc, f"mailstead-{svc}:{self.version}") for svc in SERVICES},
        }
