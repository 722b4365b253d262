"""The agent's backup operations: backup_configure, backup_run, backup_list,
backup_verify, backup_restore, backup_state, backup_ssh_key.

backup_run, backup_verify and backup_restore start background jobs (jobs.py:
kinds "backup_run", "backup_verify", "backup_restore") and return the job;
watch it with job_status.

A change of the backup target and a restore are confirmed with a fresh code of the
administrator (`totp_code`: a TOTP code never used before, or an unused recovery code;
portal.admin.privileged.confirm_code), from every caller, the console's CLI included,
on a set-up appliance (setup finished, an administrator exists). Before that (a fresh
appliance, the first-boot wizard and its restore: setup_restore in
portal/setup/privileged.py) there is nobody to ask. The scheduler calls portal.backup.service directly
(backup(env_for(ctx)), verify(...)), the same functions the jobs run.

Tests may set on the Context: `backup_volumes` (a VolumeIO, e.g.
FolderVolumes: no docker), `backup_stack` (stop/start; False: no stack),
`restic_bin`, `backup_timeout` (seconds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from portal.agent.registry import Context, OpError, privileged

Progress = Callable[[str, str], None]


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    from portal.backup import BackupError

    try:
        yield
    except BackupError as exc:
        raise OpError(exc.code, exc.message, exc.field) from None


def env_for(ctx: Context) -> Any:
    from portal.backup.service import DEFAULT_TIMEOUT, ComposeStack, Env

    stack = getattr(ctx, "backup_stack", None)
    if stack is None:
        stack = ComposeStack(ctx)
    elif stack is False:
        stack = None
    return Env(state_dir=ctx.state_dir, version=ctx.portal_version,
               restic_bin=getattr(ctx, "restic_bin", "restic"),
               volumes=getattr(ctx, "backup_volumes", None), stack=stack,
               timeout=float(getattr(ctx, "backup_timeout", DEFAULT_TIMEOUT)))


@privileged(web=True, timeout=360.0, secret=("key", "secret_access_key", "password", "totp_code"))
def backup_configure(ctx: Context, target: str, path: str = "", host: str = "", port: int = 0, user: str = "",
                     key: str = "", endpoint: str = "", bucket: str = "", region: str = "",
                     access_key_id: str = "", secret_access_key: str = "", password: str = "",
                     totp_code: str = "") -> dict[str, Any]:
    """Choose the backup target. Without `password`: a new repository with a generated
    password, returned once in `recovery_sheet`. With `password` (from a recovery
    sheet): connect to the existing repository. On a set-up appliance, a fresh
    `totp_code` confirms it (checked after the target's fields, spent even if the target
    then cannot be reached)."""
    from portal.admin.privileged import confirm_code
    from portal.backup import config as cfg
    from portal.backup.service import configure

    with refusals():
        t = cfg.validate(target, path=path, host=host, port=port, user=user, endpoint=endpoint, bucket=bucket,
                         region=region, access_key_id=access_key_id, secret_access_key=secret_access_key)
    confirm_code(ctx, totp_code)
    with refusals():
        return configure(env_for(ctx), t, password=password, key=key)


@privileged(web=True, timeout=10.0)
def backup_target(ctx: Context) -> dict[str, Any]:
    """The configured target without credentials, or {"target": null}."""
    from portal.backup import BackupError
    from portal.backup import config as cfg

    try:
        t = cfg.load_target(cfg.Paths(ctx.state_dir / "secrets"))
    except BackupError:
        return {"target": None}
    return {"target": t.public()}


@privileged(web=True, timeout=30.0)
def backup_ssh_key(ctx: Context) -> dict[str, Any]:
    """The appliance's SSH public key for an SFTP target (made by backup_configure), to add
    to the server's authorized_keys; {"ssh_public_key": null} before the first SFTP attempt."""
    import subprocess

    from portal.backup import config as cfg

    key = cfg.Paths(ctx.state_dir / "secrets").ssh_key
    if not key.exists():
        return {"ssh_public_key": None}
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, timeout=30,
                         check=False)
    return {"ssh_public_key": (pub.stdout.strip() or None) if pub.returncode == 0 else None}


@privileged(web=True, job=True, timeout=10.0)
def backup_run(ctx: Context, progress: Progress) -> dict[str, Any]:
    """Back up now (a background job; the running one if a backup is already going)."""
    from portal.backup.service import backup

    with refusals():
        return backup(env_for(ctx), progress)


@privileged(web=True, job=True, timeout=10.0)
def backup_verify(ctx: Context, progress: Progress) -> dict[str, Any]:
    """Restore the latest snapshot into a scratch folder and compare it with its manifest (a job)."""
    from portal.backup.service import verify

    with refusals():
        return verify(env_for(ctx), progress)


def check_restore(ctx: Context, snapshot: str = "latest") -> dict[str, Any]:
    """A restore's snapshot, checked before its job starts (also the wizard's setup_restore)."""
    from portal.backup.service import check_snapshot_id

    with refusals():
        return {"snapshot": check_snapshot_id(snapshot)}


def check_backup_restore(ctx: Context, snapshot: str = "latest", totp_code: str = "") -> dict[str, Any]:
    """backup_restore's request, before its job starts: the snapshot ID, then the fresh
    code (spent here; the job never sees it)."""
    from portal.admin.privileged import confirm_code

    checked = check_restore(ctx, snapshot)
    confirm_code(ctx, totp_code)
    return {**checked, "totp_code": ""}


@privileged(web=True, job=True, timeout=10.0, check=check_backup_restore, secret=("totp_code",))
def backup_restore(ctx: Context, progress: Progress, snapshot: str = "latest", totp_code: str = "") -> dict[str, Any]:
    """Replace this appliance's mail, accounts, keys and settings with `snapshot` (a job),
    once a fresh `totp_code` of the administrator confirmed it (check_backup_restore; the
    first-boot wizard's restore, with no administrator yet, is setup_restore). The snapshot
    is untrusted input: checked before anything is touched, imported as checked data."""
    from portal.backup.service import restore

    with refusals():
        return restore(env_for(ctx), snapshot, progress)


@privileged(web=True, timeout=180.0)
def backup_list(ctx: Context) -> dict[str, Any]:
    """The snapshots in the repository, newest first."""
    from portal.backup.service import snapshots

    with refusals():
        return {"snapshots": snapshots(env_for(ctx), timeout=120)}


@privileged(web=True, timeout=10.0)
def backup_state(ctx: Context) -> dict[str, Any]:
    """The last backup's and the last verification's outcome (backup-state.json)."""
    from portal.backup.service import read_state

    return read_state(env_for(ctx))
