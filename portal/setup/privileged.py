"""The agent's operations for the end of setup and for the dashboard.

- job `setup_deploy`: deploy the stack (with per-service progress), then create
  the admin mailbox(es) the Admin step left pending, then mark `stack_deployed`.
  Safe to repeat: a mailbox that exists already is left alone, and the pending
  passwords are kept (0600, in secrets/) until their mailbox exists.
- `send_test_message(to)`: one message from postmaster@<domain> through the
  local postfix (port 25 as published), to an address of a hosted domain.
- `setup_finish()`: setup_complete=1 and the setup token deleted for good.
- `setup_restore(snapshot)` / job `setup_restore`: the wizard's "Restore from a
  backup" (portal/web/restore.py): refused once setup is complete; runs the
  backup restore (portal/backup/service.py) and, when the restored state says
  setup is complete, deletes the setup token (as setup_finish does).
- `system_status()`: free space of the state directory's file system, memory.
- `stack_logs(service, lines)`: the last lines of one service's container log.

Passwords are never logged, returned or put in a progress event.
"""

from __future__ import annotations

import hmac
import json
import os
import shutil
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from portal.agent.registry import Context, OpError, privileged
from portal.core import safefs, store
from portal.core.layout import StateLayout
from portal.stack import privileged as stack_ops
from portal.stack.accounts import PreparedPassword, check_address
from portal.stack.settings import DEFAULT_PORTS, SERVICES

Progress = Callable[[str, str], None]

MAX_LOG_LINES = 500
MAX_LOG_LINE_CHARS = 1000
# Taken from the Admin step's pending file, not yet made into mailboxes.
DEPLOY_STASH = "deploy-mailboxes.json"


def deploy_stack(ctx: Context, progress: Progress) -> dict[str, Any]:
    """The stack's own deploy job (portal/stack/privileged.py); a seam for tests."""
    return stack_ops.deploy_stack(ctx, progress)


def take_pending(state_dir: Path) -> list[tuple[str, PreparedPassword]]:
    """The Admin step's pending mailboxes (returned and deleted by portal.admin.privileged)."""
    from portal.admin.privileged import take_pending_mailboxes

    return take_pending_mailboxes(state_dir)


def make_mailbox(ctx: Context, address: str, prepared: PreparedPassword) -> bool:
    """Create the mailbox from its prepared password; False if it exists already."""
    with stack_ops.refusals():
        accounts = stack_ops.accounts_for(stack_ops.settings_for(ctx))
        if accounts.get_mailbox(address) is not None:
            return False
    stack_ops._with_accounts(ctx, lambda a, k: a.create_mailbox(address, prepared, 0, keys=k))
    return True


def _stash_path(ctx: Context) -> Path:
    return ctx.state_dir / "secrets" / DEPLOY_STASH


def _read_stash(path: Path) -> dict[str, PreparedPassword]:
    try:
        data = safefs.read_json(path, {})
    except (OSError, ValueError, safefs.UnsafePathError):
        raise OpError("internal", f"{path} is unreadable; remove it and enter the administrator "
                                  f"password again in the Admin step") from None
    out = {}
    for address, entry in (data.items() if isinstance(data, dict) else ()):
        try:
            out[str(address)] = PreparedPassword.from_dict(entry)
        except (TypeError, ValueError):
            continue
    return out


def _write_stash(path: Path, pending: dict[str, PreparedPassword]) -> None:
    if not pending:
        safefs.remove(path)
        return
    safefs.ensure_dir(path.parent, 0o700)
    safefs.write_json(path, {a: p.as_dict() for a, p in pending.items()}, 0o600)


def create_pending_mailboxes(ctx: Context, progress: Progress) -> list[str]:
    """Make every pending mailbox; each prepared password is forgotten only once its
    mailbox exists (it survives a power loss in between: the Deploy can be repeated)."""
    stash = _stash_path(ctx)
    pending = _read_stash(stash)
    taken = take_pending(ctx.state_dir)
    if taken:
        pending.update({address.lower(): prepared for address, prepared in taken})
        _write_stash(stash, pending)
    made = []
    for address in sorted(pending):
        progress("mailbox", f"creating the mailbox {address}")
        created = make_mailbox(ctx, address, pending[address])
        progress("mailbox", f"{address} {'created' if created else 'exists already'}")
        del pending[address]
        _write_stash(stash, pending)
        made.append(address)
    return made


@privileged(web=True, job=True, timeout=10.0)
def setup_deploy(ctx: Context, progress: Progress) -> dict[str, Any]:
    """The wizard's Deploy: stack up (per-service progress), admin mailbox(es), stack_deployed=1."""
    result = deploy_stack(ctx, progress)
    mailboxes = create_pending_mailboxes(ctx, progress)
    store.write_settings(ctx.state_dir, {"stack_deployed": "1"})
    progress("done", "the mail server is running")
    return {**result, "mailboxes": mailboxes, "stack_deployed": True}


# -- test message ------------------------------------------------------------------------

def _smtp_target(settings: Any) -> tuple[str, int]:
    port = {**DEFAULT_PORTS, **settings.ports}["smtp"]
    addrs = list(settings.publish_addresses)
    if not addrs or "0.0.0.0" in addrs or "127.0.0.1" in addrs:
        return "127.0.0.1", port
    return ("::1" if addrs[0] == "::" else addrs[0]), port


def _delivers(settings: Any, address: str) -> str | None:
    """None when `address` is a mailbox or an alias here, else why not."""
    accounts = stack_ops.accounts_for(settings)
    domain = address.rsplit("@", 1)[1]
    if domain not in accounts.domains():
        return (f"{address} is not in a domain of this server; send the test to your own mailbox, "
                f"such as postmaster@{settings.domain}")
    if accounts.get_mailbox(address) is None and not any(a["source"] == address for a in accounts.list_aliases()):
        return f"{address} is neither a mailbox nor an alias here; send the test to one of them"
    return None


@privileged(web=True, timeout=60.0)
def send_test_message(ctx: Context, to: str) -> dict[str, Any]:
    """Hand a test message from postmaster@<domain> to `to` (a mailbox or alias here) to
    the stack's postfix (portal/stack/localmail.py); says whether postfix took it."""
    from portal.stack import localmail

    with stack_ops.refusals():
        settings = stack_ops.settings_for(ctx)
        to = check_address(to, "to")
        problem = _delivers(settings, to)
    if problem:
        raise OpError("invalid", problem, "to")
    sender = f"postmaster@{settings.domain}"
    msg = EmailMessage()
    msg["From"] = f"Mailstead <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Mailstead test message"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=settings.hostname)
    msg.set_content(f"This is a test message from your Mailstead appliance ({settings.hostname}).\n\n"
                    f"If you can read it in your mail app, receiving mail works.\n")
    try:
        localmail.send(ctx, settings, msg, sender, to)
    except localmail.NotSent as err:
        raise OpError("smtp", f"the mail server did not take the message ({err.reason}); is the stack "
                              f"deployed and postfix healthy?") from None
    return {"sent": True, "to": to, "from": sender, "message_id": msg["Message-ID"], "server": settings.hostname}


# -- the wizard's state (the web asks; only the agent writes) --------------------------------

RESTORE_JOB = "setup_restore"
WIZARD_STEPS = ("domain", "admin", "dns", "certs", "deploy")


def setup_is_complete(ctx: Context) -> bool:
    return store.read_setting(ctx.state_dir, "setup_complete") == "1"


def _refuse_after_setup(ctx: Context) -> None:
    if setup_is_complete(ctx):
        raise OpError("forbidden", "setup is finished: this appliance restores a backup from the dashboard "
                                   "(Backups), not from the setup wizard")


def _refuse_wizard_after_setup(ctx: Context) -> None:
    if setup_is_complete(ctx) or StateLayout(ctx.state_dir).setup_finished.exists():
        raise OpError("forbidden", "setup is finished: change this in the dashboard, not in the setup wizard")


@privileged(web=True, timeout=5.0, secret=("session",))
def portal_state(ctx: Context, session: str = "") -> dict[str, Any]:
    """What the portal's pages show and route by: the settings (no secrets are settings),
    the wizard steps done, whether setup is complete, and whether the browser's admin
    `session` id is a live session (signing out ends it on the server). Read by the web
    process once per request instead of opening state.db."""
    from portal.admin.privileged import session_valid
    from portal.core.settings import SETTINGS

    values = store.read_settings(ctx.state_dir)
    return {"settings": {k: v for k, v in values.items() if SETTINGS[k].public},
            "done_steps": sorted(store.done_steps(ctx.state_dir)),
            "setup_complete": values.get("setup_complete") == "1",
            "session_valid": session_valid(ctx, session) if session else False}


@privileged(timeout=10.0)
def settings_set(ctx: Context, key: str, value: str) -> dict[str, Any]:
    """Store one setting (root only: `mailstead settings-set KEY=VALUE` on the console), checked
    like every other (portal/core/settings.py lists them); an empty value removes it."""
    from portal.core.settings import SETTINGS

    if key not in SETTINGS:
        raise OpError("invalid", f"'{key[:40]}' is not a setting; known: {', '.join(sorted(SETTINGS))}", "key")
    if value == "":
        store.delete_settings(ctx.state_dir, [key])
        return {"key": key, "removed": True}
    stored = store.write_settings(ctx.state_dir, {key: value})
    return {"key": key, "value": stored[key]}


@privileged(web=True, timeout=5.0, secret=("token",))
def setup_token_check(ctx: Context, token: str) -> dict[str, Any]:
    """Whether `token` is the setup token (constant time). The web never reads the token
    file: it asks here. Refused once setup is finished."""
    layout = StateLayout(ctx.state_dir)
    if setup_is_complete(ctx) or layout.setup_finished.exists():
        raise OpError("finished", "setup is finished: sign in to the dashboard with the administrator account")
    try:
        expected = safefs.read_text(layout.setup_token, 4096).strip()
    except FileNotFoundError:
        raise OpError("no_token", "The setup token has not been generated yet: mailstead-firstboot has not run. "
                                  "Wait for the appliance to finish booting, or run “systemctl start "
                                  "mailstead-firstboot” as root, then reload this page.") from None
    except (OSError, UnicodeDecodeError, safefs.UnsafePathError):
        raise OpError("no_token", "The agent cannot read the setup token file; as root, remove "
                                  f"{layout.setup_token} and run “systemctl restart mailstead-firstboot”") from None
    if not expected:
        raise OpError("no_token", "The setup token file is empty; as root, remove it and run "
                                  "“systemctl restart mailstead-firstboot”")
    given = token.strip().encode("utf-8", "replace")
    return {"ok": hmac.compare_digest(given, expected.encode("utf-8"))}


@privileged(web=True, timeout=10.0)
def wizard_domain(ctx: Context, domain: str, mail_host: str = "", public_ipv4: str = "",
                  public_ipv6: str = "", dns_resolvers: str = "") -> dict[str, Any]:
    """The Domain step: the mail domain, the mail host name (default mail.<domain>), the
    public addresses (global ones only, unless dns_allow_private is set) and the resolvers.
    Names are stored in their ASCII (punycode) form."""
    from portal.dns import DnsError
    from portal.dns.names import parse_resolvers
    from portal.dns.names import normalize_domain
    from portal.dns.settings import check_ip

    _refuse_wizard_after_setup(ctx)
    allow_private = store.read_setting(ctx.state_dir, "dns_allow_private") == "1"
    try:
        name = normalize_domain(domain, "domain").ascii
        host = normalize_domain(mail_host.strip() or f"mail.{name}", "mail_host").ascii
        v4 = check_ip(public_ipv4, 4, "public_ipv4", allow_private)
        if v4 is None:
            raise DnsError("enter this server's public IPv4 address, e.g. 203.0.113.10", "public_ipv4")
        v6 = check_ip(public_ipv6, 6, "public_ipv6", allow_private) or ""
        resolvers = parse_resolvers(dns_resolvers, "dns_resolvers")
    except DnsError as exc:
        raise OpError("invalid", exc.message, exc.field) from None
    values = {"domain": name, "mail_host": host, "public_ipv4": v4, "public_ipv6": v6,
              "dns_resolvers": ", ".join(h if p == 53 else (f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
                                         for h, p in resolvers)}
    store.mark_done(ctx.state_dir, "domain", values)
    return values


@privileged(web=True, timeout=10.0)
def wizard_admin_done(ctx: Context) -> dict[str, Any]:
    """The Admin step is done once the administrator exists (the owner saved the codes)."""
    from portal.admin.privileged import admin_status

    _refuse_wizard_after_setup(ctx)
    if not admin_status.run(ctx).get("configured"):
        raise OpError("not_ready", "create the administrator account first")
    store.mark_done(ctx.state_dir, "admin")
    return {"done": True}


@privileged(web=True, timeout=10.0)
def wizard_dns_done(ctx: Context, accept_problems: bool = False) -> dict[str, Any]:
    """The DNS step: done when the latest check found every record, or when the owner
    accepts the problems it listed (ticked the box)."""
    from portal.agent.jobs import latest

    _refuse_wizard_after_setup(ctx)
    job = latest(ctx, "dns_check")
    result = (job or {}).get("result") if (job or {}).get("state") == "done" else None
    ok = isinstance(result, dict) and all(r.get("verdict") == "ok" for r in result.get("results") or [])
    if not ok and not accept_problems:
        raise OpError("invalid", "tick this box to continue with the problems listed above, or fix them and "
                                 "check again", "accept_problems")
    status = "ok" if ok else "problems"
    store.mark_done(ctx.state_dir, "dns", {"dns_status": status})
    return {"dns_status": status}


@privileged(web=True, timeout=15.0)
def wizard_certs_done(ctx: Context, choice: str) -> dict[str, Any]:
    """The Certificates step: "ca" once a CA's certificate is installed, or "self-signed"."""
    _refuse_wizard_after_setup(ctx)
    if choice not in ("ca", "self-signed"):
        raise OpError("invalid", "choose ca or self-signed", "choice")
    if choice == "ca" and not (StateLayout(ctx.state_dir).tls / "live" / "fullchain.pem").exists():
        raise OpError("not_ready", "no certificate from a CA is installed yet: get one above, or continue with "
                                   "the self-signed certificate")
    store.mark_done(ctx.state_dir, "certs", {"cert_choice": choice})
    return {"cert_choice": choice}


# -- finishing setup -----------------------------------------------------------------------

def _forget_token(ctx: Context) -> bool:
    """Setup is finished for good: the marker (no token is ever made again, whatever
    the settings say later) and the token deleted."""
    layout = StateLayout(ctx.state_dir)
    safefs.write_new(layout.setup_finished, b"setup finished\n", 0o644)
    return safefs.remove(layout.setup_token)


@privileged(web=True, timeout=10.0)
def setup_finish(ctx: Context) -> dict[str, Any]:
    """End setup for good: setup_complete=1, the deploy step done, the setup token deleted
    and never made again."""
    if store.read_setting(ctx.state_dir, "stack_deployed") != "1":
        raise OpError("not_ready", "the mail server has not been deployed yet; press Deploy first")
    store.mark_done(ctx.state_dir, "deploy", {"setup_complete": "1"})
    existed = _forget_token(ctx)
    return {"setup_complete": True, "token_deleted": existed}


# -- restoring onto a fresh appliance (the wizard's "Restore from a backup") ------------------

def check_setup_restore(ctx: Context, snapshot: str = "latest") -> dict[str, Any]:
    from portal.backup.privileged import check_restore

    _refuse_after_setup(ctx)
    return check_restore(ctx, snapshot)


def restored_summary(state_dir: Path) -> dict[str, Any]:
    """What the restored state holds, for the wizard's last page (no secrets)."""
    import sqlite3

    admin: Any = None
    try:
        record = json.loads((state_dir / "secrets" / "admin.json").read_text(encoding="utf-8"))
        admin = str(record.get("address")) if isinstance(record, dict) and record.get("address") else None
    except (OSError, ValueError):
        pass
    accounts = {"mailboxes": 0, "aliases": 0}
    path = state_dir / "accounts" / "accounts.db"
    if path.exists():
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                for table in accounts:
                    accounts[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            finally:
                conn.close()
        except sqlite3.Error:
            pass
    dkim = state_dir / "secrets" / "dkim"
    return {"admin_address": admin, **accounts,
            "dkim_keys": sum(1 for p in dkim.iterdir() if p.is_file()) if dkim.is_dir() else 0,
            "certificate": (state_dir / "tls" / "live").exists() or (state_dir / "tls" / "cert.pem").exists()}


@privileged(web=True, job=True, timeout=10.0, check=check_setup_restore)
def setup_restore(ctx: Context, progress: Progress, snapshot: str = "latest") -> dict[str, Any]:
    """The wizard's restore of `snapshot` (a job, watched with job_status). The backup
    target must be configured first (backup_configure with the recovery sheet's password).
    Refused once setup is complete. When the restored state says setup is complete, the
    setup token is deleted (also when the restored stack failed to start, since the
    portal is then the dashboard already)."""
    from portal.backup.privileged import backup_restore

    _refuse_after_setup(ctx)
    token = StateLayout(ctx.state_dir).setup_token
    try:
        result = backup_restore.run(ctx, progress=progress, snapshot=snapshot)
    finally:
        complete = setup_is_complete(ctx)
        existed = complete and token.exists()
        if complete:
            _forget_token(ctx)
            progress("setup", "setup is complete (from the backup): the setup token is deleted")
    if not complete:
        progress("setup", "the backup was made before setup was finished: continue in the setup wizard")
    return {**result, "setup_complete": complete, "token_deleted": existed,
            "restored": restored_summary(ctx.state_dir)}


# -- dashboard -------------------------------------------------------------------------------

def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """MemTotal and MemAvailable in bytes ({} if unreadable)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            try:
                out[key] = int(rest.split()[0]) * 1024
            except (ValueError, IndexError):
                pass
    return out


@privileged(web=True, timeout=10.0)
def system_status(ctx: Context) -> dict[str, Any]:
    """Free space of the state directory's file system, memory, load and uptime."""
    out: dict[str, Any] = {}
    try:
        usage = shutil.disk_usage(ctx.state_dir)
        out["disk"] = {"path": str(ctx.state_dir), "total": usage.total, "free": usage.free,
                       "used_percent": round(100 * (usage.total - usage.free) / usage.total, 1)
                       if usage.total else 0.0}
    except OSError as err:
        out["disk"] = {"path": str(ctx.state_dir), "error": err.strerror or type(err).__name__}
    mem = meminfo()
    if mem:
        out["memory"] = {"total": mem.get("MemTotal", 0), "available": mem.get("MemAvailable", 0)}
    try:
        out["load"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    out["time"] = time.time()
    return out


@privileged(web=True, timeout=20.0)
def stack_logs(ctx: Context, service: str, lines: int = 100) -> dict[str, Any]:
    """The last `lines` (1 to 500) lines of a service's container log, with timestamps."""
    if service not in SERVICES:
        raise OpError("invalid", f"choose one of {', '.join(SERVICES)}", "service")
    if lines < 1:
        raise OpError("invalid", f"must be between 1 and {MAX_LOG_LINES}", "lines")
    lines = min(lines, MAX_LOG_LINES)
    with stack_ops.refusals():
        settings = stack_ops.settings_for(ctx)
    client = ctx.docker()
    try:
        found = client.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={settings.project}", f"com.docker.compose.service={service}"]})
        if not found:
            raise OpError("not_found", f"there is no {service} container yet; deploy the stack first", "service")
        container = found[0]
        raw = container.logs(tail=lines, timestamps=True)
    except OpError:
        raise
    except Exception as err:  # docker refused or went away: say so, briefly
        raise OpError("docker", f"the docker engine could not give the {service} log: "
                                f"{' '.join(str(err).split())[:200]}") from None
    finally:
        client.close()
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    out = [line[:MAX_LOG_LINE_CHARS] for line in text.splitlines()][-lines:]
    return {"service": service, "container": getattr(container, "name", service), "lines": out}
