"""What the checks look at: paths, thresholds and the agent's Context (injectable)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portal.agent.registry import Context

DEFAULT_DNSBL_ZONES = ("zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org")


@dataclass
class CheckEnv:
    ctx: Context
    # Free disk: warn below either threshold, fail below both halved.
    disk_min_free_percent: float = 10.0
    disk_min_free_bytes: int = 2 * 1024 ** 3
    mem_min_available_percent: float = 10.0
    meminfo: Path = Path("/proc/meminfo")
    queue_warn: int = 50
    queue_fail: int = 500
    backup_max_age_hours: float = 36.0
    verify_max_age_days: float = 8.0
    cert_min_days: int = 14
    dns_max_age_hours: float = 50.0
    net_timeout: float = 3.0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def state_dir(self) -> Path:
        return self.ctx.state_dir

    @property
    def backup_state(self) -> Path:
        return self.state_dir / "backup-state.json"

    @functools.cached_property
    def values(self) -> dict[str, str]:
        """The settings table of state.db (read once per round)."""
        from portal.core.store import read_settings

        return read_settings(self.state_dir)

    def stack_settings(self) -> Any:
        """StackSettings, or raises SettingsError naming what setup still lacks."""
        if "stack" not in self._cache:
            from portal.stack.store import load_settings

            try:
                self._cache["stack"] = load_settings(self.state_dir)
            except Exception as exc:  # noqa: BLE001 - re-raised to each caller
                self._cache["stack"] = exc
        value = self._cache["stack"]
        if isinstance(value, Exception):
            raise value
        return value

    @property
    def setup_complete(self) -> bool:
        return self.values.get("setup_complete") == "1"


def env_for(ctx: Context) -> CheckEnv:
    """The checks' view of the world; tests may set ctx.check_env (a callable ctx -> CheckEnv)."""
    factory = getattr(ctx, "check_env", None)
    return factory(ctx) if factory else CheckEnv(ctx)
