"""TLS certificates from an ACME CA (Let's Encrypt, or any RFC 8555 CA).

settings: what the owner chose (AcmeSettings); account: the ACME account;
challenges: HTTP-01 token files and DNS-01 TXT records; issue: one order from
CSR to certificate; store: verified, atomic install into <state>/tls/live;
renew: when to renew (ARI, else a third of the lifetime left) with backoff;
agentops: the agent's operations.
"""

from __future__ import annotations


from portal.core.errors import MailsteadError  # noqa: E402


class CertError(MailsteadError):
    """A certificate step failed: str() is a full sentence with the fix.
    `field` names the setting at fault, if one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, code="invalid" if field else "cert_failed")
