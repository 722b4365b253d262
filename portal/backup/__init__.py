"""Encrypted backups with restic: targets, contents, restore and verification.

Layout of one backup (a restic snapshot of a staging folder, see contents.py), format 2:

    manifest.json           format, version, settings summary, message count per mailbox, and
                            every other file with its SHA-256 ("sha256"), every folder ("folders"),
                            tls/live as data ("links"), anything left out ("skipped")
    db/state.db             sqlite backup API copies (consistent while the agent writes)
    db/accounts.db
    files/secrets/          DKIM keys, ACME account, stack secrets, admin record and the ledger of
                            spent codes (not the backup's own config, not this machine's sessions)
    files/tls/              certificates and keys (regular files only: tls/live is in the manifest)
    volumes/<name>/         the stack's docker volumes mail, dav, redis, rspamd (numeric owners kept)

A restore treats a snapshot as untrusted input (snapshot.py): checked in a scratch
folder before anything is touched, settings and accounts imported as checked data,
files written by the agent in fixed modes. Format 1 snapshots (hashes of messages and
databases only, files/stack/ included) are still restored.

Nothing here is imported by the agent at start except privileged.py, which
imports the rest inside its operations.
"""

from __future__ import annotations


from portal.core.errors import MailsteadError  # noqa: E402


class BackupError(MailsteadError):
    """A backup, restore or configuration step failed: `field` names what to fix
    (target, path, endpoint, password, ...); the message never holds a secret."""

    def __init__(self, message: str, field: str | None = "backup", code: str = "backup_failed") -> None:
        super().__init__(message, field=field, code=code)
