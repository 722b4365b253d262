"""The agent's side of the administrator account: TOTP enrolment, the admin
record, sign-in with lockout backoff, recovery codes; plus `net_addresses` for
the Domain step.

Files (all 0600 in <state>/secrets, 0700):
- admin-totp.pending   {"secret", "address"}: the TOTP secret being enrolled;
                       kept until admin_setup succeeds, so a reload shows the same QR code
- admin.json           {"address", "password_hash" (argon2id), "totp_secret",
                        "totp_last_step", "recovery_codes" (sha256 hex of unused codes)}
- admin-lockout.json   {"clients": {client: {"failures", "locked_until", "seen"}}}: consecutive
                       failed sign-ins per client; "confirm": wrong codes given to confirm a change
- admin-ledger.json    {"spent_recovery_codes" (sha256 hex), "totp_last_step"}: every recovery
                       code ever spent and the highest TOTP step ever used. A restore never
                       replaces it (it merges the snapshot's in): an older admin.json brought back
                       by a restore cannot bring back a spent code or an older step.
- admin-sessions.json  {sha256 of a session id: {"created", "seen"}}: signed-in browsers
- admin-totp-reset.pending  {"secret", "created"}: a new TOTP secret being enrolled from the
                       dashboard (admin_totp_reset_begin/confirm)
- pending-mailboxes.json  [{"address", "password_hash", "key_kdf", "key_salt", "key_password"}]:
                       mailboxes to create once the stack runs (the Deploy step calls
                       take_pending_mailboxes); the password itself is never written

Passwords, TOTP codes and recovery codes arrive as arguments and are never logged.
The TOTP secret is returned only by admin_totp_begin and admin_totp_reset_begin (the
page must show it).

A fresh code confirms each sensitive change (`confirm_code`): a restore and a change of
the backup target (portal/backup/privileged.py), a change of the admin password or of
the authenticator (here). It follows sign-in's rule: a TOTP step newer than any used
before (sign-in included), or an unspent recovery code; five wrong codes in a row end
every signed-in session.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from portal.agent.registry import Context, OpError, privileged
from portal.core import safefs, store
from portal.core.errors import UnsafePathError
from portal.core.layout import StateLayout
from portal.core.store import read_setting
from portal.stack.accounts import (
    MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, AccountError, PreparedPassword, check_address, hash_password,
    verify_password,
)

PENDING_TOTP = "admin-totp.pending"
PENDING_TOTP_RESET = "admin-totp-reset.pending"
ADMIN_RECORD = "admin.json"
LOCKOUT = "admin-lockout.json"
LEDGER = "admin-ledger.json"
CONFIRM = "confirm"          # the lockout file's entry for wrong confirmation codes
TOTP_RESET_TTL = 15 * 60     # seconds a new authenticator key waits for its first code
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
    return safefs.ensure_dir(StateLayout(Path(state_dir)).secrets, 0o700)


def _write_json(path: Path, data: Any) -> None:
    """Atomically replace `path` with `data` as JSON, mode 0600 (the safe-write helper)."""
    safefs.write_json(path, data, 0o600)


def _read_json(path: Path) -> Any:
    try:
        return safefs.read_json(path, None)
    except UnsafePathError:
        raise OpError("admin_state", f"{path.name} in the secrets folder is not a regular file; "
                                     "as root, remove it and run the Admin step again") from None
    except (OSError, ValueError):
        raise OpError("admin_state", f"{path.name} in the secrets folder is unreadable or damaged; "
                                     "as root, check it or remove it and run the Admin step again") from None


# -- pending mailboxes (the Deploy step creates them) ---------------------------------

def put_pending_mailbox(state_dir: Path, address: str, password: str) -> None:
    """Remember a mailbox to create once the stack runs (replacing one with the same
    address). Only what the stack needs is kept (the argon2id hash and the derived key
    password: PreparedPassword), never the password itself."""
    prepared = PreparedPassword.of(password)
    with _lock:
        path = secrets_dir(state_dir) / PENDING_MAILBOXES
        entries = [e for e in (_read_json(path) or []) if isinstance(e, dict) and e.get("address") != address]
        entries.append({"address": address, **prepared.as_dict()})
        _write_json(path, entries)


def take_pending_mailboxes(state_dir: Path) -> list[tuple[str, PreparedPassword]]:
    """The mailboxes waiting for the stack, as (address, prepared password); the file is
    deleted. Entries that are not well-formed are dropped."""
    with _lock:
        path = StateLayout(Path(state_dir)).secrets / PENDING_MAILBOXES
        entries = _read_json(path) or []
        safefs.remove(path)
    out = []
    for e in entries if isinstance(entries, list) else []:
        try:
            out.append((str(e["address"]), PreparedPassword.from_dict(e)))
        except (KeyError, TypeError, ValueError):
            continue
    return out


# -- checks -----------------------------------------------------------------------

def _setting(ctx: Context, key: str) -> str:
    return read_setting(ctx.state_dir, key)


def _setup_complete(ctx: Context) -> bool:
    return _setting(ctx, "setup_complete").strip().lower() in TRUE_VALUES


def check_admin_address(ctx: Context, address: str) -> str:
    """The normalized admin address, which must be in the mail domain."""
    try:
        normalized = check_address((address or "").strip(), "address")
    except AccountError as exc:
        raise OpError("invalid", f"{exc.message}", "address") from None
    domain = _setting(ctx, "domain").strip()
    if not domain:
        raise OpError("invalid", "the mail domain is not set yet; finish the Domain step first", "address")
    if normalized.rpartition("@")[2] != domain:
        raise OpError("invalid", f"the administrator's address must be in your domain; "
                                 f"enter one ending in @{domain}, such as postmaster@{domain}", "address")
    return normalized


def check_admin_password(password: str, address: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise OpError("invalid", f"use at least {MIN_PASSWORD_LENGTH} characters "
                                 "(a few random words work well)", "password")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise OpError("invalid", f"use at most {MAX_PASSWORD_LENGTH} characters", "password")
    if any(ch in password for ch in "\0\n\r"):
        raise OpError("invalid", "must not contain line breaks or NUL characters", "password")
    if password.strip().lower() in (address.lower(), address.partition("@")[0].lower()):
        raise OpError("invalid", "must not be the address itself; choose something others "
                                 "cannot guess", "password")


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


# -- the admin record and the ledger of spent codes -----------------------------------------

HEX64 = frozenset("0123456789abcdef")
BASE32 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= HEX64


def _is_step(value: object) -> bool:
    return type(value) is int and -1 <= value < 2 ** 40


def check_ledger(data: object) -> dict[str, Any]:
    """The ledger, normalized; ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    spent = data.get("spent_recovery_codes", [])
    step = data.get("totp_last_step", -1)
    if not isinstance(spent, list) or len(spent) > 10_000 or not all(_is_hash(h) for h in spent):
        raise ValueError("spent_recovery_codes must be a list of SHA-256 hex digests")
    if not _is_step(step):
        raise ValueError("totp_last_step must be a whole number")
    return {"spent_recovery_codes": sorted(set(spent)), "totp_last_step": step}


def check_record(data: object) -> dict[str, Any]:
    """An admin record (admin.json) as admin_setup writes it, every field checked;
    ValueError naming the field otherwise (a record from a backup is untrusted)."""
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    address = data.get("address")
    try:
        if not isinstance(address, str) or check_address(address, "address") != address:
            raise ValueError("address is not a normalized mail address")
    except AccountError:
        raise ValueError("address is not a mail address") from None
    pw = data.get("password_hash")
    if not (isinstance(pw, str) and pw.removeprefix("{ARGON2ID}").startswith("$argon2id$") and len(pw) <= 512
            and pw.isascii()
            and pw.isprintable() and " " not in pw):
        raise ValueError("password_hash is not an argon2 hash")
    secret = data.get("totp_secret")
    if not (isinstance(secret, str) and 16 <= len(secret) <= 128 and set(secret) <= BASE32):
        raise ValueError("totp_secret is not a base32 TOTP key")
    if not _is_step(data.get("totp_last_step", -1)):
        raise ValueError("totp_last_step must be a whole number")
    codes = data.get("recovery_codes", [])
    if not isinstance(codes, list) or len(codes) > 100 or not all(_is_hash(h) for h in codes):
        raise ValueError("recovery_codes must be a list of SHA-256 hex digests")
    created = data.get("created", "")
    if not (isinstance(created, str) and len(created) <= 64 and created.isprintable()):
        raise ValueError("created must be a short text")
    return {"address": address, "password_hash": pw, "totp_secret": secret,
            "totp_last_step": data.get("totp_last_step", -1), "recovery_codes": list(dict.fromkeys(codes)),
            "created": created}


def _read_ledger(folder: Path) -> dict[str, Any]:
    data = _read_json(folder / LEDGER)
    if data is None:
        return {"spent_recovery_codes": [], "totp_last_step": -1}
    try:
        return check_ledger(data)
    except ValueError as exc:
        raise OpError("admin_state", f"{LEDGER} in the secrets folder is damaged ({exc}); as root, check "
                                     "it (it keeps the spent recovery codes: never just delete it)") from None


def _read_record(folder: Path) -> dict[str, Any] | None:
    record = _read_json(folder / ADMIN_RECORD)
    return record if isinstance(record, dict) else None


def _check_code(record: dict[str, Any], ledger: dict[str, Any], code: str) -> tuple[str, Any] | None:
    """Whether `code` is a TOTP code of a step newer than any used (in the record or the
    ledger), or a recovery code of the record that was never spent: ("totp", step) or
    ("recovery", its hash); None otherwise. Nothing is spent here (see _spend)."""
    cleaned = _clean_code(code)
    if len(cleaned) == 6 and cleaned.isascii() and cleaned.isdigit():
        last = max(int(record.get("totp_last_step", -1)), ledger["totp_last_step"])
        step = _totp_step(str(record.get("totp_secret", "")), cleaned, last)
        return None if step is None else ("totp", step)
    if cleaned:
        wanted = _code_hash(cleaned)
        unspent = any(hmac.compare_digest(h, wanted) for h in record.get("recovery_codes", []))
        if unspent and wanted not in ledger["spent_recovery_codes"]:
            return ("recovery", wanted)
    return None


def _spend(folder: Path, record: dict[str, Any], ledger: dict[str, Any], used: tuple[str, Any]) -> None:
    """Record `used` as spent: the ledger first (a crash in between leaves the code spent),
    then the admin record (which is written here in any case)."""
    kind, value = used
    if kind == "totp":
        ledger["totp_last_step"] = max(ledger["totp_last_step"], value)
        record["totp_last_step"] = max(int(record.get("totp_last_step", -1)), value)
    else:
        ledger["spent_recovery_codes"] = sorted({*ledger["spent_recovery_codes"], value})
        record["recovery_codes"] = [h for h in record.get("recovery_codes", []) if not hmac.compare_digest(h, value)]
    _write_json(folder / LEDGER, ledger)
    _write_json(folder / ADMIN_RECORD, record)


def restore_admin(state_dir: Path, record: dict[str, Any] | None, ledger: dict[str, Any] | None) -> dict[str, Any]:
    """After a restore: the snapshot's admin record (checked by check_record; None: the
    snapshot has none) goes in place with every code this machine's ledger or the
    snapshot's ledger spent taken out, and its TOTP step no older than either's; the
    two ledgers are merged (a fresh machine's is empty: it takes the snapshot's)."""
    with _lock:
        folder = secrets_dir(state_dir)
        if record is None and ledger is None:
            safefs.remove(folder / ADMIN_RECORD)  # a snapshot from before the Admin step; the ledger stays
            return {"admin": None, "recovery_codes_dropped": 0}
        mine = _read_ledger(folder)
        theirs = check_ledger(ledger) if ledger is not None else {"spent_recovery_codes": [], "totp_last_step": -1}
        merged = {"spent_recovery_codes": sorted({*mine["spent_recovery_codes"], *theirs["spent_recovery_codes"]}),
                  "totp_last_step": max(mine["totp_last_step"], theirs["totp_last_step"])}
        _write_json(folder / LEDGER, merged)
        if record is None:
            safefs.remove(folder / ADMIN_RECORD)
            return {"admin": None, "recovery_codes_dropped": 0, "totp_last_step": merged["totp_last_step"]}
        record = check_record(record)
        spent = set(merged["spent_recovery_codes"])
        kept = [h for h in record["recovery_codes"] if h not in spent]
        dropped = len(record["recovery_codes"]) - len(kept)
        record["recovery_codes"] = kept
        record["totp_last_step"] = max(record["totp_last_step"], merged["totp_last_step"])
        _write_json(folder / ADMIN_RECORD, record)
        return {"admin": record["address"], "recovery_codes_dropped": dropped,
                "totp_last_step": record["totp_last_step"]}


# -- fresh codes for sensitive changes ------------------------------------------------------

def _confirm_failed(ctx: Context, field: str, why: str) -> OpError:
    """Count a wrong confirmation; the fifth in a row ends every session (a stolen
    session cannot try codes for long). Returns the error to raise."""
    with _lockout(ctx, CONFIRM) as entry:
        entry["failures"] = int(entry.get("failures", 0)) + 1
        failures = entry["failures"]
        if failures >= LOCK_AFTER:
            entry["failures"] = 0
    if failures >= LOCK_AFTER:
        _save_sessions(ctx, {})
        return OpError("signed_out", f"{LOCK_AFTER} wrong codes in a row: every session was signed out. "
                                     "Sign in again to make this change.", field)
    return OpError("invalid", why, field)


def _confirm_ok(ctx: Context) -> None:
    with _lockout(ctx, CONFIRM) as entry:
        entry["failures"], entry["locked_until"] = 0, 0.0


WRONG_CODE = ("that code is not right, or was used already (a code works once: wait for the next one). "
              "Enter the current 6-digit code from your authenticator app, or an unused recovery code")


def confirm_code(ctx: Context, code: str, field: str = "totp_code") -> bool:
    """Confirm a sensitive change with a fresh code of the administrator: a TOTP code of a
    step newer than any used (sign-in included) or an unspent recovery code, which is then
    spent. False before setup is finished or while no administrator exists (a fresh
    appliance, the first-boot wizard: nobody to ask, and the setup token's holder may
    make the administrator anyway); OpError naming `field` when the code is missing,
    wrong or used already."""
    with _lock:
        folder = secrets_dir(ctx.state_dir)
        record = _read_record(folder)
        if record is None or not _setup_complete(ctx):
            return False
        if not _clean_code(code):
            raise OpError("invalid", "enter a fresh 6-digit code from your authenticator app (or an unused "
                                     "recovery code) to confirm this change", field)
        ledger = _read_ledger(folder)
        used = _check_code(record, ledger, code)
        if used is None:
            raise _confirm_failed(ctx, field, WRONG_CODE)
        _spend(folder, record, ledger, used)
        _confirm_ok(ctx)
        return True


@privileged(web=True, timeout=10.0)
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


@privileged(web=True, timeout=30.0, secret=("password", "totp_code"))
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
            raise OpError("invalid", "the authenticator enrolment has expired; reload the page, "
                                     "scan the new QR code and enter the code it shows", "totp_code")
        code = _clean_code(totp_code)
        if not (len(code) == 6 and code.isascii() and code.isdigit()):
            raise OpError("invalid", "enter the 6-digit code your authenticator app shows", "totp_code")
        step = _totp_step(pending["secret"], code)
        if step is None:
            raise OpError("invalid", "that code is not right; check that the phone's clock is "
                                     "correct and enter the current 6-digit code", "totp_code")
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
        ledger = _read_ledger(folder)
        ledger["totp_last_step"] = max(ledger["totp_last_step"], step)
        record["totp_last_step"] = ledger["totp_last_step"]
        _write_json(folder / LEDGER, ledger)
        _write_json(folder / ADMIN_RECORD, record)
        store.write_settings(ctx.state_dir, {"admin_address": address})
        put_pending_mailbox(ctx.state_dir, address, password)
        safefs.remove(folder / PENDING_TOTP)
        safefs.remove(folder / LOCKOUT)
        return {"address": address, "recovery_codes": codes}


@privileged(web=True, timeout=5.0)
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


MAX_CLIENTS = 512            # lockout records kept (the oldest unlocked ones go first)
SESSIONS = "admin-sessions.json"
MAX_SESSIONS = 20            # signed-in browsers kept; the oldest is signed out first
SESSION_SEEN_EVERY = 60.0    # seconds between updates of a session's "seen" time
SESSION_IDLE = 15 * 60       # as the web's own cookie checks (portal/web/auth.py)
SESSION_MAX_AGE = 8 * 60 * 60


def client_key(client: str) -> str:
    """Whose failures count together: an IPv4 address, an IPv6 /64 (one user's many
    addresses), or "unknown" when the web could not tell."""
    try:
        addr = ipaddress.ip_address((client or "").strip())
    except ValueError:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


@contextlib.contextmanager
def _lockout(ctx: Context, client: str) -> Iterator[dict[str, Any]]:
    """The failure record of one client (address or /64), saved if it changed. Each client
    has its own: an attacker elsewhere cannot lock the owner out."""
    path = secrets_dir(ctx.state_dir) / LOCKOUT
    data = _read_json(path)
    clients = data.get("clients") if isinstance(data, dict) else None
    if not isinstance(clients, dict):
        clients = {}
    entry = clients.get(client)
    if not isinstance(entry, dict):
        entry = {"failures": 0, "locked_until": 0.0}
    before = dict(entry)
    try:
        yield entry
    finally:
        if entry != before:
            entry["seen"] = time.time()
            if entry.get("failures"):
                clients[client] = entry
            else:
                clients.pop(client, None)
            if len(clients) > MAX_CLIENTS:
                now = time.time()
                unlocked = sorted((c for c, e in clients.items() if float(e.get("locked_until", 0)) <= now),
                                  key=lambda c: float(clients[c].get("seen", 0)))
                for old in unlocked[:len(clients) - MAX_CLIENTS]:
                    del clients[old]
            _write_json(path, {"clients": clients})


@privileged(timeout=10.0)
def admin_unlock(ctx: Context, client: str = "") -> dict[str, Any]:
    """Lift the sign-in lockout: of every client, or of one address (root only: the
    console's `mailstead admin-unlock`)."""
    with _lock:
        path = secrets_dir(ctx.state_dir) / LOCKOUT
        data = _read_json(path)
        clients = data.get("clients") if isinstance(data, dict) else {}
        clients = clients if isinstance(clients, dict) else {}
        if client:
            key = client_key(client)
            if key == "unknown":
                raise OpError("invalid", "give an IP address, or nothing to unlock every client", "client")
            removed = [key] if clients.pop(key, None) is not None else []
            _write_json(path, {"clients": clients})
        else:
            removed = sorted(clients)
            safefs.remove(path)
        return {"unlocked": removed}


# -- sessions (server side: signing out ends them; a password change ends the others) --------

def _session_hash(sid: str) -> str:
    return hashlib.sha256(sid.encode("ascii", "replace")).hexdigest()


def _sessions(ctx: Context) -> dict[str, dict[str, float]]:
    data = _read_json(secrets_dir(ctx.state_dir) / SESSIONS)
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _save_sessions(ctx: Context, sessions: dict[str, dict[str, float]]) -> None:
    _write_json(secrets_dir(ctx.state_dir) / SESSIONS, sessions)


def new_session(ctx: Context) -> str:
    """A new signed-in session: its id goes into the browser's (signed) cookie, only its
    hash is kept here."""
    sid = secrets.token_urlsafe(32)
    now = time.time()
    with _lock:
        sessions = _sessions(ctx)
        sessions[_session_hash(sid)] = {"created": now, "seen": now}
        for old in sorted(sessions, key=lambda h: sessions[h].get("seen", 0))[:-MAX_SESSIONS]:
            del sessions[old]
        _save_sessions(ctx, sessions)
    return sid


def session_valid(ctx: Context, sid: str, max_idle: float = SESSION_IDLE,
                  max_age: float = SESSION_MAX_AGE) -> bool:
    """Whether `sid` is a live session (not signed out, not idle or old); its "seen" time
    is refreshed (at most once a minute)."""
    if not sid or len(sid) > 200:
        return False
    now = time.time()
    with _lock:
        sessions = _sessions(ctx)
        entry = sessions.get(_session_hash(sid))
        if entry is None:
            return False
        if now - float(entry.get("seen", 0)) > max_idle or now - float(entry.get("created", 0)) > max_age:
            del sessions[_session_hash(sid)]
            _save_sessions(ctx, sessions)
            return False
        if now - float(entry.get("seen", 0)) > SESSION_SEEN_EVERY:
            entry["seen"] = now
            _save_sessions(ctx, sessions)
        return True


@privileged(web=True, timeout=10.0, secret=("session",))
def admin_logout(ctx: Context, session: str, everywhere: bool = False) -> dict[str, Any]:
    """End this session (its id), or every session of the administrator (`everywhere`)."""
    with _lock:
        sessions = _sessions(ctx)
        if everywhere:
            ended = len(sessions)
            sessions = {}
        else:
            ended = int(sessions.pop(_session_hash(session), None) is not None)
        _save_sessions(ctx, sessions)
    return {"ended": ended}


@privileged(web=True, timeout=30.0, secret=("password", "code"))
def admin_login(ctx: Context, address: str, password: str, code: str, client: str = "") -> dict[str, Any]:
    """Check the administrator's address, password and TOTP code (or an unused recovery
    code, which is then spent). `client` is the browser's address as the web saw it: after
    5 failures in a row from one client (an IPv4 address or an IPv6 /64) sign-in is locked
    for that client for 1 minute, doubling with each further failure up to 1 hour; other
    clients, the owner among them, are not affected. A good sign-in returns a session id
    (the agent keeps its hash: signing out ends it)."""
    now = time.time()
    with _lock, _lockout(ctx, client_key(client)) as lock:
        if lock.get("locked_until", 0) > now:
            raise OpError("locked", _locked_message(lock["locked_until"], now))
        folder = secrets_dir(ctx.state_dir)
        record = _read_record(folder)
        if record is None:
            raise OpError("not_configured", "no administrator account exists yet; finish the setup wizard")
        given = (address or "").strip().lower().encode("utf-8", "replace")
        address_ok = hmac.compare_digest(given, str(record.get("address", "")).encode("utf-8"))
        # Always verify the password, so a wrong address takes as long as a wrong password.
        password_ok = verify_password(str(record.get("password_hash", "")), password or "")
        ledger = _read_ledger(folder)
        used = _check_code(record, ledger, code)
        if not (address_ok and password_ok and used is not None):
            lock["failures"] = int(lock.get("failures", 0)) + 1
            seconds = lock_seconds(lock["failures"])
            if seconds:
                lock["locked_until"] = now + seconds
                raise OpError("locked", _locked_message(lock["locked_until"], now))
            raise OpError("denied", "The address, password or code is not right. Check them and try again "
                                    "(a code works once; wait for the next one if you just used it).")
        lock["failures"], lock["locked_until"] = 0, 0.0
        assert used is not None
        _spend(folder, record, ledger, used)
        return {"address": record["address"], "used_recovery_code": used[0] == "recovery",
                "recovery_codes_left": len(record.get("recovery_codes", [])), "session": new_session(ctx)}


# -- the administrator's own changes (dashboard Account) ---------------------------------------

def _end_other_sessions(ctx: Context, keep: str) -> int:
    """End every session but `keep` (the browser that made the change); how many ended."""
    sessions = _sessions(ctx)
    kept = {h: v for h, v in sessions.items() if keep and hmac.compare_digest(h, _session_hash(keep))}
    _save_sessions(ctx, kept)
    return len(sessions) - len(kept)


def _need_record(folder: Path) -> dict[str, Any]:
    record = _read_record(folder)
    if record is None:
        raise OpError("not_configured", "no administrator account exists yet; finish the setup wizard")
    return record


@privileged(web=True, timeout=30.0, secret=("old_password", "new_password", "totp_code", "session"))
def admin_password_change(ctx: Context, old_password: str, new_password: str, totp_code: str,
                          session: str = "") -> dict[str, Any]:
    """Change the administrator's dashboard password: the current password and a fresh
    code (TOTP or recovery) confirm it. Every other session ends (`session` is the one
    that asked, which stays signed in)."""
    with _lock:
        folder = secrets_dir(ctx.state_dir)
        record = _need_record(folder)
        try:
            check_admin_password(new_password, str(record["address"]))
        except OpError as exc:
            raise OpError(exc.code, exc.message, "new_password") from None
        if not _clean_code(totp_code):
            raise OpError("invalid", "enter a fresh 6-digit code from your authenticator app (or an unused "
                                     "recovery code) to confirm this change", "totp_code")
        password_ok = verify_password(str(record.get("password_hash", "")), old_password or "")
        ledger = _read_ledger(folder)
        used = _check_code(record, ledger, totp_code)
        if not password_ok:
            raise _confirm_failed(ctx, "old_password", "this is not the current password; enter the password "
                                                       "you sign in with")
        if used is None:
            raise _confirm_failed(ctx, "totp_code", WRONG_CODE)
        record["password_hash"] = hash_password(new_password)
        _spend(folder, record, ledger, used)
        _confirm_ok(ctx)
        ended = _end_other_sessions(ctx, session)
        return {"address": record["address"], "sessions_ended": ended,
                "used_recovery_code": used[0] == "recovery",
                "recovery_codes_left": len(record.get("recovery_codes", []))}


@privileged(web=True, timeout=10.0)
def admin_totp_reset_begin(ctx: Context) -> dict[str, Any]:
    """Start moving the administrator to a new authenticator: a new TOTP key (kept for 15
    minutes, the same on a reload) and its otpauth:// URI. Nothing changes until
    admin_totp_reset_confirm."""
    import pyotp

    with _lock:
        folder = secrets_dir(ctx.state_dir)
        record = _need_record(folder)
        path = folder / PENDING_TOTP_RESET
        pending = _read_json(path)
        now = time.time()
        if not (isinstance(pending, dict) and isinstance(pending.get("secret"), str)
                and isinstance(pending.get("created"), (int, float)) and 0 <= now - pending["created"] < TOTP_RESET_TTL):
            pending = {"secret": pyotp.random_base32(), "created": now}
            _write_json(path, pending)
        address = str(record["address"])
        return {"secret": pending["secret"], "uri": totp_uri(pending["secret"], address), "address": address}


@privileged(web=True, timeout=30.0, secret=("totp_code", "new_code", "session"))
def admin_totp_reset_confirm(ctx: Context, totp_code: str, new_code: str, session: str = "") -> dict[str, Any]:
    """Switch the administrator to the new authenticator of admin_totp_reset_begin: a fresh
    code of the current one (or an unused recovery code) confirms the change, a code of
    the new one proves it was set up. Every other session ends."""
    with _lock:
        folder = secrets_dir(ctx.state_dir)
        record = _need_record(folder)
        pending = _read_json(folder / PENDING_TOTP_RESET)
        if not (isinstance(pending, dict) and isinstance(pending.get("secret"), str)
                and isinstance(pending.get("created"), (int, float))
                and 0 <= time.time() - pending["created"] < TOTP_RESET_TTL):
            raise OpError("invalid", "the new authenticator key has expired; start again, scan the new QR "
                                     "code and enter the code it shows", "new_code")
        if not _clean_code(totp_code):
            raise OpError("invalid", "enter a fresh 6-digit code from your current authenticator app (or an "
                                     "unused recovery code) to confirm this change", "totp_code")
        cleaned_new = _clean_code(new_code)
        if not (len(cleaned_new) == 6 and cleaned_new.isascii() and cleaned_new.isdigit()):
            raise OpError("invalid", "enter the 6-digit code the new authenticator shows", "new_code")
        ledger = _read_ledger(folder)
        used = _check_code(record, ledger, totp_code)
        if used is None:
            raise _confirm_failed(ctx, "totp_code", WRONG_CODE)
        new_step = _totp_step(pending["secret"], cleaned_new)
        if new_step is None:
            raise OpError("invalid", "that code of the new authenticator is not right; check that the phone's "
                                     "clock is correct and enter the current 6-digit code", "new_code")
        record["totp_secret"] = pending["secret"]
        _spend(folder, record, ledger, used)
        _spend(folder, record, ledger, ("totp", new_step))  # neither code works again
        _confirm_ok(ctx)
        safefs.remove(folder / PENDING_TOTP_RESET)
        ended = _end_other_sessions(ctx, session)
        return {"address": record["address"], "sessions_ended": ended,
                "used_recovery_code": used[0] == "recovery",
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


@privileged(web=True, timeout=5.0)
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
