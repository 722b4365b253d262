"""The agent's side of the administrator account: TOTP enrolment, the admin
record, sign-in with lockout backoff, recovery codes; plus `net_addresses` for
the Domain step.

Files (all 0600 in <state>/secrets, 0700):
- admin-totp.pending   {"secret", "address"}: the TOTP secret being enrolled;
                       kept until admin_setup succeeds, so a reload shows the same QR code
- admin.json           {"address", "password_hash" (argon2id), "totp_secret",
                        "totp_last_step", "recovery_codes" (sha256 hex of unused codes)}
- admin-lockout.json   {"failures", "locked_until"}: consecutive failed sign-ins
- pending-mailboxes.json  [{"address", "password"}]: mailboxes to create once the
                       stack runs (the Deploy step calls take_pending_mailboxes)

Passwords, TOTP codes and recovery codes arrive as arguments and are never logged.
The TOTP secret is returned only by admin_totp_begin (the page must show it).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from portal.agent.ops import Context, OpError, operation
from portal.web.db import read_setting
from portal.stack.accounts import (
    MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, AccountError, check_address, hash_password,
    verify_password,
)

PENDING_TOTP = "admin-totp.pending"
ADMIN_RECORD = "admin.json"
LOCKOUT = "admin-lockout.json"
PENDING_MAILBOXES = "pending-mailboxes.json"

ISSUER = "Mailstead"
RECOVERY_CODES = 10
RECOVERY_GROUPS = 4          # XXXX-XXXX-XXXX-XXXX: 16 base32 characters, 80 bits
RECOVERY_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
LOCK_AFTER = 5               # failures in a row before the first lock
LOCK_FIRST = 60.0            # seconds; doubles with each further failure
LOCK_MAX = 3600.0
TRUE_VALUES = {"1", "true", "yes", "on"}

# One agent process, many threads: read-modify-write of the files under one lock.
_lock = threading.RLock()


# -- files ------------------------------------------------------------------------

def secrets_dir(state_dir: Path) -> Path:
    folder = Path(state_dir) / "secrets"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def _write_json(path: Path, data: Any) -> None:
    """Atomically replace `path` with `data` as JSON, mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise OpError("admin_state", f"{path.name} in the secrets folder is unreadable or damaged; "
                                     "as root, check it or remove it and run the Admin step again") from None


# -- pending mailboxes (the Deploy step creates them) ---------------------------------

def put_pending_mailbox(state_dir: Path, address: str, password: str) -> None:
    """Remember a mailbox to create once the stack runs (replacing one with the same address)."""
    with _lock:
        path = secrets_dir(state_dir) / PENDING_MAILBOXES
        entries = [e for e in (_read_json(path) or []) if e.get("address") != address]
        entries.append({"address": address, "password": password})
        _write_json(path, entries)


def take_pending_mailboxes(state_dir: Path) -> list[tuple[str, str]]:
    """The mailboxes waiting for the stack, as (address, password); the file is deleted.
    If creating them fails, give them back with put_pending_mailbox."""
    with _lock:
        path = Path(state_dir) / "secrets" / PENDING_MAILBOXES
        entries = _read_json(path) or []
        path.unlink(missing_ok=True)
    return [(str(e["address"]), str(e["password"])) for e in entries
            if isinstance(e, dict) and "address" in e and "password" in e]


# -- checks -----------------------------------------------------------------------

def _setting(ctx: Context, key: str) -> str:
    return read_setting(ctx.state_dir / "state.db", key) or ""


def _setup_complete(ctx: Context) -> bool:
    return _setting(ctx, "setup_complete").strip().lower() in TRUE_VALUES


def check_admin_address(ctx: Context, address: str) -> str:
    """The normalized admin address, which must be in the mail domain."""
    try:
        normalized = check_address((address or "").strip(), "address")
    except AccountError as exc:
        raise OpError("invalid", f"address: {exc.message}") from None
    domain = _setting(ctx, "domain").strip()
    if not domain:
        raise OpError("invalid", "address: the mail domain is not set yet; finish the Domain step first")
    if normalized.rpartition("@")[2] != domain:
        raise OpError("invalid", f"address: the administrator's address must be in your domain; "
                                 f"enter one ending in @{domain}, such as postmaster@{domain}")
    return normalized


def check_admin_password(password: str, address: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise OpError("invalid", f"password: use at least {MIN_PASSWORD_LENGTH} characters "
                                 "(a few random words work well)")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise OpError("invalid", f"password: use at most {MAX_PASSWORD_LENGTH} characters")
    if any(ch in password for ch in "\0\n\r"):
        raise OpError("invalid", "password: must not contain line breaks or NUL characters")
    if password.strip().lower() in (address.lower(), address.partition("@")[0].lower()):
        raise OpError("invalid", "password: must not be the address itself; choose something others "
                                 "cannot guess")


def _refuse_after_setup(ctx: Context) -> None:
    if _setup_complete(ctx):
        raise OpError("forbidden", "setup is finished; the administrator account can no longer be "
                                   "replaced through the setup wizard")


# -- TOTP -------------------------------------------------------------------------

def totp_uri(secret: str, address: str) -> str:
    import pyotp

    return pyotp.TOTP(secret).provisioning_uri(name=address, issuer_name=ISSUER)


def _totp_step(secret: str, code: str, last_step: int = -1, now: float | None = None) -> int | None:
    """The time step (30 s) whose code is `code` (±1 step of clock drift), if newer than
    `last_step` (a code works once); None otherwise."""
    import pyotp

    if not (isinstance(code, str) and len(code) == 6 and code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    step = int((time.time() if now is None else now) // totp.interval)
    found = None
    for candidate in (step - 1, step, step + 1):
        if hmac.compare_digest(totp.at(candidate * totp.interval), code) and candidate > last_step:
            found = candidate
    return found


def _clean_code(code: str) -> str:
    return "".join((code or "").split()).replace("-", "")


@operation("admin_totp_begin")
def admin_totp_begin(ctx: Context, address: str) -> dict[str, Any]:
    """Start (or continue) TOTP enrolment: the pending secret (made once, kept
    until admin_setup succeeds) and its otpauth:// URI for `address`."""
    with _lock:
        _refuse_after_setup(ctx)
        address = check_admin_address(ctx, address)
        path = secrets_dir(ctx.state_dir) / PENDING_TOTP
        pending = _read_json(path)
        if not isinstance(pending, dict) or not isinstance(pending.get("secret"), str):
            import pyotp

            pending = {"secret": pyotp.random_base32()}
        if pending.get("address") != address:
            pending["address"] = address
            _write_json(path, pending)
        return {"secret": pending["secret"], "uri": totp_uri(pending["secret"], address), "address": address}


@operation("admin_setup")
def admin_setup(ctx: Context, address: str, password: str, totp_code: str) -> dict[str, Any]:
    """Create the administrator: checks the address, the password and a code from the
    pending TOTP secret; stores admin.json and the admin mailbox for Deploy; returns
    10 recovery codes (shown once, only their hashes are kept)."""
    with _lock:
        _refuse_after_setup(ctx)
        address = check_admin_address(ctx, address)
        check_admin_password(password, address)
        folder = secrets_dir(ctx.state_dir)
        pending = _read_json(folder / PENDING_TOTP)
        if not isinstance(pending, dict) or not isinstance(pending.get("secret"), str):
            raise OpError("invalid", "totp_code: the authenticator enrolment has expired; reload the page, "
                                     "scan the new QR code and enter the code it shows")
        code = _clean_code(totp_code)
        if not (len(code) == 6 and code.isascii() and code.isdigit()):
            raise OpError("invalid", "totp_code: enter the 6-digit code your authenticator app shows")
        step = _totp_step(pending["secret"], code)
        if step is None:
            raise OpError("invalid", "totp_code: that code is not right; check that the phone's clock is "
                                     "correct and enter the current 6-digit code")
        codes = ["-".join("".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(4))
                          for _ in range(RECOVERY_GROUPS)) for _ in range(RECOVERY_CODES)]
        record = {
            "address": address,
            "password_hash": hash_password(password),
            "totp_secret": pending["secret"],
            "totp_last_step": step,
            "recovery_codes": [_code_hash(c) for c in codes],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json(folder / ADMIN_RECORD, record)
        put_pending_mailbox(ctx.state_dir, address, password)
        (folder / PENDING_TOTP).unlink(missing_ok=True)
        (folder / LOCKOUT).unlink(missing_ok=True)
        return {"address": address, "recovery_codes": codes}


@operation("admin_status")
def admin_status(ctx: Context) -> dict[str, Any]:
    """Whether the administrator exists, its address and how many recovery codes are left."""
    with _lock:
        record = _read_json(ctx.state_dir / "secrets" / ADMIN_RECORD)
        if not isinstance(record, dict):
            return {"configured": False, "address": None, "recovery_codes_left": 0}
        return {"configured": True, "address": record.get("address"),
                "recovery_codes_left": len(record.get("recovery_codes", []))}


# -- sign-in ------------------------------------------------------------------------

def _code_hash(code: str) -> str:
    return hashlib.sha256(_clean_code(code).upper().encode("ascii", "replace")).hexdigest()


def lock_seconds(failures: int) -> float:
    """How long to lock after `failures` consecutive failures (0: not locked)."""
    if failures < LOCK_AFTER:
        return 0.0
    return min(LOCK_FIRST * 2 ** (failures - LOCK_AFTER), LOCK_MAX)


def _locked_message(until: float, now: float) -> str:
    wait = max(1, int(until - now + 0.999))
    when = datetime.fromtimestamp(until, timezone.utc).strftime("%H:%M:%S UTC")
    span = f"{wait} seconds" if wait < 120 else f"{(wait + 59) // 60} minutes"
    return (f"Too many failed sign-ins in a row. Sign-in is locked; try again after {when} "
            f"(in {span}).")


@contextlib.contextmanager
def _lockout(ctx: Context, now: float) -> Iterator[dict[str, Any]]:
    path = secrets_dir(ctx.state_dir) / LOCKOUT
    state = _read_json(path)
    if not isinstance(state, dict):
        state = {"failures": 0, "locked_until": 0.0}
    before = dict(state)
    try:
        yield state
    finally:
        if state != before:
            _write_json(path, state)


@operation("admin_login")
def admin_login(ctx: Context, address: str, password: str, code: str) -> dict[str, Any]:
    """Check the administrator's address, password and TOTP code (or an unused recovery
    code, which is then spent). After 5 failures in a row sign-in is locked for 1 minute,
    doubling with each further failure up to 1 hour."""
    now = time.time()
    with _lock, _lockout(ctx, now) as lock:
        if lock.get("locked_until", 0) > now:
            raise OpError("locked", _locked_message(lock["locked_until"], now))
        record = _read_json(ctx.state_dir / "secrets" / ADMIN_RECORD)
        if not isinstance(record, dict):
            raise OpError("not_configured", "no administrator account exists yet; finish the setup wizard")
        given = (address or "").strip().lower().encode("utf-8", "replace")
        address_ok = hmac.compare_digest(given, str(record.get("address", "")).encode("utf-8"))
        # Always verify the password, so a wrong address takes as long as a wrong password.
        password_ok = verify_password(str(record.get("password_hash", "")), password or "")
        cleaned = _clean_code(code)
        used_recovery = False
        code_ok = False
        if len(cleaned) == 6 and cleaned.isdigit():
            step = _totp_step(str(record.get("totp_secret", "")), cleaned, int(record.get("totp_last_step", -1)))
            code_ok = step is not None
        elif cleaned:
            wanted = _code_hash(cleaned)
            matches = [h for h in record.get("recovery_codes", []) if hmac.compare_digest(h, wanted)]
            code_ok = used_recovery = bool(matches)
        if not (address_ok and password_ok and code_ok):
            lock["failures"] = int(lock.get("failures", 0)) + 1
            seconds = lock_seconds(lock["failures"])
            if seconds:
                lock["locked_until"] = now + seconds
                raise OpError("locked", _locked_message(lock["locked_until"], now))
            raise OpError("denied", "The address, password or code is not right. Check them and try again "
                                    "(a code works once; wait for the next one if you just used it).")
        lock["failures"], lock["locked_until"] = 0, 0.0
        if used_recovery:
            record["recovery_codes"] = [h for h in record["recovery_codes"] if not hmac.compare_digest(h, wanted)]
        else:
            record["totp_last_step"] = step
        _write_json(ctx.state_dir / "secrets" / ADMIN_RECORD, record)
        return {"address": record["address"], "used_recovery_code": used_recovery,
                "recovery_codes_left": len(record.get("recovery_codes", []))}


# -- the Domain step's defaults ------------------------------------------------------

def resolv_conf_nameservers(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            if str(ip) not in found:
                found.append(str(ip))
    return found


@operation("net_addresses")
def net_addresses(ctx: Context) -> dict[str, Any]:
    """The interfaces' global IPv4/IPv6 addresses (with the setting dns_allow_private=1
    also private ones, for labs) and the nameservers of /etc/resolv.conf."""
    from portal.agent.firstboot import local_addresses

    allow_private = _setting(ctx, "dns_allow_private").strip().lower() in TRUE_VALUES
    out: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for addr in local_addresses():
        if addr.is_global or (allow_private and not addr.is_loopback and not addr.is_link_local):
            out[f"ipv{addr.version}"].append(addr.compressed)
    resolv = Path(os.environ.get("MAILSTEAD_RESOLV_CONF", "/etc/resolv.conf"))
    return {**out, "resolvers": resolv_conf_nameservers(resolv)}
