"""DNS for the appliance: expected records, export, checks against the
authoritative servers, and RFC 2136 updates (see DESIGN.md: pure builders
first, side effects only in agent operations)."""

from __future__ import annotations  # noqa: E402 (after the docstring)


class DnsError(Exception):
    """A DNS operation failed or an input is invalid; `str()` says what to fix.
    (Here, not in update.py, so that catching it costs no dnspython import.)"""

    def __init__(self, message: str, field: str | None = None) -> None:
        named = field is None or message.startswith(field)
        super().__init__(message if named else f"{field}: {message}")
        self.field = field
        self.message = message
