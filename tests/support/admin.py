"""A signed-in administrator for the tests (as Flask's tutorial has one AuthActions).

`sign_in(client)` gives the client's browser a live admin session: the agent's
own session record (its id in the signed cookie, its hash in the state folder the
test gave the app as TEST_STATE_DIR), without going through the sign-in form."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from flask.testing import FlaskClient

from portal.admin.privileged import new_session


def sign_in(client: FlaskClient, address: str, *, seen_ago: float = 0, auth_ago: float = 0,
            state_dir: Path | None = None) -> str:
    """Make `client` signed in as `address`; returns the session id."""
    folder = Path(state_dir or client.application.config["TEST_STATE_DIR"])
    sid = new_session(SimpleNamespace(state_dir=folder))  # type: ignore[arg-type]
    now = time.time()
    with client.session_transaction() as session:
        session["admin"] = address
        session["sid"] = sid
        session["auth_at"] = now - auth_ago
        session["seen"] = now - seen_ago
    return sid


def allow_code_again(state_dir: Path) -> None:
    """Forget which TOTP step was used last, in the admin record and in the agent's ledger
    of spent codes (a code works once; tests have no 30 s to wait for the next)."""
    import json

    secrets = Path(state_dir) / "secrets"
    for name in ("admin.json", "admin-ledger.json"):
        path = secrets / name
        if path.exists():
            record = json.loads(path.read_text())
            record["totp_last_step"] = -1
            path.write_text(json.dumps(record))
