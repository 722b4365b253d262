"""Mailbox keys (dovecot mail_crypt) managed with doveadm in the dovecot container.

Each mailbox has a user key pair whose private half is encrypted with a key
password derived from the user's password (`key_password`). Mail is encrypted
to folder keys, which are encrypted to the user key; so without the password
nobody, the operator included, can read the mailbox.

The derivation is stored with the mailbox (accounts.KeyKdf: key_kdf, key_salt):

- version 2 (every mailbox made or given a password since): the hex scrypt of
  the password (UTF-8) with the mailbox's own salt (its 32 hex digits as text),
  N=2**16, r=8, p=1, 32 bytes: 64 MiB and about as much time per guess as the
  argon2id login hash (accounts.ARGON2_*; bench/keykdf.py measures both).
- version 1 (mailboxes made before): the hex SHA-256 of the password, unsalted,
  which made a stolen mail volume or backup cheap to guess (only the 2048
  PBKDF2 rounds with which dovecot's lib-dcrypt encrypts any private key stood
  in the way; they still come on top of both versions). Dovecot keeps deriving
  it for those mailboxes, so they keep working, until their password is
  changed or reset through the agent, which moves them to version 2. Dovecot
  cannot move them at login: accounts.db is read-only to it.

At login dovecot computes the same value: its passdb `sql` checks the password
and returns key_kdf and key_salt, then passdb `lua` (mailstead-keys.lua in
recipes/dovecot/templates, with luaossl's OpenSSL scrypt) derives the key
password and hands it to mail_crypt as userdb field crypt_user_key_password.

Passwords never appear on a command line, in a log or in an exception: the
derived key passwords reach doveadm through the exec environment (doveadm -k
reads `crypt_user_key_password = %{env:MAILSTEAD_KEY_PASSWORD}` from the
`protocol doveadm` block of dovecot.conf) or through its standard input, fed
by the shell's builtin printf. Addresses are passed the same way, so nothing
a caller gives is ever parsed by the shell.
"""

from __future__ import annotations

import re
from typing import Any

from portal.stack.accounts import (  # noqa: F401  (key_password: callers used to find it here)
    SCRYPT_BYTES, SCRYPT_MAXMEM, SCRYPT_N, SCRYPT_P, SCRYPT_R, KeyKdf, check_address, key_password,
)

MAIL_ROOT = "/var/mail"
# dovecot's index cache (plaintext header fields), on a tmpfs in the container.
CACHE_ROOT = "/var/cache/dovecot-index"
# dovecot keeps the user key pair in INBOX's private attributes, under this name.
USER_PRIVKEYS = "/private/vendor/vendor.dovecot/pvt/server/vendor/vendor.dovecot/pvt/crypt/privkeys/"
# Only what check_address lets through; checked again before a path is built.
SAFE_PART = re.compile(r"[a-z0-9][a-z0-9.+_-]{0,252}")


# Shell snippets run with `sh -c` in the dovecot container. They read their
# inputs from the environment: MS_USER (address), MS_DIR (mail folder), MS_CACHE
# (its index cache), MAILSTEAD_KEY_PASSWORD / MS_OLD / MS_NEW (derived key passwords).
_VERIFY = r"""
doveadm -k mailbox cryptokey export -U -u "$MS_USER" 2>/dev/null | grep -q 'BEGIN PRIVATE KEY' || {
    echo "the mail_crypt key of $MS_USER does not open with this password" >&2; exit 3; }
"""

_GENERATE = r"""
set -e
doveadm -k mailbox cryptokey generate -u "$MS_USER" -U >/dev/null
""" + _VERIFY

_CHANGE = r"""
set -e
# -O -N: doveadm reads the old password, then the new one twice, from stdin.
out=$(printf '%s\n%s\n%s\n' "$MS_OLD" "$MS_NEW" "$MS_NEW" |
      doveadm mailbox cryptokey password -u "$MS_USER" -O -N 2>&1) || { echo "$out" >&2; exit 4; }
case "$out" in
    *"for 0 key(s)"*)
        # No keys yet (made while no mail stack was deployed): make them now.
        MAILSTEAD_KEY_PASSWORD=$MS_NEW doveadm -k mailbox cryptokey generate -u "$MS_USER" -U >/dev/null ;;
esac
MAILSTEAD_KEY_PASSWORD=$MS_NEW
export MAILSTEAD_KEY_PASSWORD
""" + _VERIFY

_RESET = r"""
set -e
doveadm kick "$MS_USER" >/dev/null 2>&1 || true
# The index cache still holds header fields of the mail the old keys encrypted.
rm -rf -- "$MS_CACHE"
# A new active user key, then new folder keys (encrypted to it) for every folder.
doveadm -k mailbox cryptokey generate -u "$MS_USER" -U -f >/dev/null
doveadm -k mailbox cryptokey generate -u "$MS_USER" -f '*' >/dev/null
# Drop the old user keys: nobody can open them any more, and `cryptokey
# password` would fail on them at the next password change.
for id in $(doveadm -f flow mailbox cryptokey list -U -u "$MS_USER" | sed -n 's/^Folder= Active=no Public ID=//p'); do
    doveadm mailbox metadata unset -u "$MS_USER" INBOX "$MS_PRIVKEYS$id"
done
""" + _VERIFY

_RENAME = r"""
set -e
doveadm kick "$MS_USER" >/dev/null 2>&1 || true
if [ -e "$MS_NEW_DIR" ]; then
    echo "$MS_NEW_DIR already exists in the mail volume; remove it or choose another address" >&2; exit 5
fi
if [ -d "$MS_DIR" ]; then
    install -d -o vmail -g vmail -m 0700 "$(dirname "$MS_NEW_DIR")"
    mv "$MS_DIR" "$MS_NEW_DIR"
    rmdir "$(dirname "$MS_DIR")" 2>/dev/null || true
fi
rm -rf -- "$MS_CACHE"
"""

_REMOVE = r"""
set -e
doveadm kick "$MS_USER" >/dev/null 2>&1 || true
rm -rf -- "$MS_DIR" "$MS_CACHE"
rmdir "$(dirname "$MS_DIR")" 2>/dev/null || true
"""


from portal.core.errors import MailsteadError  # noqa: E402


class MailboxKeysError(MailsteadError, RuntimeError):
    code = "mailbox_keys"

    """doveadm failed; the message says what was done and what doveadm said."""




def mail_dir(address: str, root: str = MAIL_ROOT) -> str:
    """<root>/<domain>/<local>: where dovecot keeps the mailbox (and its keys)."""
    local, domain = check_address(address).split("@")
    for part in (local, domain):
        if not SAFE_PART.fullmatch(part) or ".." in part:
            raise ValueError(f"unsafe address part {part!r}")
    return f"{root}/{domain}/{local}"


class DovecotKeys:
    """MailboxKeys (portal.stack.accounts) backed by doveadm in `<project>-dovecot`."""

    def __init__(self, client: Any, project: str) -> None:
        self.client = client
        self.container_name = f"{project}-dovecot"

    # -- MailboxKeys -------------------------------------------------------------------

    def generate(self, address: str, password: str, kdf: KeyKdf) -> None:
        """Make the user key pair, its private key encrypted with the password (derived as `kdf` says)."""
        self.generate_key(address, key_password(password, kdf))

    def generate_key(self, address: str, derived: str) -> None:
        """Make the user key pair with an already derived key password (a prepared password:
        the password itself was never kept)."""
        self._run("make the mail encryption keys of", address, _GENERATE, {"MAILSTEAD_KEY_PASSWORD": derived})

    def change_password(self, address: str, old: str, new: str, old_kdf: KeyKdf, new_kdf: KeyKdf) -> None:
        """Re-encrypt the user's private key(s) from the old password (derived as
        `old_kdf` says) to the new one (as `new_kdf` says)."""
        self._run("re-encrypt the mail encryption keys of", address, _CHANGE,
                  {"MS_OLD": key_password(old, old_kdf), "MS_NEW": key_password(new, new_kdf)})

    def reset(self, address: str, password: str, kdf: KeyKdf) -> None:
        """New keys for a forgotten password: mail encrypted before becomes
        unreadable (its cached header fields are dropped too)."""
        self._run("reset the mail encryption keys of", address, _RESET,
                  {"MAILSTEAD_KEY_PASSWORD": key_password(password, kdf), "MS_PRIVKEYS": USER_PRIVKEYS})

    def rename(self, old: str, new: str) -> None:
        """Move the mailbox folder (mail and keys) to the new address's place;
        the index cache is dropped (dovecot rebuilds it)."""
        self._run("move the mail folder of", old, _RENAME, {"MS_NEW_DIR": mail_dir(new)})

    def remove(self, address: str) -> None:
        """Delete the mailbox folder (its mail and its keys) and its index cache."""
        self._run("delete the mail folder of", address, _REMOVE, {})

    # -- doveadm in the container --------------------------------------------------------

    def _container(self) -> Any:
        import docker.errors

        try:
            container = self.client.containers.get(self.container_name)
        except docker.errors.NotFound:
            raise MailboxKeysError(f"the mail stack is not deployed (no container {self.container_name}); "
                                   f"deploy it, then try again") from None
        if container.status != "running":
            raise MailboxKeysError(f"{self.container_name} is {container.status}, not running; "
                                   f"check the mail stack (docker compose ps) and try again")
        return container

    def _run(self, what: str, address: str, script: str, env: dict[str, str]) -> None:
        address = check_address(address)
        environment = {"MS_USER": address, "MS_DIR": mail_dir(address),
                       "MS_CACHE": mail_dir(address, CACHE_ROOT), **env}
        container = self._container()
        code, output = container.exec_run(["/bin/sh", "-c", script], environment=environment,
                                          user="root", demux=True)
        if code != 0:
            _out, err = output if isinstance(output, tuple) else (output, b"")
            said = " ".join((err or b"").decode(errors="replace").split())[-600:]
            raise MailboxKeysError(f"could not {what} {address} (doveadm exit status {code})"
                                   + (f": {said}" if said else ""))
