"""Encrypted backups with restic: targets, contents, restore and verification.

Layout of one backup (a restic snapshot of a staging folder, see contents.py):

    manifest.json           version, settings summary, per mailbox message count + SHA-256 per message file
    db/state.db             sqlite backup API copies (consistent while the portal writes)
    db/accounts.db
    files/secrets/          DKIM keys, ACME account, stack secrets (not the backup's own config)
    files/tls/              certificates and keys (the live -> archive symlink kept)
    files/stack/            the rendered compose.yaml and service configs
    volumes/<name>/         the stack's docker volumes mail, dav, redis, rspamd (numeric owners kept)

Nothing here is imported by the agent at start except agentops.py, which
imports the rest inside its operations.
"""

from __future__ import annotations


from portal.core.errors import MailsteadError  # noqa: E402


class BackupError(MailsteadError):
    """A backup, restore or configuration step failed: `field` names what to fix
    (target, path, endpoint, password, ...); the message never holds a secret."""

    def __init__(self, message: str, field: str | None = "backup", code: str = "backup_failed") -> None:
        super().__init__(message, field=field, code=code)
