"""The state layout, named once.

The agent's state (root-owned, written only by the agent, after validation):

    /var/lib/mailstead/              0755 root:root
      state.db                       0600  settings, wizard progress, schedules, runs, check history
      setup-token                    0400  until setup is finished (the web asks the agent to check one)
      setup-finished                 0644  made at Finish: the token never comes back
      jobs/                          0700  background jobs' progress (portal/agent/jobs.py)
      secrets/                       0700  admin record, DKIM, ACME account, TSIG key, backup keys
      tls/                           0755  bootstrap.crt/.key (key 0600), bootstrap.sha256, live/ (the CA's)
      accounts/                      0750  accounts.db (the mail stack reads it, read-only)
      stack/                         0700  the rendered compose project
      stack-images.json, upgrade/, backup-state.json, ... (each module names its own
                                     below, as attributes here)

The web process's own folder (it writes nothing else):

    /var/lib/mailstead-web/          0700 mailstead:mailstead  session signing key

Nothing in the agent's state is ever read from, or created by, the web user:
the web asks the agent (portal/web/state.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/mailstead")
DEFAULT_WEB_DIR = Path("/var/lib/mailstead-web")
DEFAULT_RUN_DIR = Path("/run/mailstead")


def state_dir_from_env() -> Path:
    return Path(os.environ.get("MAILSTEAD_STATE_DIR") or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class StateLayout:
    """Where the agent keeps each piece of state under `root`."""

    root: Path

    # -- files ---------------------------------------------------------------------
    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def setup_token(self) -> Path:
        return self.root / "setup-token"

    @property
    def setup_finished(self) -> Path:
        """Made once setup is finished: no setup token is ever made again."""
        return self.root / "setup-finished"

    @property
    def backup_state(self) -> Path:
        return self.root / "backup-state.json"

    @property
    def stack_images(self) -> Path:
        return self.root / "stack-images.json"

    @property
    def upgrade_state(self) -> Path:
        """The last upgrade check's and the last upgrade's outcome (portal/stack/upgrade.py)."""
        return self.root / "upgrade-state.json"

    @property
    def certs_state(self) -> Path:
        """Certificate renewal state (portal/certs/renew.py)."""
        return self.root / "certs-state.json"

    @property
    def images_lock(self) -> Path:
        return self.root / "images.lock"

    @property
    def backup_lock(self) -> Path:
        return self.root / "backup.lock"

    @property
    def upgrade_lock(self) -> Path:
        return self.root / "upgrade.lock"

    # -- folders ---------------------------------------------------------------------
    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def accounts(self) -> Path:
        return self.root / "accounts"

    @property
    def accounts_db(self) -> Path:
        return self.accounts / "accounts.db"

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    @property
    def upgrade(self) -> Path:
        return self.root / "upgrade"

    @property
    def upgrade_previous(self) -> Path:
        """The kept previous stack folder and pin of the last upgrade."""
        return self.upgrade / "previous"

    @property
    def dkim(self) -> Path:
        return self.secrets / "dkim"

    @property
    def acme_account(self) -> Path:
        return self.secrets / "acme"

    @property
    def rfc2136_key(self) -> Path:
        return self.secrets / "rfc2136.key"

    @property
    def redis_password(self) -> Path:
        return self.secrets / "redis-password"

    @property
    def backup_work(self) -> Path:
        return self.root / "backup-work"

    @property
    def backup_cache(self) -> Path:
        return self.root / "backup-cache"

    # Folders made at the agent's start, with their modes (secrets never readable by others).
    FOLDERS = (("jobs", 0o700), ("secrets", 0o700), ("tls", 0o755), ("upgrade", 0o700))

    def prepare(self) -> None:
        """Make the state folder and its fixed sub-folders root's (0755 / their modes),
        refusing any that is a symlink or belongs to another user."""
        from portal.core.safefs import ensure_dir

        ensure_dir(self.root, 0o755)
        for name, mode in self.FOLDERS:
            ensure_dir(self.root / name, mode)
