"""DNS for the appliance: expected records, export, checks against the
authoritative servers, and RFC 2136 updates (see DESIGN.md: pure builders
first, side effects only in agent operations)."""

from __future__ import annotations  # noqa: E402 (after the docstring)


from portal.core.errors import MailsteadError


class DnsError(MailsteadError):
    """A DNS operation failed or an input is invalid; `str()` says what to fix.
    (Here, not in update.py, so that catching it costs no dnspython import.)
    Code "invalid" when a field is at fault, else "dns"."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, code="invalid" if field else "dns")

    def __str__(self) -> str:
        # Messages here often start with their field's name already ("domain is not set").
        if self.field and not self.message.startswith(self.field):
            return f"{self.field}: {self.message}"
        return self.message
