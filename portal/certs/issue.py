"""One certificate order, from CSR to fullchain (acme.client.ClientV2).

The certificate key is ECDSA P-256: every client the TLS settings admit
(TLS 1.2+ with ECDHE-ECDSA suites) takes it, it is small and fast, it is
what the bootstrap certificate already uses, and a TLSA 3 1 1 hash works the
same for it. With reuse_key the current key is kept (a published TLSA
record stays valid).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portal.certs import CertError
from portal.certs.account import ensure_account, ensure_account_key, make_client, reason, unreachable
from portal.certs.challenges import ChallengeHandler, Pending, Progress, no_progress
from portal.certs.settings import AcmeSettings

ORDER_TIMEOUT = 180  # seconds from the first answer to the certificate


@dataclass(frozen=True)
class CertFiles:
    fullchain_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]


def new_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_csr(key_pem: bytes, names: tuple[str, ...] | list[str]) -> bytes:
    """A CSR (PEM) for `names`: the first is the CN, all are subjectAltNames."""
    if not names:
        raise CertError("a certificate needs at least one name")
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        from cryptography.hazmat.primitives.asymmetric import rsa
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CertError("the certificate key must be ECDSA or RSA")
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def ca_name(acme: AcmeSettings) -> str:
    host = acme.directory.split("/")[2].split(":")[0] if "://" in acme.directory else acme.directory
    return "Let's Encrypt" if host.endswith("letsencrypt.org") else f"the CA ({host})"


def ca_refusal(err: messages.Error, acme: AcmeSettings, step: str) -> CertError:
    code = (err.code or "").lower()
    fix = {
        "caa": (f"the domain's CAA records do not allow this CA; add a CAA record "
                f"'0 issue \"{acme.caa_issuer or 'letsencrypt.org'}\"' or remove the CAA records"),
        "ratelimited": "the CA's rate limit was hit; wait (see the message) and try again",
        "rejectedidentifier": "the CA does not issue for one of the names; check the domain and mail host",
        "accountdoesnotexist": "the ACME account is gone; remove account.json from the secrets and try again",
        "unauthorized": "the CA does not accept this account for these names; check the account and names",
        "badcsr": "the certificate request was refused; check the names",
    }.get(code, "check the settings and try again later")
    return CertError(f"{ca_name(acme)} refused the {step}: {reason(err)} — {fix}")


def validation_failure(err: acme_errors.ValidationError, acme: AcmeSettings,
                       handler: ChallengeHandler) -> CertError:
    parts = []
    for authzr in err.failed_authzrs:
        name = authzr.body.identifier.value
        for challb in authzr.body.challenges:
            if challb.error is not None:
                parts.append(f"{ca_name(acme)} could not validate {name} ({challb.chall.typ}): "
                             f"{reason(challb.error)} — {handler.fix(name)}")
    return CertError("; ".join(parts) or f"{ca_name(acme)} could not validate the names; try again")


def answer_order(client: acme_client.ClientV2, orderr: messages.OrderResource, handler: ChallengeHandler,
                 progress: Progress) -> list[Pending]:
    """The pending challenges of `orderr` of the handler's kind, with their validations."""
    pending: list[Pending] = []
    for authzr in orderr.authorizations:
        name = authzr.body.identifier.value
        if authzr.body.status == messages.STATUS_VALID:
            progress(f"challenge {name}", "already valid")
            continue
        for challb in authzr.body.challenges:
            if isinstance(challb.chall, handler.kind):
                response, validation = challb.chall.response_and_validation(client.net.key)
                pending.append(Pending(name, challb.chall, validation))
                break
        else:
            offered = ", ".join(c.chall.typ for c in authzr.body.challenges)
            raise CertError(f"the CA offers no {handler.kind.typ} challenge for {name} (it offers {offered}); "
                            "choose another challenge type (acme_challenge)", "acme_challenge")
    return pending


def issue(acme: AcmeSettings, handler: ChallengeHandler, state_dir: Path, *, key_pem: bytes | None = None,
          progress: Progress = no_progress, timeout: float = ORDER_TIMEOUT) -> CertFiles:
    """Order a certificate for acme.names, proving control with `handler`.

    `key_pem` is the key to certify (the current one, for reuse_key); None
    makes a new ECDSA P-256 key. Nothing is installed here (see store.install).
    """
    key_pem = key_pem or new_key_pem()
    csr_pem = make_csr(key_pem, acme.names)
    progress("account", acme.directory)
    client = make_client(acme, ensure_account_key(state_dir))
    ensure_account(client, acme, state_dir)
    step = "order"
    try:
        progress("order", ", ".join(acme.names))
        orderr = client.new_order(csr_pem)
        step = "challenge"
        pending = answer_order(client, orderr, handler, progress)
        try:
            handler.publish(pending, progress)
            by_chall = {id(p.chall): p for p in pending}
            for authzr in orderr.authorizations:
                for challb in authzr.body.challenges:
                    if id(challb.chall) in by_chall:
                        client.answer_challenge(challb, challb.chall.response(client.net.key))
            deadline = dt.datetime.now() + dt.timedelta(seconds=timeout)
            progress("validation", f"{len(pending)} challenge(s) answered")
            orderr = client.poll_authorizations(orderr, deadline)
        finally:
            handler.cleanup(progress)
        step = "certificate"
        progress("finalize", "sending the CSR")
        orderr = client.finalize_order(orderr, deadline)
    except acme_errors.ValidationError as err:
        raise validation_failure(err, acme, handler) from None
    except acme_errors.IssuanceError as err:
        raise ca_refusal(err.error, acme, step) from None
    except messages.Error as err:
        raise ca_refusal(err, acme, step) from None
    except acme_errors.TimeoutError:
        raise CertError(f"{ca_name(acme)} did not finish the {step} within {timeout:g} s; try again later") from None
    except (requests.exceptions.RequestException, ValueError) as exc:
        raise unreachable(acme.directory, exc) from None
    except acme_errors.Error as err:
        raise CertError(f"the {step} failed: {reason(err)}; try again later") from None
    fullchain = orderr.fullchain_pem.encode("ascii")
    progress("done", f"certificate for {', '.join(acme.names)}")
    return CertFiles(fullchain, key_pem, acme.names)


