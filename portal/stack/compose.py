"""The compose file, built as data and written by a YAML serializer.

`compose(settings)` returns the compose project as a dict; `compose_yaml`
serializes it (yaml.safe_dump). No setting is ever pasted into YAML text, so a
value cannot add a key, a service or a privilege: a host path is the `source`
of a long-syntax bind mount, an address is a port's `host_ip`, and the values
were checked when they were stored (portal/core/settings.py) and again when
the settings were loaded (StackSettings.validate).

What each service may have is fixed here: its image, its mounts (named volumes
and the bind mounts listed below), its ports, its capabilities. The property
test (tests/unit/test_compose.py) renders hostile settings and checks that the
parsed file holds exactly these.
"""

from __future__ import annotations

from typing import Any

import yaml

from portal.stack.settings import StackSettings

HEADER = """\
# Mailstead mail stack {version}: rendered from settings by the agent.
# Do not edit: every deploy re-renders this folder. Inspect with
#   docker compose -p {project} ps / logs
"""

VOLUMES = ("mail", "spool", "rspamd", "redis", "dav")

# Healthy as soon as one check passes. The long start period only forgives
# failures while a slow machine (or emulation) is still starting a service, e.g.
# rspamd loading its configuration. Each check runs a process in the container
# (radicale's starts python), so six services checked every 5 s keep a small
# machine's CPU busy for nothing: with docker 25+ a starting service is checked
# every 5 s (the start interval), and then a healthy one once a minute (three
# misses in a row, about 3 minutes, make it unhealthy). The start interval is
# named: docker 26 (trixie's) takes an unset one as the interval, so each service
# waited a minute for its first check and postfix, whose first check came before
# smtpd answered, 3 minutes in a VM. Older engines have no start interval, and
# there the first check waits a whole interval: every check is 5 s apart (the
# host's docker 20.10 in the integration tests).
HEALTH = {"timeout": "30s", "start_period": "300s"}
HEALTH_QUIET = {"interval": "60s", "start_interval": "5s", "retries": 3}
HEALTH_EVERY_5S = {"interval": "5s", "retries": 5}
LOGGING = {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}}


def _bind(source: str, target: str) -> dict[str, Any]:
    """A read-only bind mount in long syntax: the host path is a value, never a key."""
    return {"type": "bind", "source": source, "target": target, "read_only": True}


def _volume(name: str, target: str) -> dict[str, Any]:
    return {"type": "volume", "source": name, "target": target}


def _ports(settings: StackSettings, name: str, container_port: int,
           addresses: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    ports = settings.as_template_vars()["ports"]
    return [{"target": container_port, "published": str(ports[name]), "host_ip": addr, "protocol": "tcp"}
            for addr in (addresses if addresses is not None else settings.publish_addresses)]


def _health(settings: StackSettings, service: str, **override: str) -> dict[str, Any]:
    pace = HEALTH_QUIET if settings.engine_start_interval else HEALTH_EVERY_5S
    return {"test": ["CMD", "/bin/sh", f"/etc/mailstead/{service}/healthcheck.sh"], **HEALTH, **pace, **override}


def _entrypoint(service: str) -> list[str]:
    return ["/usr/bin/tini", "--", "/bin/sh", f"/etc/mailstead/{service}/entrypoint.sh"]


def compose(settings: StackSettings) -> dict[str, Any]:
    """The compose project for `settings` (checked first), as plain data."""
    settings = settings.validate()
    v = settings.as_template_vars()
    project, images = v["project"], v["images"]
    tls_mounts = [_bind(src, dst) for src, dst in settings.tls_bind_mounts()]
    accounts = _bind(v["accounts_dir"], "/var/lib/mailstead-accounts")

    def service(name: str, **fields: Any) -> dict[str, Any]:
        # Every lookup goes to the stack's own resolver: rspamd's directly (its config
        # names the address), the others' through docker's embedded DNS, which still
        # answers the service names.
        common: dict[str, Any] = {"restart": "unless-stopped", "networks": ["mailstead"],
                                  "dns": [settings.resolver_address], "logging": LOGGING}
        return {**common, "image": images[name], "container_name": f"{project}-{name}", **fields}

    # No depends_on: compose's "started" promises nothing about readiness, and every
    # service already copes with a peer that is not there yet (postfix defers, or
    # accepts unscanned as it does when rspamd is down; rspamd retries redis; radicale
    # asks dovecot per request). Under emulation, starting all six at once instead of
    # in three waves took ~40 s off a deploy.
    services = {
        "postfix": service(
            "postfix", hostname=settings.hostname, entrypoint=_entrypoint("postfix"),
            ports=_ports(settings, "smtp", 25) + _ports(settings, "submissions", 465)
            + _ports(settings, "submission", 587),
            volumes=[_bind("./postfix", "/etc/mailstead/postfix"), _volume("spool", "/var/spool/postfix"),
                     accounts, *tls_mounts],
            healthcheck=_health(settings, "postfix")),
        # Plaintext that must never reach a disk: LMTP spools large incoming messages in
        # /tmp before mail_crypt encrypts them, and the index cache (header fields,
        # snippets) lives in /var/cache/dovecot-index.
        "dovecot": service(
            "dovecot", hostname=settings.hostname, entrypoint=_entrypoint("dovecot"),
            ports=_ports(settings, "imaps", 993) + _ports(settings, "pop3s", 995)
            + _ports(settings, "managesieve", 4190),
            # Fixed: postfix's sieve listener (10025, not published) trusts this address alone.
            networks={"mailstead": {"ipv4_address": settings.dovecot_address}},
            volumes=[_bind("./dovecot", "/etc/mailstead/dovecot"), _volume("mail", "/var/mail"),
                     accounts, *tls_mounts],
            tmpfs=["/tmp", "/var/cache/dovecot-index"],
            healthcheck=_health(settings, "dovecot")),
        # Starts as root only to put config and DKIM keys in place for _rspamd, then runs
        # rspamd as _rspamd. Not published: postfix reaches the milter on the stack network.
        # The hostname is the authserv-id of its Authentication-Results and ARC headers.
        "rspamd": service(
            "rspamd", hostname=settings.hostname, entrypoint=_entrypoint("rspamd"),
            cap_drop=["ALL"], cap_add=["CHOWN", "KILL", "SETUID", "SETGID"],
            security_opt=["no-new-privileges:true"],
            volumes=[_bind("./rspamd", "/etc/mailstead/rspamd"), _volume("rspamd", "/var/lib/rspamd"),
                     _bind(v["dkim_dir"], "/run/mailstead-dkim")],
            # Its start loads a large configuration (a minute under emulation), then compiles
            # its regexp caches in the background; any multipattern the image does not ship
            # (recipes/rspamd/postinst-hs-cache.chroot) is compiled before it answers.
            healthcheck=_health(settings, "rspamd", start_period="600s")),
        # Unprivileged, and never published: rspamd reaches it on the stack network.
        "redis": service(
            "redis", user="redis", entrypoint=_entrypoint("redis"),
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
            volumes=[_bind("./redis", "/etc/mailstead/redis"), _volume("redis", "/var/lib/redis")],
            healthcheck=_health(settings, "redis")),
        # Starts as root only to chown the dav volume, then runs radicale as the radicale
        # user; these are all the capabilities it has. Published on loopback only, for nginx.
        "radicale": service(
            "radicale", entrypoint=_entrypoint("radicale"),
            cap_drop=["ALL"], cap_add=["CHOWN", "DAC_READ_SEARCH", "SETUID", "SETGID"],
            security_opt=["no-new-privileges:true"],
            ports=_ports(settings, "dav", 5232, ("127.0.0.1",)),
            volumes=[_bind("./radicale", "/etc/mailstead/radicale"), _volume("dav", "/var/lib/radicale/collections")],
            healthcheck=_health(settings, "radicale")),
        # The stack's caching resolver (rspamd makes some 24 lookups a message). It
        # forwards to `dns_servers` or resolves from the root. Unprivileged from the
        # start (port 53 is allowed by the sysctl), never published, and at a fixed
        # address that only it may use (outside the range docker hands out). Nothing
        # waits for it to start: a lookup before it answers fails like any DNS failure.
        "unbound": service(
            "unbound", user="unbound", entrypoint=_entrypoint("unbound"),
            networks={"mailstead": {"ipv4_address": settings.resolver_address}},
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
            sysctls={"net.ipv4.ip_unprivileged_port_start": 53},
            volumes=[_bind("./unbound", "/etc/mailstead/unbound")],
            healthcheck=_health(settings, "unbound")),
    }
    network = {"name": project, "ipam": {"config": [{"subnet": settings.subnet,
                                                     "ip_range": settings.dynamic_range}]}}
    return {"name": project, "networks": {"mailstead": network},
            "volumes": {name: {} for name in VOLUMES}, "services": services}


class _Dumper(yaml.SafeDumper):
    """yaml.SafeDumper without anchors and aliases: a reader sees each value where it applies."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def compose_yaml(settings: StackSettings) -> str:
    """compose.yaml's text: a comment, then the project serialized by a YAML dumper."""
    data = compose(settings)
    header = HEADER.format(version=settings.version, project=data["name"])
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
