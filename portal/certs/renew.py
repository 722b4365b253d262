"""When to renew, and renewing with backoff.

`renew_due` asks the CA's ACME Renewal Information (RFC 9773) when it offers
it, else renews when a third of the lifetime is left. `obtain` issues and
installs one certificate; `renew` does so when due (or forced) and records
every attempt in <state>/certs-state.json for the health checks: failures
back off 1 h, 2 h, 4 h ... up to 24 h.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from portal.certs import CertError
from portal.certs.account import ensure_account_key, make_client, write_private
from portal.certs.challenges import ChallengeHandler, Progress, no_progress
from portal.certs.issue import issue
from portal.certs.settings import AcmeSettings
from portal.certs.store import install, read_live, tls_dir
from portal.core import safefs
from portal.core.errors import UnsafePathError
from portal.core.layout import StateLayout

STATE_FILE = "certs-state.json"
BACKOFF_FIRST = dt.timedelta(hours=1)
BACKOFF_MAX = dt.timedelta(hours=24)


@dataclass(frozen=True)
class Decision:
    due: bool
    when: dt.datetime
    why: str
    source: str  # "ari", "lifetime" or "none"

    def __iter__(self) -> Iterator[Any]:  # unpacks as (due, when, why)
        return iter((self.due, self.when, self.why))


def _utc(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.timezone.utc)


def ari_cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 certificate identifier: base64url(AKI keyIdentifier) '.' base64url(serial DER octets)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    if not aki:
        raise ValueError("the certificate has no authority key identifier")
    serial = cert.serial_number
    octets = serial.to_bytes((serial.bit_length() + 8) // 8, "big")

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(aki)}.{b64(octets)}"


def _parse_time(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def pick_in_window(start: dt.datetime, end: dt.datetime, cert: x509.Certificate) -> dt.datetime:
    """A time in [start, end], random but the same on every call for one certificate."""
    if end <= start:
        return start
    fraction = random.Random(cert.serial_number).random()
    return start + (end - start) * fraction


def ari_window(client: Any, cert: x509.Certificate, cert_pem: bytes) -> tuple[dt.datetime, str] | None:
    """The renewal time the CA suggests, or None if it offers no ARI."""
    if hasattr(client, "renewal_time"):  # acme >= 4.1
        when, _check_again = client.renewal_time(cert_pem)
        return (when, "the CA's renewal information (ARI)") if when else None
    base = getattr(client, "directory", None)
    try:
        url = base["renewalInfo"] if base is not None else None
    except KeyError:
        url = None
    if not url:
        return None
    response = client.net.get(f"{url.rstrip('/')}/{ari_cert_id(cert)}", content_type="application/json")
    window = response.json()["suggestedWindow"]
    start, end = _parse_time(window["start"]), _parse_time(window["end"])
    when = pick_in_window(start, end, cert)
    return when, f"the CA's renewal information (ARI window {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC)"


def renew_due(cert_pem: bytes, client: Any = None, now: dt.datetime | None = None) -> Decision:
    """Whether the certificate should be renewed now, when, and why.

    With a client whose CA offers ARI, its suggested window decides; otherwise
    (or if ARI fails) renewal is due once a third of the lifetime is left."""
    now = _utc(now)
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    ari_note = ""
    if client is not None:
        try:
            found = ari_window(client, cert, cert_pem)
        except Exception as exc:  # any ARI failure falls back to the lifetime rule
            found, ari_note = None, f" (ARI failed: {' '.join(str(exc).split())[:120]})"
        if found:
            when, source = found
            due = now >= when
            return Decision(due, when, f"{'due' if due else 'not due'}: {source} says renew at "
                                       f"{when:%Y-%m-%d %H:%M} UTC", "ari")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    when = cert.not_valid_after_utc - lifetime / 3
    due = now >= when
    return Decision(due, when, f"{'due' if due else 'not due'}: a third of the lifetime is left from "
                               f"{when:%Y-%m-%d %H:%M} UTC{ari_note}", "lifetime")


# -- state file -------------------------------------------------------------------------

def read_state(state_dir: Path) -> dict[str, Any]:
    """certs-state.json; a symlink or another user's file is refused, not followed."""
    try:
        data = safefs.read_json(StateLayout(Path(state_dir)).certs_state, {}, owner_uid=os.geteuid())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UnsafePathError):
        return {}


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    write_private(StateLayout(Path(state_dir)).certs_state,
                  (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), 0o644)


def backoff(failures: int) -> dt.timedelta:
    return min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)


def record(state_dir: Path, now: dt.datetime, error: str | None) -> dict[str, Any]:
    state = read_state(state_dir)
    state["last_attempt"] = now.isoformat(timespec="seconds")
    if error is None:
        state.update(last_success=state["last_attempt"], last_error=None, next_attempt=None, failures=0)
    else:
        failures = int(state.get("failures") or 0) + 1
        state.update(last_error=error, failures=failures,
                     next_attempt=(now + backoff(failures)).isoformat(timespec="seconds"))
    write_state(state_dir, state)
    return state


# -- issuing and installing ----------------------------------------------------------------

def tlsa_311(cert_pem: bytes) -> str:
    """The TLSA 3 1 1 rdata (DANE-EE, SPKI, SHA-256) of the certificate."""
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


Tlsa = Callable[[bytes, bytes], str]  # (old fullchain, new fullchain) -> what was done


def obtain(state_dir: Path, acme: AcmeSettings, handler: ChallengeHandler, *,
           progress: Progress = no_progress, reload: Callable[[], dict[str, str]] | None = None,
           tlsa: Tlsa | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Issue a certificate and install it (then reload); the attempt is recorded.
    On any failure the current certificate stays in place and CertError is raised."""
    tls = tls_dir(state_dir)
    current = read_live(tls)
    try:
        key_pem = current[1] if (acme.reuse_key and current) else None
        files = issue(acme, handler, state_dir, key_pem=key_pem, progress=progress)
        tlsa_done = ""
        if tlsa is not None and current and current[1] != files.key_pem:
            tlsa_done = tlsa(current[0], files.fullchain_pem)
        progress("install", str(tls / "live"))
        installed = install(tls, files.fullchain_pem, files.key_pem, acme.names)
    except CertError as err:
        record(state_dir, _utc(now), err.message)
        raise
    except Exception as exc:  # recorded too, so the health checks see it; then raised as it is
        record(state_dir, _utc(now), f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        raise
    record(state_dir, _utc(now), None)
    reloads = reload() if reload else {}
    return {"installed": str(installed.path), "serial": installed.serial, "names": list(installed.names),
            "not_after": installed.not_after.isoformat(timespec="seconds"), "reloads": reloads,
            "key_reused": bool(current and current[1] == files.key_pem), "tlsa": tlsa_done}


def renew(state_dir: Path, acme: AcmeSettings, handler: ChallengeHandler, *, force: bool = False,
          progress: Progress = no_progress, reload: Callable[[], dict[str, str]] | None = None,
          tlsa: Tlsa | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Renew if due (ARI / a third left) or forced, unless backing off after failures.
    Safe to run twice: a certificate that is not due is left alone."""
    now = _utc(now)
    state = read_state(state_dir)
    if not force and state.get("next_attempt") and _parse_time(state["next_attempt"]) > now:
        return {"renewed": False, "why": f"backing off after {state.get('failures')} failure(s) until "
                                         f"{state['next_attempt']}: {state.get('last_error')}"}
    current = read_live(tls_dir(state_dir))
    if current is None:
        decision = Decision(True, now, "due: no certificate from the CA is installed yet", "none")
    else:
        try:
            client = make_client(acme, ensure_account_key(state_dir))
        except CertError as err:
            client = None
            progress("renewal info", f"not asked: {err.message}")
        decision = renew_due(current[0], client, now)
        # Names added since (e.g. the apex): renew now.
        installed = set(x509.load_pem_x509_certificates(current[0])[0].extensions
                        .get_extension_for_class(x509.SubjectAlternativeName).value
                        .get_values_for_type(x509.DNSName))
        missing = [n for n in acme.names if n not in installed]
        if missing:
            decision = Decision(True, now, f"due: the certificate lacks {', '.join(missing)}", "names")
    if not (decision.due or force):
        return {"renewed": False, "why": decision.why, "when": decision.when.isoformat(timespec="seconds"),
                "source": decision.source}
    result = obtain(state_dir, acme, handler, progress=progress, reload=reload, tlsa=tlsa, now=now)
    return {"renewed": True, "why": "forced" if force and not decision.due else decision.why,
            "source": decision.source, **result}
