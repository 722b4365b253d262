"""The one error root: every error a person can cause or fix carries `code`,
`field` and `message` as data (as certbot's acme.errors does for ACME).

- `code`: what kind of failure, for callers (invalid, not_found, forbidden, ...).
- `field`: the input or setting at fault, if one is (the web shows the message
  on that form field; the CLI names it).
- `message`: one or more sentences that say what is wrong and what to do. Never
  a secret, never a traceback.

The agent sends the three as JSON (portal/agent/server.py); the client raises
them again as AgentError (portal/agent/client.py). Nothing parses a message to
find its field.
"""

from __future__ import annotations

from typing import Any


class MailsteadError(Exception):
    """Base of every error with a message meant for the owner."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        message = str(message)
        # A message written as "<field>: ..." says its field twice once the field is data.
        if field and message.startswith(f"{field}: "):
            message = message[len(field) + 2:]
        super().__init__(message)
        self.message = message
        self.field = field or None
        self.code = code or type(self).code

    def __str__(self) -> str:
        """For logs and the CLI: the field first, when there is one."""
        return f"{self.field}: {self.message}" if self.field else self.message

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "field": self.field, "message": self.message}


class UnsafePathError(MailsteadError):
    """A path the agent was about to use is a symlink, not a directory, or owned by
    someone it must not trust (portal/core/safefs.py)."""

    code = "unsafe_path"
