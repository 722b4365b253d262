"""Mail stack checks: containers, ports, TLS certificate, DNS drift, DNSBL listing, mail queue."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import time
from typing import Any

from portal.checks import CheckResult, check
from portal.checks.env import DEFAULT_DNSBL_ZONES, CheckEnv

NOT_SET_UP = "run the setup wizard to the end (https://<this server>/setup)"


def _settings_or_result(env: CheckEnv, cid: str) -> Any:
    try:
        return env.stack_settings()
    except Exception as exc:  # noqa: BLE001 - SettingsError names the field
        return CheckResult(cid, "warn", f"not checked: setup is not finished ({exc})", NOT_SET_UP)


@check("containers", "Mail services running")
def containers(env: CheckEnv) -> CheckResult:
    from portal.core.errors import MailsteadError
    from portal.stack.deploy import service_states

    settings = _settings_or_result(env, "containers")
    if isinstance(settings, CheckResult):
        return settings
    client = None
    try:
        client = env.ctx.docker()
        states = service_states(client, settings.project)
    except Exception as err:  # noqa: BLE001 - the engine is down or refused: said, with the fix
        reason = err.message if isinstance(err, MailsteadError) else " ".join(str(err).split())[:200]
        return CheckResult("containers", "fail", f"cannot ask docker: {reason}",
                           "start the docker engine: systemctl start docker")
    finally:
        if client is not None:
            client.close()
    bad = []
    for service, st in sorted(states.items()):
        if st.status != "running":
            bad.append(f"{service} is {st.status}" + (f" ({st.error})" if st.error else ""))
        elif st.health not in ("healthy", None, "none", ""):
            bad.append(f"{service} is {st.health}")
    if bad:
        return CheckResult("containers", "fail", "; ".join(bad),
                           "see `docker compose -p {0} logs` or the dashboard's Logs page, then run "
                           "mailstead deploy".format(settings.project))
    return CheckResult("containers", "ok", f"all {len(states)} services running and healthy")


def _connect_host(address: str) -> str:
    if address in ("0.0.0.0", ""):
        return "127.0.0.1"
    if address == "::":
        return "::1"
    return address


def port_open(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or type(err).__name__


@check("ports", "Mail ports listening")
def ports(env: CheckEnv) -> CheckResult:
    settings = _settings_or_result(env, "ports")
    if isinstance(settings, CheckResult):
        return settings
    closed = []
    targets = []
    for name, port in sorted(settings.ports.items()):
        hosts = ["127.0.0.1"] if name == "dav" else [_connect_host(a) for a in settings.publish_addresses]
        for host in dict.fromkeys(hosts):
            targets.append((name, host, port))
    for name, host, port in targets:
        why = port_open(host, port, env.net_timeout)
        if why:
            closed.append(f"{name} ({host}:{port}): {why}")
    if closed:
        return CheckResult("ports", "fail", "not listening: " + "; ".join(closed),
                           "check the containers (docker ps) and run mailstead deploy; a port taken by "
                           "another program shows in `ss -ltnp`")
    return CheckResult("ports", "ok", f"{len(targets)} ports listening: "
                                      + ", ".join(f"{n} {p}" for n, _h, p in targets))


@check("tls", "TLS certificate")
def tls(env: CheckEnv) -> CheckResult:
    from cryptography import x509

    from portal.certs.store import cert_names

    settings = _settings_or_result(env, "tls")
    if isinstance(settings, CheckResult):
        return settings
    path = settings.cert_path
    try:
        cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as err:
        return CheckResult("tls", "fail", f"no readable certificate at {path} ({type(err).__name__})",
                           "get one: mailstead cert-issue")
    now = dt.datetime.now(dt.timezone.utc)
    days = (cert.not_valid_after_utc - now).total_seconds() / 86400
    names = list(cert_names(cert))
    renew = "renew it now: mailstead cert-renew --force (and see mailstead cert-status for the last error)"
    if cert.not_valid_before_utc > now:
        return CheckResult("tls", "fail", f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}",
                           "check the system clock (timedatectl)")
    if days <= 0:
        return CheckResult("tls", "fail", f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                                          "mail clients and senders refuse it", renew)
    if settings.hostname not in names and not any(n.startswith("*.") and settings.hostname.split(".", 1)[1] == n[2:]
                                                  for n in names):
        return CheckResult("tls", "fail", f"the certificate is for {', '.join(names) or 'no names'}, "
                                          f"not for {settings.hostname}", "get a new one: mailstead cert-issue")
    if cert.issuer == cert.subject and env.setup_complete:
        return CheckResult("tls", "warn", "the certificate is self-signed; mail clients warn and some senders "
                                          "refuse it", "get one from a CA: mailstead cert-issue")
    if days < env.cert_min_days:
        return CheckResult("tls", "warn", f"the certificate expires in {days:.0f} days "
                                          f"({cert.not_valid_after_utc:%Y-%m-%d}); renewal should have "
                                          "happened by now", renew)
    return CheckResult("tls", "ok", f"valid for {', '.join(names)} until {cert.not_valid_after_utc:%Y-%m-%d} "
                                    f"({days:.0f} days)")


@check("dns", "DNS records")
def dns(env: CheckEnv) -> CheckResult:
    """The latest DNS drift check (the scheduled dns_check job; never queried here)."""
    from portal.agent import jobs

    job = jobs.latest(env.ctx, "dns_check")
    if job is None:
        return CheckResult("dns", "warn", "DNS has not been checked yet", "run mailstead dns-check")
    finished = job.get("finished") or job.get("started") or 0
    hours = (time.time() - finished) / 3600
    if job["state"] != "done":
        return CheckResult("dns", "warn", f"the last DNS check ({hours:.0f} h ago) did not finish: "
                                          f"{job.get('error') or job['state']}", "run mailstead dns-check")
    result = job.get("result") or {}
    wrong = [f"{r.get('name')} {r.get('type')} ({r.get('verdict')})" for r in result.get("results", [])
             if r.get("verdict") != "ok" and r.get("required")]
    if wrong or not result.get("required_ok", False):
        return CheckResult("dns", "fail", f"DNS no longer matches: {', '.join(wrong[:6]) or 'required records'}",
                           "publish the records shown by mailstead dns-records (or mailstead dns-push)")
    if hours > env.dns_max_age_hours:
        return CheckResult("dns", "warn", f"the last DNS check was {hours:.0f} h ago", "run mailstead dns-check")
    return CheckResult("dns", "ok", f"every required record matched {hours:.0f} h ago")


def dnsbl_query(ip: str, zone: str, resolvers: list[tuple[str, int]], timeout: float) -> str | None:
    """The A answer for <reversed ip>.<zone> (listed), or None (not listed). Raises on no answer."""
    import dns.exception
    import dns.resolver

    addr = ipaddress.ip_address(ip)
    rev = addr.reverse_pointer.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [h for h, _p in resolvers]
    res.nameserver_ports = {h: p for h, p in resolvers}
    res.lifetime = timeout
    res.timeout = timeout
    try:
        answer = res.resolve(f"{rev}.{zone}.", "A", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.exception.DNSException as err:
        raise RuntimeError(type(err).__name__) from None
    return ", ".join(sorted(r.to_text() for r in answer)) if answer.rrset else None


@check("dnsbl", "Blocklists (DNSBL)")
def dnsbl(env: CheckEnv) -> CheckResult:
    from portal.dns import DnsError
    from portal.dns.names import parse_resolvers

    values = env.values
    ip = (values.get("public_ipv4") or "").strip()
    if not ip:
        return CheckResult("dnsbl", "warn", "not checked: public_ipv4 is not set", NOT_SET_UP)
    zones = [z.strip().rstrip(".") for z in (values.get("dnsbl_zones") or ",".join(DEFAULT_DNSBL_ZONES)).split(",")
             if z.strip()]
    if not zones:
        return CheckResult("dnsbl", "ok", "no DNSBL zones configured (setting dnsbl_zones)")
    try:
        resolvers = parse_resolvers(values.get("dns_resolvers", ""))
    except DnsError as err:
        return CheckResult("dnsbl", "warn", f"not checked: {err}", "set dns_resolvers (the DNS step of setup)")
    listed, unknown = [], []
    for zone in zones:
        try:
            answer = dnsbl_query(ip, zone, resolvers, env.net_timeout)
        except (RuntimeError, ValueError) as err:
            unknown.append(f"{zone} ({err})")
            continue
        if answer:
            listed.append(f"{zone} ({answer})")
    if listed:
        return CheckResult("dnsbl", "fail", f"{ip} is listed on {', '.join(listed)}; mail to many servers "
                                            "will bounce", "find out why on the blocklist's web site (an open "
                                            "relay or a hacked account sending spam), fix it, then ask for removal")
    if unknown:
        return CheckResult("dnsbl", "warn", f"{ip}: no answer from {', '.join(unknown)}",
                           "check dns_resolvers; some blocklists refuse queries from large public resolvers")
    return CheckResult("dnsbl", "ok", f"{ip} is on none of {len(zones)} blocklists")


@check("queue", "Mail queue")
def queue(env: CheckEnv) -> CheckResult:
    settings = _settings_or_result(env, "queue")
    if isinstance(settings, CheckResult):
        return settings
    try:
        client = env.ctx.docker()
    except Exception as exc:  # noqa: BLE001
        return CheckResult("queue", "fail", f"cannot ask docker: {getattr(exc, 'message', exc)}",
                           "start the docker engine: systemctl start docker")
    try:
        container = client.containers.get(f"{settings.project}-postfix")
        code, out = container.exec_run(["postqueue", "-j"])
    except Exception as exc:  # noqa: BLE001 - docker's NotFound / APIError
        return CheckResult("queue", "fail", f"cannot read the queue ({type(exc).__name__})",
                           "is postfix running? see the containers check")
    finally:
        client.close()
    if code != 0:
        return CheckResult("queue", "fail", f"postqueue exited {code}: {out.decode(errors='replace')[:200]}",
                           "see the postfix log (dashboard, Logs)")
    entries = [json.loads(line) for line in out.decode(errors="replace").splitlines() if line.strip()]
    deferred = sum(1 for e in entries if e.get("queue_name") == "deferred")
    text = f"{len(entries)} message(s) queued ({deferred} deferred)"
    fix = "see why in the postfix log; `postqueue -p` in the postfix container lists the reasons"
    if len(entries) >= env.queue_fail:
        return CheckResult("queue", "fail", text, fix)
    if len(entries) >= env.queue_warn:
        return CheckResult("queue", "warn", text, fix)
    return CheckResult("queue", "ok", text)


@check("upgrade", "Stack version")
def upgrade(env: CheckEnv) -> CheckResult:
    """The last upgrade's outcome (upgrade-state.json) and whether a newer version is available."""
    from portal.stack.upgrade import read_state, versions

    info = versions(env.ctx)
    current = info["current"]
    if current is None:
        return CheckResult("upgrade", "warn", "not checked: the stack is not deployed yet", NOT_SET_UP)
    last = read_state(env.state_dir).get("last_upgrade") or {}
    if last and not last.get("ok") and last.get("to") != current:
        when, error = str(last.get("at", ""))[:10], " ".join(str(last.get("error") or "").split())[:300]
        attempt = f"the upgrade from {last.get('from')} to {last.get('to')} on {when}"
        if last.get("rolled_back") and not last.get("rollback_ok"):
            return CheckResult("upgrade", "fail", f"{attempt} failed and so did its rollback: {error}",
                               f"run mailstead deploy and see docker compose -p {env.values.get('stack_project') or 'mailstead'} "
                               "logs; restore the backup taken before the upgrade if mail is lost")
        if last.get("rolled_back"):
            return CheckResult("upgrade", "warn", f"{attempt} failed and was rolled back; {current} runs: {error}",
                               "fix what failed (the message above and the agent's log say what); the next update "
                           "tries again")
        return CheckResult("upgrade", "warn", f"{attempt} did not run; nothing was changed: {error}",
                           "fix what stopped it; the next update tries again")
    if info["upgrade_available"]:
        return CheckResult("upgrade", "warn", f"this appliance ships the {info['available']} stack images; the "
                                              f"stack runs {current}",
                           "the first boot of an update brings the stack to its images; to do it now, call "
                           "the agent's upgrade_run as root (it backs up first and rolls back if the new "
                           "images fail their health check)")
    return CheckResult("upgrade", "ok", f"the stack runs {current}, the newest this appliance has")
