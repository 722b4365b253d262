"""Settings for test rigs: one helper instead of a copy per test module.

`write_settings(state_dir, **values)` stores raw rows in state.db, as a test sets up
a state (a value the agent would refuse can be stored too, to see it refused where
it is used); `store_settings` goes through the agent's own checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from portal.core import store
from tests.support import statedb


def write_settings(state_dir: Path, **values: Any) -> None:
    """Raw settings rows (non-text values as JSON)."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    statedb.write_settings(Path(state_dir) / "state.db",
                           {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})


def store_settings(state_dir: Path, **values: str) -> dict[str, str]:
    """Settings through the agent's checks (SettingsError names a bad one)."""
    return store.write_settings(state_dir, values)


def mark_done(state_dir: Path, *steps: str) -> None:
    statedb.mark_done(Path(state_dir) / "state.db", *steps)


def receives(state_dir: Path, *addresses: str) -> None:
    """Make `addresses` receive mail here (aliases forwarding elsewhere, their domains
    hosted), as the test message asks of its recipient."""
    from portal.stack.accounts import Accounts

    accounts = Accounts(Path(state_dir) / "accounts" / "accounts.db")
    for address in addresses:
        accounts.add_domain(address.split("@")[1])
        accounts.add_alias(address, "owner@elsewhere.test")
