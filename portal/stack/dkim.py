"""The appliance's DKIM keys and the DNS records that publish them.

Two selectors (settings.dkim_selectors): an RSA-2048 key and an Ed25519 key,
so every signed message carries both signatures (RFC 8463 dual signing).
The keys live in `<secrets>/dkim/<selector>.key` (PEM, PKCS#8, 0600 in a
0700 folder); rspamd reads them from that folder, mounted read-only.

`ensure_keys` is the only side effect: it makes a missing key and never
replaces an existing one (a new key needs a new DNS record first, so
rotation is an explicit operation, never a silent one). Everything else is
a pure function of the key files.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from portal.core import safefs
from portal.core.errors import UnsafePathError

RSA_BITS = 2048

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


from portal.core.errors import MailsteadError  # noqa: E402


class DkimError(MailsteadError, RuntimeError):
    code = "dkim"

    """A DKIM key is missing, unreadable or of the wrong kind; says which and what to do."""


def key_path(dkim_dir: Path, selector: str) -> Path:
    if not selector or "/" in selector or selector.startswith("."):
        raise DkimError(f"'{selector[:64]}' is not a DKIM selector name")
    return dkim_dir / f"{selector}.key"


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_keys(dkim_dir: Path, selectors: tuple[str, str]) -> None:
    """Make the RSA-2048 key (selectors[0]) and the Ed25519 key (selectors[1])
    in `dkim_dir` if they are missing. Existing keys are kept as they are, but
    checked: a key of the wrong type is an error, not something to replace.

    `dkim_dir` (and the secrets folder, when missing) is made 0700, and refused if
    it is another user's or a symlink; a key appears whole (a random temporary name,
    then linked: the first one made wins), and its mode is set on its descriptor."""
    rsa_selector, ed_selector = selectors
    if safefs.lstat(dkim_dir.parent) is None:  # the secrets folder: never made readable by others
        safefs.ensure_dir(dkim_dir.parent, 0o700)
    safefs.ensure_dir(dkim_dir, 0o700)
    wanted = {
        rsa_selector: lambda: rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS),
        ed_selector: ed25519.Ed25519PrivateKey.generate,
    }
    for selector, generate in wanted.items():
        path = key_path(dkim_dir, selector)
        if safefs.lstat(path) is None:
            safefs.write_new(path, _pem(generate()), 0o600)
        try:
            with safefs.open_file(path, owner_uid=os.geteuid()) as f:
                os.fchmod(f.fileno(), 0o600)
        except UnsafePathError as err:
            raise DkimError(err.message) from None
    for selector, kind in ((rsa_selector, rsa.RSAPrivateKey), (ed_selector, ed25519.Ed25519PrivateKey)):
        key = load_key(key_path(dkim_dir, selector))
        if not isinstance(key, kind):
            raise DkimError(f"{key_path(dkim_dir, selector)} is not an {kind.__name__.removesuffix('PrivateKey')} "
                            "key; move it away and run this again to make a new one (and publish its DNS record)")


def load_key(path: Path) -> PrivateKey:
    try:
        data = safefs.read_bytes(path, 64 * 1024)
    except OSError as err:
        raise DkimError(f"cannot read DKIM key {path}: {err.strerror}") from None
    except UnsafePathError as err:
        raise DkimError(err.message) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise DkimError(f"{path} is not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_BITS:
            raise DkimError(f"{path} is an RSA key of {key.key_size} bits; DKIM needs at least {RSA_BITS}")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimError(f"{path} is neither an RSA nor an Ed25519 key")


def dns_txt(key: Path | PrivateKey) -> str:
    """The DKIM TXT record value publishing the public half of `key` (a private
    key or the path of its file): `v=DKIM1; k=rsa; p=<base64 DER SubjectPublicKeyInfo>`
    or `v=DKIM1; k=ed25519; p=<base64 of the raw 32-byte public key>` (RFC 8463)."""
    private = load_key(key) if isinstance(key, Path) else key
    if isinstance(private, rsa.RSAPrivateKey):
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    raise DkimError("DKIM keys are RSA or Ed25519")


def txt_strings(value: str, size: int = 255) -> list[str]:
    """`value` cut into the <=255-byte character-strings one TXT record is made of
    (an RSA-2048 record is about 410 bytes); resolvers join them back."""
    data = value.encode("ascii")
    return [data[i:i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def selector_records(dkim_dir: Path, selectors: tuple[str, ...], domain: str) -> list[tuple[str, str]]:
    """[(`<selector>._domainkey.<domain>`, TXT value)] for each selector, in order."""
    domain = domain.rstrip(".").lower()
    return [(f"{selector}._domainkey.{domain}", dns_txt(key_path(dkim_dir, selector)))
            for selector in selectors]
