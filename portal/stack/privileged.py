"""The agent's mail stack operations: load images, deploy, status, mailboxes, aliases, upgrades.

Each is a thin call into portal.stack; the web process, the CLI and the
scheduler use the same operations. Passwords arrive as arguments and are
never logged or returned.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from portal.agent.registry import Context, OpError, privileged
from portal.core import safefs
from portal.core.layout import StateLayout
from portal.stack import deploy as deploy_mod
from portal.stack.accounts import AccountError, Accounts, MailboxKeys
from portal.stack.images import ImageError, load_images, loaded_images
from portal.stack.pins import present, read_pin, write_pin
from portal.stack.settings import SettingsError, StackSettings
from portal.stack.store import load_settings

Progress = Callable[[str, str], None]


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Turn the stack's typed errors into OpErrors that name the field."""
    try:
        yield
    except (AccountError, SettingsError) as exc:
        raise OpError("invalid", exc.message, exc.field) from None
    except ImageError as exc:
        raise OpError("images", str(exc)) from None
    except deploy_mod.DeployError as exc:
        details = "; ".join(f"{s}: {why}" for s, why in sorted(exc.failures.items()))
        raise OpError("deploy_failed", f"{exc}" + (f" — {details}" if details else "")) from None


def settings_for(ctx: Context) -> StackSettings:
    return load_settings(ctx.state_dir)


def ensure_images(ctx: Context, client: Any, settings: StackSettings,
                  progress: Callable[[str, str], None] | None = None) -> dict[str, str]:
    return load_images(client, ctx.images_dir, settings.version,
                       lock_path=StateLayout(ctx.state_dir).images_lock, progress=progress)


def keys_for(client: Any, settings: StackSettings) -> MailboxKeys:
    from portal.stack.dovecot_keys import DovecotKeys

    return DovecotKeys(client, settings.project)


def accounts_for(settings: StackSettings) -> Accounts:
    """The accounts database, with the appliance's own domain always hosted."""
    accounts = Accounts(settings.accounts_db)
    accounts.add_domain(settings.domain)
    return accounts


@privileged(timeout=1800.0)
def stack_load_images(ctx: Context) -> dict[str, Any]:
    """Load the preloaded images into docker (idempotent; run in the background at boot)."""
    start = time.monotonic()
    client = ctx.docker()
    try:
        with refusals():
            ids = load_images(client, ctx.images_dir, ctx.portal_version,
                              lock_path=StateLayout(ctx.state_dir).images_lock)
    finally:
        client.close()
    return {"images": ids, "seconds": round(time.monotonic() - start, 1)}


def check_deploy(ctx: Context, timeout: int = 900) -> dict[str, Any]:
    """What a deploy can refuse at once: a bad timeout, settings setup has not made yet."""
    if not 60 <= timeout <= 3600:
        raise OpError("invalid", "give a number of seconds from 60 to 3600", "timeout")
    with refusals():
        settings_for(ctx)
    return {}


@privileged(web=True, job=True, timeout=30.0, check=check_deploy)
def stack_deploy(ctx: Context, progress: Callable[[str, str], None], timeout: int = 900) -> dict[str, Any]:
    """Render the stack from the saved settings and bring it up (rolls back on failure);
    a job, with per-service progress."""
    return deploy_stack(ctx, progress, timeout)


def deploy_stack(ctx: Context, progress: Callable[[str, str], None], timeout: int = 900,
                 recreate: bool = True) -> dict[str, Any]:
    """stack_deploy with progress: ("images", ...), then per service ("postfix", "healthy"), ...
    (recreate: see deploy.deploy)."""
    from portal.stack.dkim import ensure_keys

    with refusals():
        settings = settings_for(ctx)
    client = ctx.docker()
    try:
        with refusals():
            settings = pinned_settings(ctx, client, settings, progress)
            ensure_keys(settings.dkim_dir, settings.dkim_selectors)
            accounts_for(settings)
            progress("deploy", "starting the services")
            result = deploy_mod.deploy(client, settings, timeout=timeout, progress=progress, recreate=recreate)
            write_pin(ctx.state_dir, settings.version, settings.images)
            web = publish_web(ctx, settings)
            progress("web", "client settings and MTA-STS published")
    finally:
        client.close()
    return {
        "web_files_changed": web,
        "seconds_to_healthy": round(result.seconds_to_healthy, 1),
        "services": {s: {"status": st.status, "health": st.health} for s, st in result.services.items()},
    }


def pinned_settings(ctx: Context, client: Any, settings: StackSettings,
                    progress: Callable[[str, str], None]) -> StackSettings:
    """`settings` with the images to deploy: the pinned ones (stack-images.json, see
    pins.py) while docker has them, so a newer appliance version's images come only
    with an explicit upgrade; else (first deploy) those this appliance ships."""
    pin = read_pin(ctx.state_dir)
    ids = present(client, pin.images) if pin else None
    if pin and ids:
        progress("images", f"the stack's pinned {pin.version} images")
        return replace(settings, version=pin.version).with_images(ids)
    if pin:
        progress("images", f"the pinned {pin.version} images are no longer in docker; "
                           f"using the {settings.version} images this appliance ships")
    progress("images", "loading the container images (first time only)")
    return settings.with_images(ensure_images(ctx, client, settings, progress=progress))


def publish_web(ctx: Context, settings: StackSettings) -> list[str]:
    """The host nginx's routes for DAV, MTA-STS, autoconfig and autodiscover;
    nginx is reloaded when they changed, and a config nginx refuses is taken out."""
    from portal.stack.web import NGINX_CONF_NAME, write_web_files

    changed = write_web_files(settings, ctx.nginx_dir, ctx.www_dir)
    if changed and ctx.reload_nginx:
        test = subprocess.run(["nginx", "-t"], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            safefs.remove(ctx.nginx_dir / NGINX_CONF_NAME)
            raise OpError("nginx", "nginx refused the generated routes and they were taken out: "
                                   + " ".join(test.stderr.split())[-400:])
        subprocess.run(["nginx", "-s", "reload"], capture_output=True, check=True)
    return [str(p) for p in changed]


@privileged(web=True, timeout=10.0)
def stack_status(ctx: Context) -> dict[str, Any]:
    """Each service's container state and health, and which images are loaded."""
    with refusals():
        settings = settings_for(ctx)
    client = ctx.docker()
    try:
        with refusals():
            states = deploy_mod.service_states(client, settings.project)
            images = loaded_images(client, settings.version)
    finally:
        client.close()
    return {
        "services": {s: {"status": st.status, "health": st.health, "error": st.error}
                     for s, st in states.items()},
        "images_loaded": sorted(images),
    }


class LazyKeys:
    """The dovecot key manager, connecting to docker only when a change needs it
    (so bad input is refused even when the engine is down)."""

    def __init__(self, ctx: Context, settings: StackSettings) -> None:
        self.ctx, self.settings, self.client, self._keys = ctx, settings, None, None

    def __getattr__(self, name: str) -> Any:
        if self._keys is None:
            self.client = self.ctx.docker()
            self._keys = keys_for(self.client, self.settings)
        return getattr(self._keys, name)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _with_accounts(ctx: Context, fn: Callable[[Accounts, MailboxKeys], Any]) -> Any:
    with refusals():
        settings = settings_for(ctx)
    keys = LazyKeys(ctx, settings)
    try:
        with refusals():
            return fn(accounts_for(settings), keys)
    except OpError:
        raise
    except Exception as exc:  # doveadm or docker failed: say so without echoing arguments
        raise OpError("stack", f"the mail stack refused the change: {' '.join(str(exc).split())[:300]}") from None
    finally:
        keys.close()


@privileged(web=True, timeout=10.0)
def mailbox_list(ctx: Context) -> dict[str, Any]:
    """The mailboxes (address, quota) and the aliases."""
    with refusals():
        accounts = accounts_for(settings_for(ctx))
        return {"mailboxes": accounts.list_mailboxes(), "aliases": accounts.list_aliases()}


@privileged(web=True, timeout=60.0, secret=("password",))
def mailbox_create(ctx: Context, address: str, password: str, quota_mb: int = 0) -> dict[str, Any]:
    """A new mailbox with its own mail encryption keys (quota 0: no limit)."""
    _with_accounts(ctx, lambda a, k: a.create_mailbox(address, password, quota_mb, keys=k))
    return {"created": address.lower()}


@privileged(web=True, timeout=60.0)
def mailbox_delete(ctx: Context, address: str) -> dict[str, Any]:
    """Delete a mailbox, its mail and its keys (its aliases go too)."""
    return _with_accounts(ctx, lambda a, k: a.delete_mailbox(address, k))


@privileged(web=True, timeout=60.0)
def mailbox_rename(ctx: Context, address: str, new_address: str) -> dict[str, Any]:
    """Rename a mailbox, keeping its mail and keys."""
    return _with_accounts(ctx, lambda a, k: a.rename_mailbox(address, new_address, k))


@privileged(web=True, timeout=60.0, secret=("old_password", "new_password"))
def mailbox_password(ctx: Context, address: str, old_password: str, new_password: str) -> dict[str, Any]:
    """Change a password knowing the old one (the mail keys are re-encrypted)."""
    _with_accounts(ctx, lambda a, k: a.change_password(address, old_password, new_password, k))
    return {"changed": address.lower()}


@privileged(web=True, timeout=60.0, secret=("new_password",))
def mailbox_reset_password(ctx: Context, address: str, new_password: str) -> dict[str, Any]:
    """For a forgotten password: new keys, so mail stored until now can no longer be read."""
    _with_accounts(ctx, lambda a, k: a.reset_password(address, new_password, k))
    return {"reset": address.lower()}


@privileged(web=True, timeout=30.0)
def mailbox_quota(ctx: Context, address: str, quota_mb: int) -> dict[str, Any]:
    """Set a mailbox's quota in MB (0: no limit)."""
    with refusals():
        return accounts_for(settings_for(ctx)).set_quota(address, quota_mb)


@privileged(web=True, timeout=30.0)
def alias_add(ctx: Context, source: str, destination: str) -> dict[str, Any]:
    """Deliver mail for `source` to `destination` too."""
    with refusals():
        return accounts_for(settings_for(ctx)).add_alias(source, destination)


@privileged(web=True, timeout=30.0)
def alias_remove(ctx: Context, source: str, destination: str) -> dict[str, Any]:
    """Remove one alias."""
    with refusals():
        accounts_for(settings_for(ctx)).remove_alias(source, destination)
    return {"removed": {"source": source.lower(), "destination": destination.lower()}}


# -- upgrades ---------------------------------------------------------------------------------
# The first boot of an image update brings the stack to the images that version
# ships (portal/update); upgrade_run does the same by hand. It refuses at once what
# can be refused (nothing newer, no backup target without `without_backup`), then
# starts its background job and returns it.

@contextlib.contextmanager
def upgrade_refusals() -> Iterator[None]:
    from portal.stack.upgrade import UpgradeError

    try:
        yield
    except UpgradeError as exc:
        raise OpError(exc.code, exc.message, exc.field) from None


def check_upgrade(ctx: Context, force: bool = False, without_backup: bool = False,
                  timeout: int = 900) -> dict[str, Any]:
    """What can be refused at once (nothing newer, no backup target without
    `without_backup`, damaged images, a bad timeout) is refused before the job starts."""
    from portal.stack.upgrade import plan

    if not 60 <= timeout <= 3600:
        raise OpError("invalid", "give a number of seconds from 60 to 3600", "timeout")
    with upgrade_refusals(), plan(ctx, force, without_backup):
        pass
    return {}


@privileged(job=True, timeout=60.0, check=check_upgrade)
def upgrade_run(ctx: Context, progress: Progress, force: bool = False,
                without_backup: bool = False, timeout: int = 900) -> dict[str, Any]:
    """Upgrade the stack to the images this appliance ships: load, back up, redeploy,
    health-check, roll back on failure. A background job. `force` reinstalls a version
    that is not newer; `without_backup` upgrades when no backup target is configured;
    `timeout`: seconds the new stack may take to become healthy."""
    from portal.checks import wait_healthy
    from portal.stack.upgrade import HEALTH_CHECKS, run

    with upgrade_refusals():
        return run(ctx, progress, force=force, without_backup=without_backup,
                   timeout=float(timeout), health_wait=float(getattr(ctx, "upgrade_health_wait", 120)),
                   health=lambda wait, pr: wait_healthy(ctx, HEALTH_CHECKS, wait, pr))


@privileged(web=True, timeout=10.0)
def upgrade_state(ctx: Context) -> dict[str, Any]:
    """The last upgrade's outcome (upgrade-state.json), the pinned
    version and image IDs, and the kept previous version (for the dashboard)."""
    from portal.stack.pins import read_pin
    from portal.stack.upgrade import previous_dir, read_state

    pin = read_pin(ctx.state_dir)
    out = read_state(ctx.state_dir)
    out["pinned"] = pin.public() if pin else None
    try:
        out["previous"] = safefs.read_json(previous_dir(ctx.state_dir) / "pin.json", None, owner_uid=os.geteuid())
    except (OSError, ValueError):
        out["previous"] = None
    return out


