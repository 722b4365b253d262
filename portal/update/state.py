"""What an image update keeps of the agent's state, and how a rollback puts it back.

Before a new version is installed, the agent's state folder (settings, accounts,
secrets, certificates, the stack's pins) is copied to <update>/pre-update: the
databases through sqlite's backup API, the rest as it is (owners, modes and the
one symlink kept). The mail is not in it: it lives in docker's volumes, which
no update or rollback touches, so mail that arrives while a new version runs is
kept whatever happens.

`update.json` in the same folder holds the update under way ("pending": from,
to, when, firmware) and the history of updates and rollbacks. On every boot,
before the agent starts (mailstead-update-boot.service), `on_boot` compares
the running version with the pending update:

- running the new version: it is on trial; the health check decides (`finish`).
- running the old one again (the new one failed to boot, or was not healthy in
  time, and the boot loader came back): the state the new version may have
  changed is moved aside to <update>/failed-<version> and the pre-update copy is
  moved into its place (one rename each, on the same file system), and the
  rollback is recorded for the alert mail and the Updates page.

Both folders are root's; the web process never reads or writes them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from portal.backup.contents import sqlite_copy
from portal.core import safefs
from portal.core.errors import MailsteadError

DEFAULT_UPDATE_DIR = Path("/var/lib/mailstead-update")
# The feed address the image was built with (scripts/build-image --feed-url); the
# owner's setting update_feed_url comes first.
DEFAULT_FEED_FILE = Path("/usr/lib/mailstead/update-feed-url")
RECORD = "update.json"
COPY = "pre-update"
HISTORY_KEPT = 50
# Inside the state folder: not part of the copy (they are rebuilt, or are this
# boot's and not the version's): running jobs' records, and the folder of the
# retired stack-only upgrade bundles, which a machine set up before image updates may hold.
NOT_COPIED = ("jobs", "upgrade/bundles")
DATABASES = ("state.db", "accounts/accounts.db")


class UpdateStateError(MailsteadError):
    code = "update_state"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_record(update_dir: Path) -> dict[str, Any]:
    doc = safefs.read_json(update_dir / RECORD, default={})
    if not isinstance(doc, dict):
        doc = {}
    history = doc.get("history")
    doc["history"] = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    if not isinstance(doc.get("pending"), dict):
        doc["pending"] = None
    return doc


def write_record(update_dir: Path, doc: dict[str, Any]) -> None:
    doc["history"] = doc.get("history", [])[-HISTORY_KEPT:]
    safefs.write_json(update_dir / RECORD, doc)


def add_history(update_dir: Path, outcome: str, **fields: Any) -> dict[str, Any]:
    doc = read_record(update_dir)
    entry = {"at": now_iso(), "outcome": outcome, **fields}
    doc["history"].append(entry)
    write_record(update_dir, doc)
    return entry


def copy_state(state_dir: Path, update_dir: Path) -> Path:
    """<update>/pre-update: a copy of `state_dir` as it is now, replacing an older one."""
    safefs.ensure_dir(update_dir, 0o700)
    tmp = safefs.temp_dir(update_dir, COPY)
    try:
        target = tmp / "state"
        _copy(state_dir, target)
        for rel in NOT_COPIED:
            safefs.remove_tree(target / rel)
        for rel in DATABASES:
            if (state_dir / rel).is_file():
                _sqlite_copy(state_dir / rel, target / rel)
        final = update_dir / COPY
        safefs.remove_tree(final)
        safefs.rename(tmp, final)
        return final / "state"
    except BaseException:
        safefs.remove_tree(tmp)
        raise


def _copy(src: Path, dest: Path) -> None:
    """cp -a: owners, modes, times and symlinks as they are (the state is root's own)."""
    r = subprocess.run(["cp", "-a", "--", str(src), str(dest)], capture_output=True, text=True,
                       timeout=600, check=False)
    if r.returncode != 0:
        raise UpdateStateError(f"copying the agent's state failed: {' '.join(r.stderr.split())[-300:]}")


def _sqlite_copy(src: Path, dest: Path) -> None:
    """Over the file cp made: a consistent copy (sqlite's backup API, as backups take
    it), even while the agent writes; owner and mode as the original's."""
    st = os.lstat(dest)
    tmp = dest.with_name(f".{dest.name}.copy")
    safefs.remove(tmp)
    sqlite_copy(src, tmp)
    # Owner and mode through descriptors opened without following symlinks, then
    # the rename into place.
    with safefs.open_file(tmp) as f:
        os.fchown(f.fileno(), st.st_uid, st.st_gid)
    safefs.chmod(tmp, st.st_mode & 0o7777)
    safefs.rename(tmp, dest)
    for suffix in ("-wal", "-shm"):
        safefs.remove(dest.with_name(dest.name + suffix))


def begin(state_dir: Path, update_dir: Path, running: str, new: str, firmware: str) -> dict[str, Any]:
    """Before installing `new`: copy the state and record the update as pending."""
    copy_state(state_dir, update_dir)
    doc = read_record(update_dir)
    doc["pending"] = {"from": running, "to": new, "at": now_iso(), "firmware": firmware}
    write_record(update_dir, doc)
    return doc["pending"]


def on_boot(state_dir: Path, update_dir: Path, running: str) -> str:
    """What this boot is, for a pending update: "none", "trial" (the new version is
    running and must prove itself), "rolled_back" (the old one is back: the state
    was put back), or "abandoned" (some third version runs: the record is dropped)."""
    doc = read_record(update_dir)
    pending = doc["pending"]
    if not pending:
        return "none"
    by_owner = pending.get("by") == "owner"
    if running == pending.get("to") and not by_owner:
        return "trial"
    if running == pending.get("from"):
        restore_state(state_dir, update_dir, str(pending.get("to")))
        doc = read_record(update_dir)
        doc["pending"] = None
        why = ("the owner chose to go back to it" if by_owner else f"{pending.get('to')} did not come up healthy")
        doc["history"].append({"at": now_iso(), "outcome": "rolled_back", "from": pending.get("from"),
                               "to": pending.get("to"), "alerted": False, "by": "owner" if by_owner else "health",
                               "message": f"{why}; back on {running} with the settings from before the "
                                          f"update to {pending.get('to')} (mail is kept)"})
        write_record(update_dir, doc)
        return "rolled_back"
    doc["pending"] = None
    what = "the boot loader did not switch" if running == pending.get("to") else "neither version of the update"
    doc["history"].append({"at": now_iso(), "outcome": "abandoned", "from": pending.get("from"),
                           "to": pending.get("to"), "message": f"running {running}: {what}"})
    write_record(update_dir, doc)
    return "abandoned"


def restore_state(state_dir: Path, update_dir: Path, failed_version: str) -> None:
    """Put the pre-update copy in the state folder's place; keep the one the failed
    version left in <update>/failed-<version> (one at a time)."""
    copy = update_dir / COPY / "state"
    if not copy.is_dir():
        raise UpdateStateError(f"no copy of the state from before the update in {copy}: the state is kept "
                               "as the failed version left it")
    failed = update_dir / f"failed-{failed_version}"
    safefs.remove_tree(failed)
    if safefs.lstat(state_dir) is not None:
        safefs.rename(state_dir, failed)
    safefs.rename(copy, state_dir)
    safefs.remove_tree(update_dir / COPY)


def finish(update_dir: Path, running: str, ok: bool, message: str) -> dict[str, Any]:
    """The trial of `running` ended: installed, or failed. The copy stays either way:
    for the rollback the next boot does, or for the owner's "go back" (until the
    next update replaces it)."""
    doc = read_record(update_dir)
    pending = doc["pending"] or {}
    entry = {"at": now_iso(), "outcome": "installed" if ok else "failed", "from": pending.get("from"),
             "to": running, "message": message}
    doc["history"].append(entry)
    if ok:
        doc["pending"] = None
    write_record(update_dir, doc)
    return entry


def abort(update_dir: Path, message: str) -> dict[str, Any]:
    """Installing failed before the new version could boot: nothing is pending any more
    (the next boot is an ordinary one), the copy goes."""
    doc = read_record(update_dir)
    pending = doc["pending"] or {}
    entry = {"at": now_iso(), "outcome": "not_installed", "from": pending.get("from"), "to": pending.get("to"),
             "message": message}
    doc["pending"] = None
    doc["history"].append(entry)
    write_record(update_dir, doc)
    safefs.remove_tree(update_dir / COPY)
    return entry


def mark_alerted(update_dir: Path, alerts: str) -> None:
    """The owner was told about the last rollback (`alerts`: what the alert mail and
    webhook did): it is not told again at the next boot."""
    doc = read_record(update_dir)
    if doc["history"] and doc["history"][-1].get("outcome") == "rolled_back":
        doc["history"][-1].update({"alerted": True, "alerts": alerts[:300]})
        write_record(update_dir, doc)


def rollback_target(update_dir: Path, running: str) -> str | None:
    """The version the owner can go back to: the one `running` was installed over, while
    the copy of the state from before that update is still here."""
    doc = read_record(update_dir)
    if doc["pending"] or not (update_dir / COPY / "state").is_dir():
        return None
    for entry in reversed(doc["history"]):
        if entry.get("outcome") == "installed" and entry.get("to") == running:
            return str(entry.get("from") or "") or None
        if entry.get("outcome") in ("installed", "rolled_back"):
            return None
    return None


def begin_rollback(update_dir: Path, running: str, target: str, firmware: str) -> dict[str, Any]:
    """The owner goes back from `running` to `target`: recorded as an update from `target`
    to `running` that is being undone, so the next boot (on `target`) puts the state back
    and tells the owner, as after a failed update."""
    doc = read_record(update_dir)
    doc["pending"] = {"from": target, "to": running, "at": now_iso(), "firmware": firmware, "by": "owner"}
    write_record(update_dir, doc)
    return doc["pending"]


def default_feed_url(path: Path = DEFAULT_FEED_FILE) -> str:
    from portal.core.settings import SettingsError, feed_url

    try:
        return feed_url("update_feed_url", path.read_text(encoding="utf-8").strip()[:600])
    except (OSError, UnicodeDecodeError, SettingsError):
        return ""


def history(update_dir: Path) -> list[dict[str, Any]]:
    return list(reversed(read_record(update_dir)["history"]))


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=1, sort_keys=True)
