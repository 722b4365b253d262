"""A restored snapshot is untrusted input: what a restore takes from it, checked first,
then put in place by the agent's own writes.

`read_plan(restored, manifest)` reads everything a restore will use from a snapshot
restored into a scratch folder (after contents.check_snapshot passed) and checks it;
nothing on the appliance is touched, and a refusal names the setting, row or path at
fault. `apply_plan(plan, state_dir)` then writes it, after the stack is stopped:

- settings: state.db is read as data (a copy in a private folder, sqlite read-only,
  immutable). Only its `settings` rows whose keys are restorable (portal.core.settings:
  not this machine's own, such as tls_cert or stack_project) are taken, each through the
  settings' own checks (a bad value refuses the whole restore, naming the key), and
  written with portal.core.store.write_settings; `wizard_progress` rows of known steps
  come along. No other table is read: not the schedules (this machine's), not the
  scheduler rows an older version pickled, not the check history or the job runs.
  The snapshot's state.db never replaces this one.
- accounts: the `domains`, `mailboxes` and `aliases` rows, each checked (normalized
  addresses and domains, argon2id password hashes, quotas), written into a new
  accounts.db (root, 0640, as the stack reads it) that replaces this one.
- secrets/ and tls/: regular files and folders only (contents.check_tree refused the
  rest), names of plain characters, at most 16 MiB each, written with portal.core.safefs
  in the modes of a fixed table (secrets 0600/0700; tls 0644/0755, private keys 0600),
  never the snapshot's. The backup's own configuration and this machine's own secrets
  (sessions, lockout, enrolments under way) stay as they are. tls/live is made again
  from the manifest's link after its target was checked. admin.json is checked field by
  field and merged with the ledger of spent codes (portal.admin.privileged.restore_admin).
- stack/: not restored; the deploy after the restore renders it from the checked
  settings.
"""

from __future__ import annotations

import json
import os
import re
import secrets as pysecrets
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from portal.backup import BackupError
from portal.backup.config import OWN_SECRETS
from portal.backup.contents import LEDGER, LOCAL_SECRETS
from portal.core import safefs
from portal.core.layout import StateLayout

Progress = Callable[[str, str], None]

NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,200}")
MAX_FILE = 16 * 1024 * 1024
MAX_ROWS = 100_000
ADMIN_RECORD = "admin.json"
# Top-level names of secrets/ a restore never writes or removes.
KEPT_SECRETS = frozenset((*OWN_SECRETS, *LOCAL_SECRETS, LEDGER))
# Modes by folder (files, folders): never the snapshot's.
SECRETS_MODES = (0o600, 0o700)
TLS_MODES = (0o644, 0o755)
TLS_PRIVATE = re.compile(r".*(\.key|key\.pem)")  # bootstrap.key, privkey.pem, key.pem: 0600
ACCOUNTS_DB_MODE, ACCOUNTS_DIR_MODE = 0o640, 0o750


def refused(message: str) -> BackupError:
    return BackupError(f"{message}; nothing was changed", "snapshot", "invalid_snapshot")


@dataclass
class Plan:
    """What a restore writes, all checked (see the module docstring)."""

    settings: dict[str, str] = field(default_factory=dict)
    skipped_settings: list[str] = field(default_factory=list)
    steps: dict[str, str] = field(default_factory=dict)
    accounts: bytes | None = None
    accounts_counts: dict[str, int] = field(default_factory=dict)
    secrets: dict[str, bytes] | None = None        # path under secrets/ -> bytes (admin.json, ledger apart)
    secret_dirs: list[str] = field(default_factory=list)
    admin: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    tls: dict[str, bytes] | None = None             # path under tls/ -> bytes
    tls_dirs: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # name under tls/ -> target


# -- reading (nothing touched) -------------------------------------------------------------

def _private_copy(src: Path, work: Path) -> Path:
    """The database file alone, in a new private folder: sqlite sees no journal or WAL
    file of the snapshot's next to it."""
    folder = Path(tempfile.mkdtemp(prefix="db-", dir=work))
    dest = folder / "snapshot.db"
    with safefs.open_file(src) as f, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                                  0o600), "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    return dest


def _open_ro(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    conn.execute("PRAGMA trusted_schema=OFF")
    conn.execute("PRAGMA query_only=ON")
    return conn


def _tables(conn: sqlite3.Connection) -> dict[str, set[str]]:
    """Real tables (no views) and their columns."""
    out = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        if isinstance(name, str) and re.fullmatch(r"[a-z_]{1,40}", name):
            out[name] = {row[1] for row in conn.execute(f"PRAGMA table_info({name})")}  # noqa: S608
    return out


def _rows(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], what: str) -> list[tuple[Any, ...]]:
    rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table} LIMIT {MAX_ROWS + 1}").fetchall()  # noqa: S608
    if len(rows) > MAX_ROWS:
        raise refused(f"{what}: the table {table} has more than {MAX_ROWS} rows")
    return rows


def read_state_db(path: Path, work: Path) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """(restorable settings, each checked; keys left out; wizard steps done) from the
    snapshot's state.db, read as data."""
    from portal.core.settings import RETIRED, SETTINGS, SettingsError, check_setting
    from portal.setup.privileged import WIZARD_STEPS

    conn = _open_ro(_private_copy(path, work))
    try:
        tables = _tables(conn)
        if not {"key", "value"} <= tables.get("settings", set()):
            raise refused("the snapshot's state.db has no settings table")
        settings: dict[str, str] = {}
        skipped: list[str] = []
        for key, value in _rows(conn, "settings", ("key", "value"), "state.db"):
            if key in RETIRED:
                continue
            if not isinstance(key, str) or key not in SETTINGS or not SETTINGS[key].restore:
                skipped.append(str(key)[:40])
                continue
            try:
                settings[key] = check_setting(key, value)
            except SettingsError as exc:
                raise refused(f"the snapshot's setting {key} is not valid ({exc.message})") from None
        steps: dict[str, str] = {}
        if {"step_id", "done_at"} <= tables.get("wizard_progress", set()):
            for step, done_at in _rows(conn, "wizard_progress", ("step_id", "done_at"), "state.db"):
                if step in WIZARD_STEPS:
                    steps[step] = _timestamp(done_at)
    except sqlite3.DatabaseError as exc:
        raise refused(f"the snapshot's state.db cannot be read ({exc})") from None
    finally:
        conn.close()
    return settings, sorted(skipped), steps


def _timestamp(value: object) -> str:
    if isinstance(value, str) and len(value) <= 40:
        try:
            return datetime.fromisoformat(value).isoformat(timespec="seconds")
        except ValueError:
            pass
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_accounts_db(path: Path, work: Path) -> tuple[bytes, dict[str, int]]:
    """A new accounts.db (its bytes) holding the snapshot's domains, mailboxes and aliases,
    every row checked; the counts."""
    from portal.stack import accounts as acc

    conn = _open_ro(_private_copy(path, work))
    try:
        tables = _tables(conn)
        need = {"domains": ("name",), "mailboxes": ("address", "local", "domain", "password", "quota_mb", "created"),
                "aliases": ("source", "destination")}
        for table, columns in need.items():
            missing = set(columns) - tables.get(table, set())
            if missing:
                raise refused(f"the snapshot's accounts.db: the table {table} lacks {', '.join(sorted(missing))}")
        domains = [r[0] for r in _rows(conn, "domains", need["domains"], "accounts.db")]
        # The mail key's derivation (version 2 and its salt); a snapshot from before it
        # has no such columns: its keys are version 1 (unsalted sha256).
        kdf_columns = ("key_kdf", "key_salt") if {"key_kdf", "key_salt"} <= tables["mailboxes"] else ()
        mailboxes = _rows(conn, "mailboxes", need["mailboxes"] + kdf_columns, "accounts.db")
        aliases = _rows(conn, "aliases", need["aliases"], "accounts.db")
    except sqlite3.DatabaseError as exc:
        raise refused(f"the snapshot's accounts.db cannot be read ({exc})") from None
    finally:
        conn.close()

    def address(value: object, what: str) -> str:
        try:
            if isinstance(value, str) and acc.check_address(value) == value:
                return value
        except acc.AccountError:
            pass
        raise refused(f"the snapshot's accounts.db: {what} {str(value)[:80]!r} is not a normalized address")

    hosted = set()
    for name in domains:
        try:
            ok = isinstance(name, str) and acc.check_domain(name, "domain") == name
        except acc.AccountError:
            ok = False
        if not ok:
            raise refused(f"the snapshot's accounts.db: the domain {str(name)[:80]!r} is not a normalized domain")
        hosted.add(name)
    boxes = []
    for row in mailboxes:
        addr, local, domain, password, quota, created = row[:6]
        version, salt = row[6:8] if len(row) > 6 else (acc.KEY_KDF_SHA256, "")
        addr = address(addr, "the mailbox")
        try:
            kdf = acc.KeyKdf(version if type(version) is int else -1, salt if isinstance(salt, str) else "")
        except ValueError:
            raise refused(f"the snapshot's accounts.db: the mailbox {addr} has no valid key derivation") from None
        if (local, domain) != tuple(addr.split("@")):
            raise refused(f"the snapshot's accounts.db: the mailbox {addr} has another local part or domain")
        if not (isinstance(password, str) and password.startswith(acc.SCHEME_PREFIX + "$argon2id$")
                and len(password) <= 512 and password.isascii() and password.isprintable() and " " not in password):
            raise refused(f"the snapshot's accounts.db: the mailbox {addr} has no argon2id password hash")
        if type(quota) is not int or not 0 <= quota <= acc.MAX_QUOTA_MB:
            raise refused(f"the snapshot's accounts.db: the mailbox {addr} has a quota that is not a number "
                          f"from 0 to {acc.MAX_QUOTA_MB}")
        created = created if isinstance(created, str) and len(created) <= 64 and created.isprintable() else ""
        hosted.add(domain)
        boxes.append((addr, local, domain, password, quota, created, kdf.version, kdf.salt))
    pairs = sorted({(address(s, "the alias source"), address(d, "the alias destination")) for s, d in aliases})

    folder = Path(tempfile.mkdtemp(prefix="accounts-", dir=work))
    new = folder / "accounts.db"
    out = sqlite3.connect(new, isolation_level=None)
    try:
        out.execute("PRAGMA journal_mode=DELETE")
        out.executescript(acc.SCHEMA)
        out.execute("BEGIN")
        out.executemany("INSERT INTO domains (name) VALUES (?)", [(d,) for d in sorted(hosted)])
        out.executemany("INSERT INTO mailboxes (address, local, domain, password, quota_mb, created, "
                        "key_kdf, key_salt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", boxes)
        out.executemany("INSERT INTO aliases (source, destination) VALUES (?, ?)", pairs)
        out.execute("COMMIT")
    finally:
        out.close()
    data = new.read_bytes()
    shutil.rmtree(folder, ignore_errors=True)
    return data, {"domains": len(hosted), "mailboxes": len(boxes), "aliases": len(pairs)}


def read_folder(root: Path, rel: str, skip: frozenset[str] = frozenset()) -> tuple[dict[str, bytes], list[str]]:
    """The files (bytes) and folders under `root` (a folder of the restored snapshot; its
    types and modes were checked already), with plain names only; top-level names in
    `skip` are left out."""
    files: dict[str, bytes] = {}
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).relative_to(root)
        if here == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in sorted(dirnames + filenames):
            path = here / name
            if not NAME.fullmatch(name):
                raise refused(f"{rel}/{path.as_posix()[:120]}: not a name Mailstead makes (letters, digits, "
                              "and . _ + - only)")
        for name in sorted(dirnames):
            folders.append((here / name).as_posix())
        for name in sorted(filenames):
            path = here / name
            try:
                files[path.as_posix()] = safefs.read_bytes(root / path, MAX_FILE)
            except safefs.UnsafePathError as exc:
                raise refused(f"{rel}/{path.as_posix()}: {exc.message}") from None
    return files, folders


def read_plan(restored: Path, manifest: dict[str, Any], links: dict[str, str], work: Path,
              progress: Progress) -> Plan:
    """Everything a restore takes from the snapshot restored into `restored`, checked
    (BackupError naming what is wrong; nothing touched). `links` are the checked
    symlinks of contents.check_snapshot."""
    from portal.admin.privileged import check_ledger, check_record

    plan = Plan()
    db = restored / "db"
    if (db / "state.db").is_file():
        plan.settings, plan.skipped_settings, plan.steps = read_state_db(db / "state.db", work)
        if plan.skipped_settings:
            progress("settings", f"not taken from the snapshot (this machine's own, or unknown here): "
                                 f"{', '.join(plan.skipped_settings[:12])}")
    if (db / "accounts.db").is_file():
        plan.accounts, plan.accounts_counts = read_accounts_db(db / "accounts.db", work)
    files = restored / "files"
    if (files / "secrets").is_dir():
        secret_files, plan.secret_dirs = read_folder(files / "secrets", "files/secrets",
                                                     frozenset(OWN_SECRETS) | frozenset(LOCAL_SECRETS))
        record = secret_files.pop(ADMIN_RECORD, None)
        ledger = secret_files.pop(LEDGER, None)
        try:
            plan.admin = check_record(json.loads(record)) if record is not None else None
        except ValueError as exc:
            raise refused(f"files/secrets/{ADMIN_RECORD}: {exc}") from None
        try:
            plan.ledger = check_ledger(json.loads(ledger)) if ledger is not None else None
        except ValueError as exc:
            raise refused(f"files/secrets/{LEDGER}: {exc}") from None
        plan.secrets = secret_files
    if (files / "tls").is_dir():
        plan.tls, plan.tls_dirs = read_folder(files / "tls", "files/tls", frozenset(("live",)))
        prefix = "files/tls/"
        plan.links = {rel.removeprefix(prefix): target for rel, target in links.items() if rel.startswith(prefix)}
        for name, target in plan.links.items():
            if target not in plan.tls_dirs:
                raise refused(f"files/tls/{name} points to {target}, which is not a folder of the snapshot")
    return plan


# -- writing (after the stack is stopped) ----------------------------------------------------

def _write_settings(state_dir: Path, plan: Plan) -> None:
    """The snapshot's restorable settings replace this machine's (those it lacks are
    removed); this machine's own settings stay; the wizard steps are the snapshot's."""
    from portal.core import store
    from portal.core.settings import SETTINGS

    layout = StateLayout(state_dir)
    stale = [k for k in store.read_settings(layout) if SETTINGS[k].restore and k not in plan.settings]
    store.write_settings(layout, plan.settings)
    store.delete_settings(layout, stale)
    conn = store.connect(layout)
    try:
        with conn:
            conn.execute("DELETE FROM wizard_progress")
            conn.executemany("INSERT INTO wizard_progress (step_id, done_at) VALUES (?, ?)",
                             sorted(plan.steps.items()))
    finally:
        conn.close()


def _write_tree(folder: Path, files: dict[str, bytes], dirs: list[str], modes: tuple[int, int],
                private: re.Pattern[str] | None = None) -> None:
    for rel in dirs:
        safefs.ensure_dir(folder / rel, modes[1])
    for rel, data in files.items():
        mode = 0o600 if private is not None and private.fullmatch(Path(rel).name) else modes[0]
        safefs.write_bytes(folder / rel, data, mode)


def _write_secrets(state_dir: Path, plan: Plan) -> None:
    layout = StateLayout(state_dir)
    folder = safefs.ensure_dir(layout.secrets, SECRETS_MODES[1])
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name not in KEPT_SECRETS and entry.name != ADMIN_RECORD:
                safefs.remove_tree(Path(entry.path))
    _write_tree(folder, plan.secrets or {}, plan.secret_dirs, SECRETS_MODES)


def _write_tls(state_dir: Path, plan: Plan) -> None:
    """A new tls/ made beside the old one, then switched in (two renames)."""
    layout = StateLayout(state_dir)
    tag = pysecrets.token_hex(4)
    new, old = state_dir / f".tls.restore-{tag}", state_dir / f".tls.old-{tag}"
    safefs.ensure_dir(new, TLS_MODES[1])
    try:
        _write_tree(new, plan.tls or {}, plan.tls_dirs, TLS_MODES, TLS_PRIVATE)
        with safefs.open_dir(new) as fd:
            for name, target in plan.links.items():
                os.symlink(target, name, dir_fd=fd)
            os.fsync(fd)
        had = safefs.lstat(layout.tls) is not None
        if had:
            safefs.rename(layout.tls, old)
        safefs.rename(new, layout.tls)
    finally:
        safefs.remove_tree(new)
    safefs.remove_tree(old)


def apply_plan(plan: Plan, state_dir: Path, progress: Progress) -> dict[str, Any]:
    """Write what `plan` holds (see the module docstring); returns what changed, for the
    job's result (no secrets)."""
    from portal.admin.privileged import restore_admin

    layout = StateLayout(state_dir)
    layout.prepare()
    progress("settings", f"importing {len(plan.settings)} settings and {len(plan.steps)} setup steps (checked)")
    _write_settings(state_dir, plan)
    if plan.accounts is not None:
        progress("accounts", f"importing {plan.accounts_counts.get('mailboxes', 0)} mailboxes and "
                             f"{plan.accounts_counts.get('aliases', 0)} aliases (checked)")
        safefs.ensure_dir(layout.accounts, ACCOUNTS_DIR_MODE)
        safefs.write_bytes(layout.accounts_db, plan.accounts, ACCOUNTS_DB_MODE)
        for extra in ("accounts.db-journal", "accounts.db-wal", "accounts.db-shm"):
            safefs.remove(layout.accounts / extra)
    admin: dict[str, Any] = {}
    if plan.secrets is not None:
        progress("files", "putting back the secrets (keys, accounts of services) and the certificates")
        _write_secrets(state_dir, plan)
        admin = restore_admin(state_dir, plan.admin, plan.ledger)
        if admin.get("recovery_codes_dropped"):
            progress("admin", f"{admin['recovery_codes_dropped']} recovery code(s) of the snapshot were spent "
                              "since: they stay spent")
    if plan.tls is not None:
        _write_tls(state_dir, plan)
    safefs.remove_tree(layout.stack)  # rendered anew from the restored settings at deploy
    return {"settings": len(plan.settings), **plan.accounts_counts,
            "recovery_codes_dropped": admin.get("recovery_codes_dropped", 0)}
