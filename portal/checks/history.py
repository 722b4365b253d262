"""Check history (bounded, in state.db) and alerts on a change of state.

Every round adds one row per check to `health_history` (KEEP rows kept per
check: at every 5 minutes about a week, enough for the dashboard's timeline).
A check whose status differs from its previous row is a change; a check seen
for the first time counts as changed from "ok" (so a first failure alerts and
a first success does not). One round's changes go out as one alert: a mail to
the admin (setting admin_address), handed to the stack's postfix
(portal/stack/localmail.py: DKIM-signed, not scored as a stranger's), and, if
the setting alert_webhook_url is set, one JSON POST to it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sqlite3
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from portal.checks import CheckResult

log = logging.getLogger("mailstead.checks")

SCHEMA = """
CREATE TABLE IF NOT EXISTS health_history (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    check_id TEXT NOT NULL,
    at       REAL NOT NULL,
    status   TEXT NOT NULL,
    message  TEXT NOT NULL,
    fix      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS health_history_check ON health_history (check_id, id);
"""
KEEP = 2016  # per check: a week of 5-minute rounds
TIMEOUT = 10.0


def _db(state_dir: Path) -> sqlite3.Connection:
    """state.db through its one opener (root's 0600 file, never a symlink: portal/core/store.py)."""
    from portal.core.store import connect

    conn = connect(state_dir)
    conn.executescript(SCHEMA)
    if "fix" not in {row["name"] for row in conn.execute("PRAGMA table_info(health_history)")}:
        try:  # a table from before the fix was kept (the dashboard shows the latest fix)
            conn.execute("ALTER TABLE health_history ADD COLUMN fix TEXT NOT NULL DEFAULT ''")
        except sqlite3.OperationalError:
            pass  # another connection added it just now
    return conn


def record(state_dir: Path, results: list[CheckResult], at: float | None = None) -> list[dict[str, Any]]:
    """Store one round; return the changes [{id, old, new, message, fix}]."""
    at = time.time() if at is None else at
    changes = []
    conn = _db(state_dir)
    try:
        with conn:  # one transaction: two concurrent rounds cannot both see the same change
            conn.execute("BEGIN IMMEDIATE")
            for r in results:
                row = conn.execute("SELECT status FROM health_history WHERE check_id = ? ORDER BY id DESC LIMIT 1",
                                   (r.id,)).fetchone()
                old = row["status"] if row else "ok"
                if old != r.status:
                    changes.append({"id": r.id, "old": old, "new": r.status, "message": r.message, "fix": r.fix})
                conn.execute("INSERT INTO health_history (check_id, at, status, message, fix) VALUES (?, ?, ?, ?, ?)",
                             (r.id, at, r.status, r.message[:500], r.fix[:500]))
                conn.execute("DELETE FROM health_history WHERE check_id = ? AND id <= "
                             "(SELECT id FROM health_history WHERE check_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                             (r.id, r.id, KEEP))
    finally:
        conn.close()
    return changes


def history(state_dir: Path, check_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    conn = _db(state_dir)
    try:
        if check_id:
            rows = conn.execute("SELECT * FROM health_history WHERE check_id = ? ORDER BY id DESC LIMIT ?",
                                (check_id, limit)).fetchall()
        else:
            rows = conn.execute("SELECT * FROM health_history ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    finally:
        conn.close()
    return [{"id": r["check_id"], "at": r["at"], "status": r["status"], "message": r["message"], "fix": r["fix"]}
            for r in rows]


# -- alerts -------------------------------------------------------------------------------

def alert_text(hostname: str, changes: list[dict[str, Any]]) -> tuple[str, str]:
    worst = "fail" if any(c["new"] == "fail" for c in changes) else (
        "warn" if any(c["new"] == "warn" for c in changes) else "ok")
    word = {"fail": "PROBLEM", "warn": "WARNING", "ok": "RESOLVED"}[worst]
    subject = f"[Mailstead {hostname}] {word}: " + ", ".join(f"{c['id']} {c['new']}" for c in changes)
    lines = [f"Health checks on {hostname} changed state:", ""]
    for c in changes:
        lines.append(f"* {c['id']}: {c['old']} -> {c['new']}")
        lines.append(f"  {c['message']}")
        if c.get("fix") and c["new"] != "ok":
            lines.append(f"  What to do: {c['fix']}")
        lines.append("")
    lines.append("You get a mail only when a check changes state. `mailstead status` shows every check.")
    return subject[:200], "\n".join(lines) + "\n"


def alert_message(sender: str, to: str, subject: str, body: str, hostname: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Mailstead <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)
    return msg


class WebhookError(Exception):
    """The webhook was not sent, or not accepted: `reason` says why (never the URL)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def post_webhook(url: str, payload: dict[str, Any], allow_private: bool = False, timeout: float = TIMEOUT) -> int:
    """POST `payload` as JSON to `url`: its host resolved once and checked (see
    resolve_public), the connection made to that address (TLS verified against the
    host name), no redirect followed (a 3xx is a WebhookError naming where it led).
    Returns the HTTP status (2xx); WebhookError otherwise."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    from portal.dns.netcheck import AddressRefused, resolve_public

    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        raise WebhookError("the URL's port is not a number") from None
    try:
        addresses = resolve_public(host, port, allow_private, "alerts-private")
    except AddressRefused as err:
        raise WebhookError(err.reason) from None
    last: OSError | None = None
    sock = None
    for address in addresses:
        try:
            sock = socket.create_connection((address, port), timeout=timeout)
            break
        except OSError as err:
            last = err
    if sock is None:
        assert last is not None
        raise WebhookError(f"cannot connect to {host} port {port} ({last.strerror or type(last).__name__})")
    conn: http.client.HTTPConnection
    try:
        if https:
            tls = ssl.create_default_context()
            sock = tls.wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock  # already connected to the checked address: http.client never resolves again
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json", "User-Agent": "mailstead-alerts"})
        resp = conn.getresponse()
        resp.read(64 * 1024)
    except ssl.SSLError as err:
        sock.close()
        raise WebhookError(f"TLS with {host} failed ({err.reason or type(err).__name__})") from None
    except (OSError, http.client.HTTPException) as err:
        sock.close()
        raise WebhookError(f"{host} port {port}: {getattr(err, 'strerror', None) or type(err).__name__}") from None
    conn.close()
    if 300 <= resp.status < 400:
        where = urlsplit(resp.getheader("Location") or "").hostname or host
        raise WebhookError(f"HTTP {resp.status}: {host} redirects to {where[:100]}, and redirects are not "
                           "followed; give the URL it redirects to")
    if not 200 <= resp.status < 300:
        raise WebhookError(f"HTTP {resp.status}")
    return resp.status


from portal.core.errors import MailsteadError  # noqa: E402


class AlertSettingError(MailsteadError, ValueError):
    code = "invalid"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


def check_webhook_url(url: str, allow_private: bool = False) -> str:
    """https://host/... (http:// only to this machine, e.g. a local relay); empty: no webhook.
    A host given as a private, loopback, link-local or reserved address (or localhost)
    is refused unless `allow_private` (the setting alert_webhook_private); a name is
    resolved and checked each time an alert is sent (post_webhook)."""
    from urllib.parse import urlsplit

    url = url.strip()
    if not url:
        return ""
    example = "e.g. https://ntfy.sh/your-topic or https://hooks.example.com/mailstead"
    if len(url) > 500 or any(c.isspace() for c in url):
        raise AlertSettingError("alert_webhook_url", f"must be one URL without spaces, at most 500 characters; {example}")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise AlertSettingError("alert_webhook_url", f"must start with https:// and name a host; {example}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise AlertSettingError("alert_webhook_url", "must use https:// (alerts describe your server; plain "
                                                     "http:// is only accepted to this machine itself)")
    if not allow_private:
        from portal.dns.netcheck import address_kind

        try:
            kind = "loopback" if parts.hostname == "localhost" else address_kind(ipaddress.ip_address(parts.hostname))
        except ValueError:
            kind = None  # a name: checked when an alert is sent
        if kind:
            raise AlertSettingError("alert_webhook_url", f"names a {kind} address; alerts go only to public "
                                                         "addresses unless the owner allows private ones "
                                                         "(as root: mailstead alerts-private on)")
    return url


def check_dnsbl_zones(text: str) -> str:
    import re

    zones = [z.strip().lower().rstrip(".") for z in text.split(",") if z.strip()]
    label = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
    for zone in zones:
        if len(zone) > 253 or zone.count(".") < 1 or not all(label.match(x) for x in zone.split(".")):
            raise AlertSettingError("dnsbl_zones", f"'{zone[:60]}' is not a DNS zone; give blocklist zones "
                                                   "separated by commas, e.g. zen.spamhaus.org,bl.spamcop.net")
    if len(zones) > 10:
        raise AlertSettingError("dnsbl_zones", "give at most 10 blocklists (each is asked every 5 minutes)")
    return ",".join(dict.fromkeys(zones))


def alert(ctx: Any, values: dict[str, str], stack_settings: Any, changes: list[dict[str, Any]]) -> dict[str, Any]:
    """Send one round's changes (the mail through the stack's postfix, portal/stack/localmail.py,
    or ctx.send_mail); returns what was sent or why not (never raises, never shows the URL)."""
    out: dict[str, Any] = {"mail": "not sent", "webhook": "not configured"}
    if not changes:
        return {"mail": "no change", "webhook": "no change"}
    hostname = stack_settings.hostname if stack_settings else (values.get("mail_host") or "mailstead")
    subject, body = alert_text(hostname, changes)
    to = (values.get("admin_address") or "").strip()
    if not to:
        out["mail"] = "not sent: admin_address is not set (the Administrator step of setup)"
    elif stack_settings is None:
        out["mail"] = "not sent: the mail stack is not set up yet"
    else:
        from portal.stack import localmail

        sender = f"mailstead@{stack_settings.domain}"
        try:
            localmail.send(ctx, stack_settings, alert_message(sender, to, subject, body, stack_settings.hostname),
                           sender, to)
            out["mail"] = f"sent to {to}"
        except localmail.NotSent as err:
            out["mail"] = f"failed: {err.reason}"
            log.warning("alert mail to the admin failed: %s", out["mail"])
    url = (values.get("alert_webhook_url") or "").strip()
    if url:
        try:
            check_webhook_url(url, (values.get("alert_webhook_private") or "").strip() == "1")
        except AlertSettingError as err:
            out["webhook"] = f"not sent: {err}"
        else:
            payload = {"host": hostname, "subject": subject, "changes": changes, "at": time.time()}
            allow_private = (values.get("alert_webhook_private") or "").strip() == "1"
            try:
                out["webhook"] = f"sent (HTTP {post_webhook(url, payload, allow_private)})"
            except WebhookError as err:
                out["webhook"] = f"failed: {err.reason}"  # never the URL: it may hold a token
            if out["webhook"].startswith("failed"):
                log.warning("alert webhook %s", out["webhook"])
    return out
