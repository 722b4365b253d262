"""The ACME account: an ECDSA P-256 key made once, and its registration at the CA.

Files (in <state>/secrets/acme/, 0700): account-key.pem (0600) and
account.json {"uri": ..., "directory": ...}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import josepy as jose
import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from portal import __version__
from portal.certs import CertError
from portal.certs.settings import AcmeSettings
from portal.core import safefs
from portal.core.layout import StateLayout
from portal.core.errors import UnsafePathError

TIMEOUT = 30  # seconds, for every request to the CA


def account_dir(state_dir: Path) -> Path:
    return StateLayout(Path(state_dir)).acme_account


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically write `path` with `mode` through the safe-write helper (a new file
    with a random name, its mode set before it holds anything others could read)."""
    safefs.write_bytes(path, data, mode)


def ensure_account_key(state_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The account key, made on first use and never replaced."""
    directory = account_dir(state_dir)
    safefs.ensure_dir(directory.parent, 0o700)
    safefs.ensure_dir(directory, 0o700)
    path = directory / "account-key.pem"
    if safefs.lstat(path) is None:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        safefs.write_new(path, pem, 0o600)  # never replaces a key another run made meanwhile
    try:
        with safefs.open_file(path, owner_uid=os.geteuid()) as f:
            os.fchmod(f.fileno(), 0o600)
            data = f.read(64 * 1024)
    except UnsafePathError as err:
        raise CertError(err.message) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertError(f"{path} is not a PEM private key; move it away to make a new ACME account") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CertError(f"{path} is not an ECDSA P-256 key; move it away to make a new ACME account")
    return key


def reason(exc: BaseException) -> str:
    """A short, one-line reason for a network failure (no URLs' query strings, no secrets)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (the CA's certificate is not trusted, or the TLS handshake failed)"
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.ReadTimeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        for needle, said in (("Connection refused", "connection refused"),
                             ("Name or service not known", "the name does not resolve"),
                             ("Temporary failure in name resolution", "the name does not resolve"),
                             ("No route to host", "no route to host"),
                             ("Network is unreachable", "network unreachable")):
            if needle in text:
                return said
        return "cannot connect"
    if isinstance(exc, messages.Error):
        return exc.detail or exc.description or str(exc.code)
    text = " ".join(str(exc).split())
    if isinstance(exc, ValueError) and text.startswith("Requesting ") and ":" in text:
        return text.split(":", 1)[1].strip().lower() or "cannot connect"  # acme's rewording of a connect error
    return text[:200] or type(exc).__name__


def unreachable(url: str, exc: BaseException) -> CertError:
    return CertError(f"cannot reach the ACME directory {url}: {reason(exc)}; check the URL and the CA bundle",
                     "acme_directory")


def make_client(acme: AcmeSettings, key: ec.EllipticCurvePrivateKey,
                timeout: int = TIMEOUT) -> acme_client.ClientV2:
    """A ClientV2 for the CA's directory (fetched now: a CA that is not there fails here)."""
    net = acme_client.ClientNetwork(jose.JWKEC(key=key), alg=jose.ES256, verify_ssl=acme.verify,
                                    user_agent=f"mailstead/{__version__} acme-python", timeout=timeout)
    try:
        directory = acme_client.ClientV2.get_directory(acme.directory, net)
        directory["newAccount"], directory["newOrder"], directory["newNonce"]
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError,
            acme_errors.Error, messages.Error, jose.DeserializationError) as exc:
        if isinstance(exc, KeyError | TypeError | jose.DeserializationError | acme_errors.ClientError) or (
                isinstance(exc, ValueError) and not str(exc).startswith("Requesting")):
            exc = ValueError("the answer is not an ACME directory")
        raise unreachable(acme.directory, exc) from None
    return acme_client.ClientV2(directory, net)


def ensure_account(client: acme_client.ClientV2, acme: AcmeSettings,
                   state_dir: Path) -> messages.RegistrationResource:
    """Register (terms of service agreed) or find the existing account for the key;
    sets it on the client and stores account.json."""
    new = messages.NewRegistration.from_data(email=acme.contact, terms_of_service_agreed=True)
    try:
        regr = client.new_account(new)
    except acme_errors.ConflictError as conflict:
        regr = messages.RegistrationResource(uri=conflict.location, body=messages.Registration())
        client.net.account = regr
    except messages.Error as err:
        raise CertError(f"the CA refused to register the account: {reason(err)}; "
                        + ("check the contact address (acme_contact)" if "contact" in (err.code or "") + str(err.detail)
                           else "check the settings and try again")) from None
    except (requests.exceptions.RequestException, ValueError) as exc:
        raise unreachable(acme.directory, exc) from None
    record = {"uri": regr.uri, "directory": acme.directory}
    path = account_dir(state_dir) / "account.json"
    data = (json.dumps(record, indent=2) + "\n").encode()
    try:
        same = safefs.read_bytes(path, 64 * 1024, owner_uid=os.geteuid()) == data
    except (OSError, UnsafePathError):
        same = False  # missing, or not the agent's own file: replaced, never followed
    if not same:
        write_private(path, data)
    return regr
