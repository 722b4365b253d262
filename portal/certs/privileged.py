"""The agent's certificate operations: acme_configure, cert_issue, cert_renew, cert_status.

The outside world comes from the Context: ctx.acme_dir (HTTP-01 tokens),
ctx.nginx_dir/www_dir/reload_nginx (the host nginx), ctx.docker (the mail
containers' reload). Tests may set `ctx.cert_reload` (a callable taking the
StackSettings and returning {service: result}) to replace every reload, and
`ctx.dns_propagation_timeout` (seconds, default 120).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import replace
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portal.agent.registry import Context, OpError, privileged
from portal.core import safefs
from portal.stack.settings import SettingsError, StackSettings
from portal.core.store import read_settings
from portal.stack.store import load_settings
from portal.certs import CertError

if TYPE_CHECKING:
    from portal.certs.challenges import ChallengeHandler
    from portal.certs.renew import Tlsa
    from portal.certs.settings import AcmeSettings

# acme, OpenSSL and dnspython are imported by the operations that use them, not
# here: the agent imports this module at start, and under emulation or on a busy
# first boot every imported library costs seconds before the agent answers.


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    try:
        yield
    except CertError as exc:
        raise OpError(exc.code, exc.message, exc.field) from None
    except SettingsError as exc:
        raise OpError("invalid", exc.message, exc.field) from None


def _dns_setup(state_dir: Path) -> tuple[Any, list[tuple[str, int]], int]:
    from portal.dns.names import parse_resolvers
    from portal.dns import DnsError
    from portal.dns.names import parse_port
    from portal.dns.update import load_update_target

    values = read_settings(state_dir, strict=True)
    try:
        target = load_update_target(state_dir)
        if not values.get("dns_resolvers", "").strip():
            # The same rule as the DNS check: never guess a resolver (no silent public one).
            raise DnsError("dns_resolvers is not set; enter the recursive resolver(s) to look up your zone's "
                           "name servers with, e.g. 9.9.9.9", "dns_resolvers")
        resolvers = parse_resolvers(values["dns_resolvers"])
        auth_port = parse_port(values.get("dns_auth_port"), "dns_auth_port")
    except DnsError as err:
        raise CertError(str(err), err.field) from None
    if target is None:
        raise CertError("acme_challenge: dns-01 needs RFC 2136 updates; set rfc2136_server first, or use http-01",
                        "acme_challenge")
    return target, resolvers, auth_port


def handler_for(ctx: Context, acme: AcmeSettings) -> ChallengeHandler:
    from portal.certs.challenges import DnsChallenge, HttpChallenge
    from portal.certs.settings import DEFAULT_ACME_DIR

    if acme.challenge == "http-01":
        return HttpChallenge(getattr(ctx, "acme_dir", DEFAULT_ACME_DIR))
    target, resolvers, auth_port = _dns_setup(ctx.state_dir)
    return DnsChallenge(target, resolvers, auth_port,
                        propagation_timeout=float(getattr(ctx, "dns_propagation_timeout", 120.0)))


def tlsa_updater(ctx: Context, settings: StackSettings) -> Tlsa | None:
    """When the key changes and `_25._tcp.<mail host>` TLSA is published (which only
    makes sense in a DNSSEC-signed zone), publish the new hash next to the old one
    and wait until every authoritative server has it, before the switch."""
    values = read_settings(ctx.state_dir)
    if not values.get("rfc2136_server"):
        return None

    def update(old_pem: bytes, new_pem: bytes) -> str:
        from portal.certs.renew import tlsa_311
        from portal.dns.check import answer_rdatas, authoritative_servers, query, wait_until_served
        from portal.dns.update import DnsError, replace_rrset

        name = f"_25._tcp.{settings.hostname}"
        try:
            target, resolvers, auth_port = _dns_setup(ctx.state_dir)
            servers = authoritative_servers(target.zone, resolvers, auth_port)
            published = {r.to_text() for r in answer_rdatas(query(servers[0], name, "TLSA"), name, "TLSA")}
            if not published:
                return "no TLSA record published: nothing to update"
            wanted = sorted(published | {tlsa_311(old_pem), tlsa_311(new_pem)})
            replace_rrset(target, name, "TLSA", wanted, ttl=300)
            wait_until_served(name, "TLSA", wanted, servers,
                              timeout=float(getattr(ctx, "dns_propagation_timeout", 120.0)))
        except (DnsError, OSError, Exception) as err:
            raise CertError(f"the new key's TLSA record for {name} could not be published ({err}); the current "
                            "certificate stays in place; fix DNS updates or set acme_reuse_key=1") from None
        return f"TLSA {name}: old and new key published"

    return update


def reloader(ctx: Context, settings: StackSettings) -> Callable[[], dict[str, str]]:
    """Point the host nginx's routes at the new certificate and reload nginx and the
    mail containers; a failure here is reported, not raised (the certificate is in)."""
    custom = getattr(ctx, "cert_reload", None)
    if custom is not None:
        return lambda: custom(settings)

    def run() -> dict[str, str]:
        from portal.certs.store import reload_containers, reload_nginx
        from portal.stack.web import NGINX_CONF_NAME, write_web_files

        results: dict[str, str] = {}
        try:
            if (ctx.nginx_dir / NGINX_CONF_NAME).exists():
                write_web_files(settings, ctx.nginx_dir, ctx.www_dir)
            results["nginx"] = reload_nginx() if ctx.reload_nginx else "skipped: reloads are off"
        except (CertError, OSError, SettingsError) as err:
            results["nginx"] = f"failed: {err}"
        client = None
        try:
            client = ctx.docker()
            results.update(reload_containers(client, settings.project))
        except Exception as err:  # the engine being down must not undo an installed certificate
            why = err.message if isinstance(err, OpError) else " ".join(str(err).split())[:200]
            results.update({"postfix": f"skipped: {why}", "dovecot": f"skipped: {why}"})
        finally:
            if client is not None:
                client.close()
        return results

    return run


def redeploy_needed(settings: StackSettings) -> bool:
    """True if the deployed mail stack does not read the certificate now in use
    (e.g. the first CA certificate after the bootstrap one): run stack_deploy."""
    main_cf = settings.stack_dir / "postfix" / "main.cf"
    try:
        text = safefs.read_text(main_cf)
    except (OSError, UnicodeDecodeError, safefs.UnsafePathError):
        return False
    return settings.tls_container_paths()[2] not in text


def _load(ctx: Context) -> tuple[StackSettings, AcmeSettings]:
    from portal.certs.settings import load_acme_settings

    return load_settings(ctx.state_dir), load_acme_settings(ctx.state_dir)


def _progress(steps: list[str]) -> Callable[[str, str], None]:
    return lambda step, detail: steps.append(f"{step}: {detail}")


CA_BUNDLE_FILE = "acme-ca-bundle.pem"
MAX_CA_BUNDLE = 48 * 1024


def check_ca_bundle_pem(text: str) -> bytes:
    """The pasted CA bundle as PEM bytes: certificates only, at least one; OpError
    naming the field `acme_ca_bundle_pem` otherwise (the text is never echoed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = text.strip().replace("\r\n", "\n").encode("utf-8", "replace") + b"\n"
    fix = ("paste the CA's root certificate(s) in PEM form: lines from -----BEGIN CERTIFICATE----- "
           "to -----END CERTIFICATE-----")
    if len(data) > MAX_CA_BUNDLE:
        raise OpError("invalid", f"the bundle is larger than {MAX_CA_BUNDLE // 1024} KiB; {fix}", "acme_ca_bundle_pem")
    if b"PRIVATE KEY" in data:
        raise OpError("invalid", "this is a private key, which must never leave its server; " + fix,
                      "acme_ca_bundle_pem")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise OpError("invalid", f"no PEM certificate found; {fix}", "acme_ca_bundle_pem")
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def ca_bundle_path(state_dir: Path) -> Path:
    """Where a pasted CA bundle is kept: the only file acme_ca_bundle may name."""
    return Path(state_dir) / CA_BUNDLE_FILE


def write_ca_bundle(state_dir: Path, pem: bytes) -> Path:
    """<state>/acme-ca-bundle.pem (public data: 0644), through the safe-write helper."""
    path = ca_bundle_path(state_dir)
    safefs.write_bytes(path, pem, 0o644)
    return path


@privileged(web=True, timeout=30.0, secret=("ca_bundle_pem",))
def acme_configure(ctx: Context, directory: str = "letsencrypt", contact: str = "", challenge: str = "http-01",
                   include_apex: bool = False, reuse_key: bool = False, keep_ca_bundle: bool = False,
                   caa_issuer: str = "", ca_bundle_pem: str = "") -> dict[str, Any]:
    """Check and store the ACME settings (all of them: what is not given gets its default).
    `ca_bundle_pem`: the CA's root certificate(s) as PEM text (a custom CA whose TLS
    the system does not trust), stored in <state>/acme-ca-bundle.pem; `keep_ca_bundle`
    keeps the one stored before. A CA bundle only ever comes as pasted text: the agent
    reads no path it is given."""
    from portal.core import store
    from portal.certs.settings import parse_acme_settings

    pem = check_ca_bundle_pem(ca_bundle_pem) if ca_bundle_pem.strip() else None
    kept = keep_ca_bundle and pem is None and ca_bundle_path(ctx.state_dir).is_file()
    values = {"acme_directory": directory.strip(), "acme_contact": contact.strip(),
              "acme_challenge": challenge.strip().lower(), "acme_include_apex": "1" if include_apex else "0",
              "acme_reuse_key": "1" if reuse_key else "0",
              "acme_ca_bundle": str(ca_bundle_path(ctx.state_dir)) if kept else "",
              "acme_caa_issuer": caa_issuer.strip()}
    with refusals():
        stack = load_settings(ctx.state_dir)
        merged = read_settings(ctx.state_dir) | values
        acme = parse_acme_settings(merged, stack.domain, stack.hostname, ctx.state_dir)
    if pem is not None:  # checked above; stored only once every other setting is valid too
        values["acme_ca_bundle"] = str(write_ca_bundle(ctx.state_dir, pem))
        acme = replace(acme, ca_bundle=Path(values["acme_ca_bundle"]))
    store.write_settings(ctx.state_dir, values)
    return {"directory": acme.directory, "names": list(acme.names), "challenge": acme.challenge,
            "contact": acme.contact, "reuse_key": acme.reuse_key, "ca_bundle": str(acme.ca_bundle or "")}


@privileged(web=True, job=True, timeout=10.0)
def cert_issue(ctx: Context, progress: Callable[[str, str], None]) -> dict[str, Any]:
    """Get a certificate from the CA now and install it (the old one stays on any failure);
    a job, with progress (account, order, each challenge, finalize, install, reload)."""
    from portal.certs.renew import obtain

    with refusals():
        settings, acme = _load(ctx)
        result = obtain(ctx.state_dir, acme, handler_for(ctx, acme), progress=progress,
                        reload=reloader(ctx, settings), tlsa=tlsa_updater(ctx, settings))
    progress("stack", "pointing the mail services at the new certificate")
    return {**result, **switch_stack(ctx)}


@privileged(timeout=600.0)
def cert_renew(ctx: Context, force: bool = False) -> dict[str, Any]:
    """Renew when due (the CA's ARI, else a third of the lifetime left) or when forced;
    failures back off (1 h doubling to 24 h). The scheduler runs this daily."""
    from portal.certs.renew import renew

    steps: list[str] = []
    with refusals():
        settings, acme = _load(ctx)
        result = renew(ctx.state_dir, acme, handler_for(ctx, acme), force=force, progress=_progress(steps),
                       reload=reloader(ctx, settings), tlsa=tlsa_updater(ctx, settings))
    if result.get("renewed"):
        result.update(switch_stack(ctx))
    return {**result, "steps": steps}


def switch_stack(ctx: Context) -> dict[str, Any]:
    """The first CA certificate (after the bootstrap one) changes the mail services'
    certificate paths, which a reload does not pick up: redeploy the stack then.
    Later renewals keep the paths (live/), so the reload was enough."""
    settings = load_settings(ctx.state_dir)  # live/ exists now
    if not redeploy_needed(settings):
        return {"redeployed": False}
    from portal.stack.privileged import deploy_stack

    try:
        deployed = deploy_stack(ctx, lambda _step, _detail: None)
    except OpError as err:  # the certificate is installed; say what is left to do
        return {"redeployed": False, "redeploy_error": f"{err.message}; run `mailstead deploy` to retry"}
    return {"redeployed": True, "deploy": deployed}


@privileged(web=True, timeout=10.0)
def cert_status(ctx: Context) -> dict[str, Any]:
    """The certificate being served (the CA's, else the bootstrap one), when it gets
    renewed (offline: the lifetime rule; cert_renew asks the CA's ARI) and the last error."""
    from cryptography import x509

    from portal.certs.renew import read_state, renew_due
    from portal.certs.store import cert_names, fingerprint, read_live, tls_dir

    tls = tls_dir(ctx.state_dir)
    live = read_live(tls)
    source = "ca" if live else "bootstrap"
    pem = live[0] if live else None
    if pem is None:
        try:
            pem = safefs.read_bytes(tls / "bootstrap.crt", 1 << 20)
        except (OSError, safefs.UnsafePathError):
            pem = None
    out: dict[str, Any] = {"source": source if pem else "none", "state": read_state(ctx.state_dir)}
    if pem is None:
        return out
    cert = x509.load_pem_x509_certificates(pem)[0]
    now = dt.datetime.now(dt.timezone.utc)
    out.update(names=list(cert_names(cert)), issuer=cert.issuer.rfc4514_string(),
               not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
               days_left=(cert.not_valid_after_utc - now).days, self_signed=cert.issuer == cert.subject,
               fingerprint=fingerprint(cert), serial=f"{cert.serial_number:x}",
               last_error=out["state"].get("last_error"))
    if live:
        decision = renew_due(pem, None, now)
        out["renewal"] = {"due": decision.due, "when": decision.when.isoformat(timespec="seconds"),
                          "why": decision.why, "source": decision.source}
    return out
