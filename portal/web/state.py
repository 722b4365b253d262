"""What the pages know of the appliance, asked from the agent once per request.

The web process never opens the agent's state (state.db, the token file, the
secrets): it calls `portal_state` (portal/setup/privileged.py) at most once per
request and reads settings, wizard progress and "is setup complete" from that
answer. A page that changes something calls the operation that changes it and
then `forget()`s the answer, so the rest of the request sees the change.
"""

from __future__ import annotations

from typing import Any

from flask import g

from portal.core.settings import is_true


def portal_state() -> dict[str, Any]:
    """The agent's portal_state, once per request (raises AgentError if it does not answer)."""
    if "portal_state" not in g:
        from flask import session

        from portal.setup.privileged import portal_state as ask

        g.portal_state = ask(session=str(session.get("sid") or ""))
    return g.portal_state


def session_valid() -> bool:
    """Whether the browser's admin session is live on the agent's side (not signed out)."""
    return bool(portal_state().get("session_valid"))


def forget() -> None:
    """Ask again at the next use (after this request changed something)."""
    g.pop("portal_state", None)


def settings() -> dict[str, str]:
    return dict(portal_state().get("settings") or {})


def get_setting(key: str, default: str | None = None) -> str | None:
    return settings().get(key, default)


def done_steps() -> set[str]:
    return set(portal_state().get("done_steps") or ())


def setup_complete() -> bool:
    return bool(portal_state().get("setup_complete")) or is_true(get_setting("setup_complete"))
