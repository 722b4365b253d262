"""accounts.db: mail domains, mailboxes and aliases (owned by the privileged agent).

postfix and dovecot read the same file through a read-only bind mount, so it is
kept in rollback-journal mode (journal_mode=DELETE, never WAL: WAL readers need
write access to the -shm file). Every mutation checks all of its input first,
raises AccountError naming the field, and is all-or-nothing.

The per-user mail_crypt keys live in dovecot; they are handled through a
MailboxKeys object (doveadm in the dovecot container, or NoKeys). Each
mailbox row says how its key password is derived from its password (KeyKdf:
key_kdf and key_salt; the derivations are in dovecot_keys.py, and dovecot
computes the same at login in recipes/dovecot/templates/mailstead-keys.lua).
"""

from __future__ import annotations

import os
import hashlib
import re
import secrets
import sqlite3
import stat
import string
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from datetime import datetime, timezone
from encodings import idna
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from portal.core import safefs
from portal.core.errors import UnsafePathError

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains   (name TEXT PRIMARY KEY);              -- punycode, lower case
CREATE TABLE IF NOT EXISTS mailboxes (address  TEXT PRIMARY KEY,           -- local@domain, lower case
                        local    TEXT NOT NULL,
                        domain   TEXT NOT NULL REFERENCES domains(name),
                        password TEXT NOT NULL,              -- {ARGON2ID}$argon2id$...
                        quota_mb INTEGER NOT NULL,           -- 0: no limit
                        created  TEXT NOT NULL,
                        key_kdf  INTEGER NOT NULL DEFAULT 1, -- KeyKdf.version (1: legacy)
                        key_salt TEXT NOT NULL DEFAULT '');  -- KeyKdf.salt ('' for version 1)
CREATE TABLE IF NOT EXISTS aliases   (source      TEXT NOT NULL,           -- local@domain, or @domain (catch-all)
                        destination TEXT NOT NULL,           -- an address
                        PRIMARY KEY (source, destination));
"""

DIR_MODE = 0o750
FILE_MODE = 0o640

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
MAX_QUOTA_MB = 1024 * 1024  # 1 TiB; 0 means no limit

# Argon2id as dovecot's {ARGON2ID} scheme verifies it (libsodium: one lane only).
SCHEME_PREFIX = "{ARGON2ID}"
ARGON2_TIME_COST = 3
ARGON2_MEMORY_COST_KIB = 65536
ARGON2_PARALLELISM = 1

# How a mailbox's mail_crypt key password is derived from its password (the
# KeyKdf version stored with the mailbox; dovecot_keys.key_password computes them).
KEY_KDF_SHA256 = 1  # hex SHA-256 of the password, unsalted: mailboxes made before version 2
KEY_KDF_SCRYPT = 2  # hex scrypt of the password with a per-mailbox salt, as costly as ARGON2_*
KEY_KDF_VERSIONS = (KEY_KDF_SHA256, KEY_KDF_SCRYPT)
KEY_KDF_CURRENT = KEY_KDF_SCRYPT
KEY_SALT_BYTES = 16  # stored as 32 hex digits
KEY_SALT_RE = re.compile(r"[0-9a-f]{32}")

LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + ".-_+")
DOMAIN_CHARS = frozenset(string.ascii_letters + string.digits + ".-")
LABEL_RE = re.compile(r"[a-z0-9-]{1,63}")
IDNA_DOTS = re.compile("[.\u3002\uff0e\uff61]")  # label separators, RFC 3490 section 3.1
EXAMPLE_ADDRESS = "alice@example.org"


from portal.core.errors import MailsteadError  # noqa: E402


class AccountError(MailsteadError, ValueError):
    """Input refused: `field` names the input, `message` what is wrong and the fix."""

    code = "invalid"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


@dataclass(frozen=True)
class KeyKdf:
    """How a mailbox's key password is derived from its password: the KDF
    version and, for version 2, the mailbox's salt (32 hex digits, used as text)."""

    version: int
    salt: str = ""

    def __post_init__(self) -> None:
        if self.version == KEY_KDF_SHA256:
            ok = self.salt == ""
        else:
            ok = self.version in KEY_KDF_VERSIONS and bool(KEY_SALT_RE.fullmatch(self.salt))
        if not ok:
            raise ValueError(f"invalid key derivation: version {self.version!r} with a salt of "
                             f"{len(self.salt)} characters")

    @classmethod
    def new(cls) -> KeyKdf:
        """The current derivation with a fresh random salt (for new keys and every password change)."""
        return cls(KEY_KDF_CURRENT, secrets.token_hex(KEY_SALT_BYTES))


# KDF version 2 (mailstead-keys.lua has the same numbers; a unit test checks).
# Never change them for version 2: stored keys depend on them. A costlier
# derivation is a new version (and the passdb keeps the old ones).
SCRYPT_N = 2**16
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_BYTES = 32
SCRYPT_MAXMEM = 128 * SCRYPT_R * SCRYPT_N + 16 * 1024 * 1024  # its 64 MiB, and room to spare


def key_password(password: str, kdf: KeyKdf) -> str:
    """The password of a user's mail_crypt private key, derived as `kdf` says
    (the value dovecot's passdb derives at login)."""
    secret = password.encode("utf-8")
    if kdf.version == KEY_KDF_SCRYPT:
        return hashlib.scrypt(secret, salt=kdf.salt.encode("ascii"), n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                              maxmem=SCRYPT_MAXMEM, dklen=SCRYPT_BYTES).hex()
    if kdf.version == KEY_KDF_SHA256:
        return hashlib.sha256(secret).hexdigest()
    raise ValueError(f"no key derivation version {kdf.version}")


@dataclass(frozen=True)
class PreparedPassword:
    """A password as the stack needs it, computed at once so the password itself is never
    written anywhere: the argon2id hash (the passdb), the key derivation and the key
    password it gives (mail_crypt). Used for a mailbox that can only be made later (the
    Admin step's, made at Deploy): this is what waits on disk (0600, root), not the password."""

    password_hash: str
    kdf: KeyKdf
    key_password: str

    @classmethod
    def of(cls, password: str) -> PreparedPassword:
        check_password(password)
        kdf = KeyKdf.new()
        return cls(hash_password(password), kdf, key_password(password, kdf))

    def as_dict(self) -> dict[str, Any]:
        return {"password_hash": self.password_hash, "key_kdf": self.kdf.version, "key_salt": self.kdf.salt,
                "key_password": self.key_password}

    @classmethod
    def from_dict(cls, data: Any) -> PreparedPassword:
        """Read back (checked: it comes from a file)."""
        if not isinstance(data, dict):
            raise ValueError("not a prepared password")
        stored, key = data.get("password_hash"), data.get("key_password")
        if not (isinstance(stored, str) and stored.startswith(SCHEME_PREFIX) and len(stored) < 512):
            raise ValueError("not an argon2id hash")
        if not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{64}", key)):
            raise ValueError("not a key password")
        return cls(stored, KeyKdf(int(data.get("key_kdf", 0)), str(data.get("key_salt", ""))), key)


class MailboxKeys(Protocol):
    """A mailbox's mail_crypt key pair, kept by dovecot (its private key encrypted
    with a key password derived from the user's password as `kdf` says)."""

    def generate(self, address: str, password: str, kdf: KeyKdf) -> None: ...
    def generate_key(self, address: str, key_password: str) -> None: ...
    def change_password(self, address: str, old: str, new: str, old_kdf: KeyKdf, new_kdf: KeyKdf) -> None: ...
    def reset(self, address: str, password: str, kdf: KeyKdf) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def remove(self, address: str) -> None: ...


class NoKeys:
    """MailboxKeys that does nothing: for when no mail stack is deployed."""

    def generate(self, address: str, password: str, kdf: KeyKdf) -> None:
        pass

    def generate_key(self, address: str, key_password: str) -> None:
        pass

    def change_password(self, address: str, old: str, new: str, old_kdf: KeyKdf, new_kdf: KeyKdf) -> None:
        pass

    def reset(self, address: str, password: str, kdf: KeyKdf) -> None:
        pass

    def rename(self, old: str, new: str) -> None:
        pass

    def remove(self, address: str) -> None:
        pass


# -- input checks ----------------------------------------------------------------

def _show(value: str) -> str:
    """`value` quoted for a message: control characters escaped, at most 64 characters."""
    return repr(value if len(value) <= 64 else value[:64] + "…")


def _char(ch: str) -> str:
    """One character for a message, with its code point if it is not plain ASCII."""
    return repr(ch) if ch.isascii() and ch.isprintable() else f"{ch!r} (U+{ord(ch):04X})"


def check_domain(name: str, field: str) -> str:
    """The ASCII (punycode, lower-case) form of domain `name`; AccountError if invalid."""
    example = "example.org"
    if not isinstance(name, str) or not name:
        raise AccountError(field, f"{field} is required; enter a domain name such as {example}")
    for ch in name:
        if (ch.isascii() and ch not in DOMAIN_CHARS) or not ch.isprintable():
            raise AccountError(field, f"{field} contains {_char(ch)}, which is not allowed in a domain "
                                      f"name; use only letters, digits, hyphens and dots, as in {example}")
    if IDNA_DOTS.fullmatch(name[-1]):
        raise AccountError(field, f"{field} {_show(name)} ends with a dot; remove it, as in {example}")
    labels = IDNA_DOTS.split(name)
    if len(labels) < 2:
        raise AccountError(field, f"{field} {_show(name)} needs at least two parts separated by a dot, "
                                  f"such as {example}")
    ascii_labels = []
    for label in labels:
        if not label:
            raise AccountError(field, f"{field} {_show(name)} has an empty part between dots; "
                                      f"remove the extra dot")
        try:
            if not label.isascii():
                label = idna.ToASCII(label).decode("ascii")
            label = label.lower()
            if label.startswith("xn--"):
                idna.ToUnicode(label)  # raises if the punycode is broken
        except UnicodeError:
            raise AccountError(field, f"{field}: the part {_show(label)} is not a valid international "
                                      f"domain name; check its spelling") from None
        if not LABEL_RE.fullmatch(label):
            raise AccountError(field, f"{field}: the part {_show(label)} is not allowed; each part between "
                                      f"dots must be 1 to 63 letters, digits or hyphens")
        if label.startswith("-") or label.endswith("-"):
            raise AccountError(field, f"{field}: the part {_show(label)} starts or ends with a hyphen; "
                                      f"remove or move the hyphen")
        ascii_labels.append(label)
    if ascii_labels[-1].isdigit():
        raise AccountError(field, f"{field} {_show(name)} looks like an IP address; enter a domain "
                                  f"name such as {example}")
    ascii_name = ".".join(ascii_labels)
    if len(ascii_name) > 253:
        raise AccountError(field, f"{field} is {len(ascii_name)} characters long; a domain name "
                                  f"has at most 253")
    return ascii_name


def check_alias_source(source: str, field: str = "source") -> str:
    """An alias's source: an address, or `@domain` for a catch-all (every address of the
    domain that is neither a mailbox nor an alias); normalized like check_address."""
    if isinstance(source, str) and source.startswith("@") and source.count("@") == 1:
        return "@" + check_domain(source[1:], field)
    return check_address(source, field)


def check_address(address: str, field: str = "address") -> str:
    """The normalized (lower-case, punycode) form of `address`; AccountError if invalid.

    The part before the @ is restricted to letters, digits and . - _ + so that an
    address is always safe in a shell command, a file path or a config file.
    """
    if not isinstance(address, str) or not address:
        raise AccountError(field, f"{field} is required; enter an address such as {EXAMPLE_ADDRESS}")
    if len(address) > 254:
        raise AccountError(field, f"{field} is {len(address)} characters long; an address has at most 254")
    if address.count("@") != 1:
        problem = "needs an @" if "@" not in address else "has more than one @"
        raise AccountError(field, f"{field} {problem}; enter it as name@domain, such as {EXAMPLE_ADDRESS}")
    local, domain = address.split("@")
    if not local:
        raise AccountError(field, f"{field} has nothing before the @; enter it as name@domain, "
                                  f"such as {EXAMPLE_ADDRESS}")
    for ch in local:
        if ch not in LOCAL_CHARS:
            raise AccountError(field, f"{field} contains {_char(ch)} before the @, which is not allowed; "
                                      f"use only letters, digits and . - _ +")
    if len(local) > 64:
        raise AccountError(field, f"{field}: the part before the @ has {len(local)} characters; "
                                  f"the most is 64")
    if not local[0].isalnum():
        raise AccountError(field, f"{field}: the part before the @ must start with a letter or a digit")
    if local.endswith(".") or ".." in local:
        raise AccountError(field, f"{field}: the part before the @ ends with a dot or has two dots in a row; "
                                  f"remove the extra dot")
    return f"{local.lower()}@{check_domain(domain, field)}"


def check_password(password: str, field: str = "password") -> None:
    """Refuse a password that is too short, too long, or holds NUL or line breaks."""
    if not isinstance(password, str):
        raise AccountError(field, f"{field} must be text")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(field, f"{field} must have at least {MIN_PASSWORD_LENGTH} characters; "
                                  f"choose a longer one (a few random words work well)")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(field, f"{field} must have at most {MAX_PASSWORD_LENGTH} characters")
    if any(ch in password for ch in "\0\n\r"):
        raise AccountError(field, f"{field} must not contain NUL characters or line breaks")


def check_quota(quota_mb: int, field: str = "quota_mb") -> int:
    if type(quota_mb) is not int or not 0 <= quota_mb <= MAX_QUOTA_MB:
        raise AccountError(field, f"{field} must be a whole number of megabytes from 0 (no limit) "
                                  f"to {MAX_QUOTA_MB}")
    return quota_mb


# -- password hashes ---------------------------------------------------------------

@cache
def _hasher() -> Any:
    import argon2  # imported lazily: checking a domain name needs no argon2

    return argon2.PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_COST_KIB,
                                 parallelism=ARGON2_PARALLELISM, type=argon2.Type.ID)


def hash_password(password: str) -> str:
    """`{ARGON2ID}$argon2id$v=19$m=...`: an argon2id hash in dovecot's scheme syntax."""
    return SCHEME_PREFIX + _hasher().hash(password)


@lru_cache(maxsize=1)
def _unknown_hash() -> str:
    """A hash to check a password against when the address has no mailbox, so that an
    unknown address costs as long as a wrong password (no telling which exist)."""
    return hash_password(secrets.token_urlsafe(24))


def verify_password(stored: str, password: str) -> bool:
    """Whether `password` matches `stored` (as made by hash_password)."""
    # InvalidHash: argon2-cffi 21.1 (trixie, the image) has no InvalidHashError (23.1 made it the new name)
    from argon2.exceptions import InvalidHash, VerificationError

    if not isinstance(stored, str) or not isinstance(password, str) or not stored.startswith(SCHEME_PREFIX):
        return False
    try:
        return bool(_hasher().verify(stored.removeprefix(SCHEME_PREFIX), password))
    except (VerificationError, InvalidHash):
        return False


# -- the database --------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Accounts:
    """The accounts database at `path` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode with the schema in place; closed on exit."""
        # The folder is the agent's (made DIR_MODE; another user's is refused), so nothing
        # in it can be swapped; the file is made whole if missing and must be a regular
        # file of the agent's (a symlink is refused: sqlite would follow it).
        safefs.ensure_dir(self.path.parent, DIR_MODE)
        st = safefs.lstat(self.path)
        if st is None:
            safefs.write_new(self.path, b"", FILE_MODE)
            st = safefs.lstat(self.path)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise UnsafePathError(f"{self.path} is not a regular file of the agent's (a symlink?); as root, "
                                  "check it and remove it if you did not make it")
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.executescript(SCHEMA)
            _migrate(conn)
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (taken before any check), rolled back on any error."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- reading -------------------------------------------------------------------

    def domains(self) -> list[str]:
        with self.connect() as conn:
            return [row["name"] for row in conn.execute("SELECT name FROM domains ORDER BY name")]

    def list_mailboxes(self) -> list[dict[str, Any]]:
        """Every mailbox: address, quota_mb, created (never the password hash)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT address, quota_mb, created FROM mailboxes ORDER BY domain, local")
            return [dict(row) for row in rows]

    def list_aliases(self) -> list[dict[str, str]]:
        with self.connect() as conn:
            rows = conn.execute("SELECT source, destination FROM aliases ORDER BY source, destination")
            return [dict(row) for row in rows]

    def get_mailbox(self, address: str) -> dict[str, Any] | None:
        """The mailbox (address, local, domain, quota_mb, created) or None."""
        address = check_address(address)
        with self.connect() as conn:
            return _mailbox(conn, address)

    def key_kdf(self, address: str) -> KeyKdf:
        """How the mailbox's key password is derived now (its salt is no secret)."""
        address = check_address(address)
        with self.connect() as conn:
            return _key_kdf(conn, address)

    # -- domains and mailboxes ---------------------------------------------------------

    def add_domain(self, name: str) -> str:
        """Host domain `name` (no error if it is hosted already); returns its ASCII form."""
        name = check_domain(name, "domain")
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO domains (name) VALUES (?)", (name,))
        return name

    def create_mailbox(self, address: str, password: str | PreparedPassword, quota_mb: int = 0,
                       keys: MailboxKeys | None = None) -> dict[str, Any]:
        """Create a mailbox (hosting its domain if needed) and its mail_crypt keys. The
        password may come prepared (PreparedPassword: its hash and key password only).

        The row is committed before the keys are made, since dovecot looks the
        user up in this file; if making the keys fails, the row is removed again.
        """
        keys = _need_keys(keys)
        address = check_address(address)
        prepared = password if isinstance(password, PreparedPassword) else None
        if prepared is None:
            check_password(password)
        check_quota(quota_mb)
        local, domain = address.split("@")
        if prepared is not None:
            stored, kdf = prepared.password_hash, prepared.kdf
        else:
            stored = hash_password(password)
            kdf = KeyKdf.new()
        with self._write() as conn:
            _refuse_existing(conn, address, "address")
            added_domain = conn.execute("INSERT OR IGNORE INTO domains (name) VALUES (?)", (domain,)).rowcount
            conn.execute("INSERT INTO mailboxes (address, local, domain, password, quota_mb, created, "
                         "key_kdf, key_salt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (address, local, domain, stored, quota_mb, _now(), kdf.version, kdf.salt))
        try:
            if prepared is not None:
                keys.generate_key(address, prepared.key_password)
            else:
                keys.generate(address, password, kdf)
        except BaseException:
            with self._write() as conn:
                conn.execute("DELETE FROM mailboxes WHERE address = ?", (address,))
                if added_domain:
                    _drop_domain_if_unused(conn, domain)
            raise
        return self._get(address)

    def delete_mailbox(self, address: str, keys: MailboxKeys) -> dict[str, Any]:
        """Remove a mailbox's keys, then the mailbox and every alias pointing to it.

        Returns {"address", "aliases_removed": [{"source", "destination"}, ...]}.
        The mail files in the mail volume are not touched here.
        """
        address = check_address(address)
        self._get(address)
        keys.remove(address)
        with self._write() as conn:
            removed = [dict(row) for row in conn.execute(
                "SELECT source, destination FROM aliases WHERE destination = ? ORDER BY source", (address,))]
            conn.execute("DELETE FROM aliases WHERE destination = ?", (address,))
            conn.execute("DELETE FROM mailboxes WHERE address = ?", (address,))
        return {"address": address, "aliases_removed": removed}

    def rename_mailbox(self, address: str, new_address: str, keys: MailboxKeys) -> dict[str, Any]:
        """Give a mailbox a new address; aliases pointing to it follow."""
        address = check_address(address)
        new_address = check_address(new_address, "new_address")
        if new_address == address:
            raise AccountError("new_address", f"new_address is the same as the current address {address}")
        local, domain = new_address.split("@")
        with self._write() as conn:
            if _mailbox(conn, address) is None:
                raise _unknown(address)
            _refuse_existing(conn, new_address, "new_address")
            conn.execute("INSERT OR IGNORE INTO domains (name) VALUES (?)", (domain,))
            conn.execute("UPDATE mailboxes SET address = ?, local = ?, domain = ? WHERE address = ?",
                         (new_address, local, domain, address))
            # An alias already forwarding to both addresses keeps a single row.
            conn.execute("DELETE FROM aliases WHERE destination = ? AND source IN "
                         "(SELECT source FROM aliases WHERE destination = ?)", (address, new_address))
            conn.execute("UPDATE aliases SET destination = ? WHERE destination = ?", (new_address, address))
            keys.rename(address, new_address)
        return self._get(new_address)

    def change_password(self, address: str, old_password: str, new_password: str,
                        keys: MailboxKeys) -> None:
        """Change a password, re-encrypting the mailbox's private key with the new one.

        The key password is derived afresh (the current KDF, a new salt), so this
        also moves a mailbox made with an older derivation to the current one;
        the new password may be the same as the old.
        """
        address = check_address(address)
        if not isinstance(old_password, str):
            raise AccountError("old_password", "old_password must be text")
        check_password(new_password, "new_password")
        stored = hash_password(new_password)
        new_kdf = KeyKdf.new()
        with self._write() as conn:
            row = conn.execute("SELECT password FROM mailboxes WHERE address = ?", (address,)).fetchone()
            if row is None:
                verify_password(_unknown_hash(), old_password)  # as long as a wrong password takes
                raise _unknown(address)
            if not verify_password(row["password"], old_password):
                raise AccountError("old_password", f"old_password is not the current password of {address}; "
                                                   f"check it, or have an administrator reset the password")
            old_kdf = _key_kdf(conn, address)
            keys.change_password(address, old_password, new_password, old_kdf, new_kdf)
            conn.execute("UPDATE mailboxes SET password = ?, key_kdf = ?, key_salt = ? WHERE address = ?",
                         (stored, new_kdf.version, new_kdf.salt, address))

    def reset_password(self, address: str, new_password: str, keys: MailboxKeys) -> None:
        """Set a new password without knowing the old one (for an administrator).

        The mailbox gets a new key pair: mail encrypted with the old keys becomes
        unreadable, for the user and for the administrator alike.
        """
        address = check_address(address)
        check_password(new_password, "new_password")
        stored = hash_password(new_password)
        kdf = KeyKdf.new()
        with self._write() as conn:
            if _mailbox(conn, address) is None:
                raise _unknown(address)
            keys.reset(address, new_password, kdf)
            conn.execute("UPDATE mailboxes SET password = ?, key_kdf = ?, key_salt = ? WHERE address = ?",
                         (stored, kdf.version, kdf.salt, address))

    def set_quota(self, address: str, quota_mb: int) -> dict[str, Any]:
        """Set a mailbox's quota in MiB (0: no limit)."""
        address = check_address(address)
        check_quota(quota_mb)
        with self._write() as conn:
            if not conn.execute("UPDATE mailboxes SET quota_mb = ? WHERE address = ?",
                                (quota_mb, address)).rowcount:
                raise _unknown(address)
        return self._get(address)

    # -- aliases -----------------------------------------------------------------------

    def add_alias(self, source: str, destination: str) -> dict[str, str]:
        """Forward mail for `source` (in a hosted domain, not a mailbox) to `destination`.

        `@domain` is the domain's catch-all: mail for its addresses that are neither a
        mailbox nor an alias. Its destination must be a mailbox here or an address of a
        domain not hosted here: anything else would be caught again, by this catch-all
        or another one, and could go round in a loop."""
        source = check_alias_source(source, "source")
        destination = check_address(destination, "destination")
        domain = source.split("@")[1]
        with self._write() as conn:
            if not _hosted(conn, domain):
                raise AccountError("source", f"{domain} is not a domain hosted here; add the domain "
                                             f"first, or use an address in one of your domains")
            if source.startswith("@") and _mailbox(conn, destination) is None and \
                    _hosted(conn, destination.split("@")[1]):
                raise AccountError("destination", f"a catch-all forwards to a mailbox here or to an address "
                                                  f"elsewhere; {destination} is neither, and mail for it could "
                                                  f"be caught again and go round in a loop")
            if _mailbox(conn, source) is not None:
                raise AccountError("source", f"{source} is a mailbox; an alias needs an address "
                                             f"that is not a mailbox")
            if conn.execute("SELECT 1 FROM aliases WHERE source = ? AND destination = ?",
                            (source, destination)).fetchone():
                raise AccountError("destination", f"{source} already forwards to {destination}")
            cycle = _path(conn, destination, source)
            if cycle is not None:
                loop = " → ".join([source, *cycle])
                raise AccountError("destination", f"this alias would make a forwarding loop ({loop}); "
                                                  f"choose another destination or remove an alias of the loop")
            conn.execute("INSERT INTO aliases (source, destination) VALUES (?, ?)", (source, destination))
        return {"source": source, "destination": destination}

    def remove_alias(self, source: str, destination: str) -> None:
        source = check_alias_source(source, "source")
        destination = check_address(destination, "destination")
        with self._write() as conn:
            if not conn.execute("DELETE FROM aliases WHERE source = ? AND destination = ?",
                                (source, destination)).rowcount:
                raise AccountError("source", f"there is no alias from {source} to {destination}; "
                                             f"check the list of aliases")

    def _get(self, address: str) -> dict[str, Any]:
        with self.connect() as conn:
            mailbox = _mailbox(conn, address)
        if mailbox is None:
            raise _unknown(address)
        return mailbox


# -- helpers (inside a connection) ---------------------------------------------------

def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an older version up to SCHEMA, keeping every row.

    Mailboxes from before the key_kdf column had their keys made with the
    unsalted SHA-256 derivation: they get version 1 (the column's default),
    which dovecot keeps deriving for them until their password is changed or
    reset (Accounts.change_password, reset_password).
    """
    def missing() -> list[str]:
        have = {row["name"] for row in conn.execute("PRAGMA table_info(mailboxes)")}
        return [name for name in ("key_kdf", "key_salt") if name not in have]

    if not missing():
        return
    conn.execute("BEGIN IMMEDIATE")  # another connection may be migrating the same file
    try:
        for name in missing():
            definition = {"key_kdf": "INTEGER NOT NULL DEFAULT 1", "key_salt": "TEXT NOT NULL DEFAULT ''"}[name]
            conn.execute(f"ALTER TABLE mailboxes ADD COLUMN {name} {definition}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _key_kdf(conn: sqlite3.Connection, address: str) -> KeyKdf:
    row = conn.execute("SELECT key_kdf, key_salt FROM mailboxes WHERE address = ?", (address,)).fetchone()
    if row is None:
        raise _unknown(address)
    try:
        return KeyKdf(row["key_kdf"], row["key_salt"])
    except ValueError:
        raise AccountError("address", f"the key derivation stored for {address} is not valid; "
                                      f"reset the mailbox's password to give it new keys") from None

def _need_keys(keys: MailboxKeys | None) -> MailboxKeys:
    if keys is None:
        raise TypeError("create_mailbox needs keys (NoKeys() when no mail stack is deployed)")
    return keys


def _unknown(address: str) -> AccountError:
    return AccountError("address", f"there is no mailbox {address}; check the address in the list of mailboxes")


def _hosted(conn: sqlite3.Connection, domain: str) -> bool:
    return conn.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is not None


def _mailbox(conn: sqlite3.Connection, address: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT address, local, domain, quota_mb, created FROM mailboxes WHERE address = ?",
                       (address,)).fetchone()
    return dict(row) if row else None


def _refuse_existing(conn: sqlite3.Connection, address: str, field: str) -> None:
    """Refuse `address` for a new mailbox if it is a mailbox or an alias already."""
    if _mailbox(conn, address) is not None:
        raise AccountError(field, f"a mailbox {address} already exists; choose another address")
    if conn.execute("SELECT 1 FROM aliases WHERE source = ?", (address,)).fetchone():
        raise AccountError(field, f"{address} already exists as an alias; remove the alias first "
                                  f"or choose another address")


def _drop_domain_if_unused(conn: sqlite3.Connection, domain: str) -> None:
    in_use = conn.execute("SELECT 1 FROM mailboxes WHERE domain = ?", (domain,)).fetchone() or any(
        row["source"].endswith("@" + domain) for row in conn.execute("SELECT source FROM aliases"))
    if not in_use:
        conn.execute("DELETE FROM domains WHERE name = ?", (domain,))


def _path(conn: sqlite3.Connection, start: str, goal: str) -> list[str] | None:
    """The alias chain start → … → goal, following existing aliases; None if there is none."""
    came_from: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        if node == goal:
            chain: list[str] = []
            step: str | None = node
            while step is not None:
                chain.append(step)
                step = came_from[step]
            return chain[::-1]
        for row in conn.execute("SELECT destination FROM aliases WHERE source = ? ORDER BY destination", (node,)):
            if row["destination"] not in came_from:
                came_from[row["destination"]] = node
                queue.append(row["destination"])
    return None
