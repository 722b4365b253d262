"""portal/stack/dkim.py: the appliance's DKIM keys and their DNS records."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from portal.stack.dkim import (
    DkimError,
    dns_txt,
    ensure_keys,
    key_path,
    load_key,
    selector_records,
    txt_strings,
)

SELECTORS = ("mailstead-rsa", "mailstead-ed25519")
DOMAIN = "example.test"


def tags(txt: str) -> dict[str, str]:
    """Parse a DKIM key record (RFC 6376 3.6.1 tag=value list)."""
    out = {}
    for part in txt.split(";"):
        if part.strip():
            name, _, value = part.partition("=")
            assert name.strip() not in out, f"tag {name} twice in {txt}"
            out[name.strip()] = value.strip()
    return out


@pytest.fixture
def dkim_dir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets" / "dkim"
    ensure_keys(d, SELECTORS)
    return d


def test_keys_are_made_private(dkim_dir: Path) -> None:
    assert stat.S_IMODE(dkim_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in dkim_dir.iterdir()) == ["mailstead-ed25519.key", "mailstead-rsa.key"]
    for selector in SELECTORS:
        path = dkim_dir / f"{selector}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted


def test_key_types(dkim_dir: Path) -> None:
    rsa_key = serialization.load_pem_private_key((dkim_dir / "mailstead-rsa.key").read_bytes(), None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048
    assert rsa_key.private_numbers().public_numbers.e == 65537
    ed_key = serialization.load_pem_private_key((dkim_dir / "mailstead-ed25519.key").read_bytes(), None)
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)


def test_ensure_keys_never_rotates(dkim_dir: Path) -> None:
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in dkim_dir.iterdir()}
    records = selector_records(dkim_dir, SELECTORS, DOMAIN)
    ensure_keys(dkim_dir, SELECTORS)
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in dkim_dir.iterdir()} == before
    assert selector_records(dkim_dir, SELECTORS, DOMAIN) == records


def test_ensure_keys_repairs_modes_and_makes_only_missing(dkim_dir: Path) -> None:
    rsa_pem = (dkim_dir / "mailstead-rsa.key").read_bytes()
    (dkim_dir / "mailstead-ed25519.key").unlink()
    (dkim_dir / "mailstead-rsa.key").chmod(0o644)
    dkim_dir.chmod(0o755)
    ensure_keys(dkim_dir, SELECTORS)
    assert (dkim_dir / "mailstead-rsa.key").read_bytes() == rsa_pem
    assert isinstance(load_key(dkim_dir / "mailstead-ed25519.key"), ed25519.Ed25519PrivateKey)
    assert stat.S_IMODE((dkim_dir / "mailstead-rsa.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(dkim_dir.stat().st_mode) == 0o700
    assert not [p for p in dkim_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_two_appliances_get_different_keys(tmp_path: Path) -> None:
    ensure_keys(tmp_path / "a", SELECTORS)
    ensure_keys(tmp_path / "b", SELECTORS)
    assert selector_records(tmp_path / "a", SELECTORS, DOMAIN) != selector_records(tmp_path / "b", SELECTORS, DOMAIN)


def test_wrong_key_type_is_refused_not_replaced(tmp_path: Path) -> None:
    d = tmp_path / "dkim"
    d.mkdir(mode=0o700)
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (d / "mailstead-rsa.key").write_bytes(pem)
    with pytest.raises(DkimError, match="mailstead-rsa.key is not an RSA key"):
        ensure_keys(d, SELECTORS)
    assert (d / "mailstead-rsa.key").read_bytes() == pem


@pytest.mark.parametrize("content, message", [
    (b"", "not an unencrypted PEM private key"),
    (b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n", "not an unencrypted PEM private key"),
    (rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
     "RSA key of 1024 bits"),
    (ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
     "neither an RSA nor an Ed25519 key"),
], ids=["empty", "garbage", "rsa-1024", "ec-p256"])
def test_load_key_rejects(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(DkimError, match=message):
        load_key(path)


def test_missing_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(DkimError, match="cannot read DKIM key .*mailstead-rsa.key"):
        selector_records(tmp_path, SELECTORS, DOMAIN)


@pytest.mark.parametrize("selector", ["", "../etc", "a/b", ".hidden"])
def test_bad_selector_names(tmp_path: Path, selector: str) -> None:
    with pytest.raises(DkimError, match="not a DKIM selector"):
        key_path(tmp_path, selector)


def test_rsa_txt_record(dkim_dir: Path) -> None:
    txt = dns_txt(dkim_dir / "mailstead-rsa.key")
    assert txt.startswith("v=DKIM1; k=rsa; p=")
    t = tags(txt)
    assert t.keys() == {"v", "k", "p"}
    public = serialization.load_der_public_key(base64.b64decode(t["p"], validate=True))
    assert isinstance(public, rsa.RSAPublicKey)
    private = load_key(dkim_dir / "mailstead-rsa.key")
    assert public.public_numbers() == private.public_key().public_numbers()


def test_ed25519_txt_record(dkim_dir: Path) -> None:
    private = load_key(dkim_dir / "mailstead-ed25519.key")
    txt = dns_txt(private)  # a loaded key works as well as its path
    assert txt == dns_txt(dkim_dir / "mailstead-ed25519.key")
    t = tags(txt)
    assert (t["v"], t["k"]) == ("DKIM1", "ed25519")
    raw = base64.b64decode(t["p"], validate=True)
    assert len(raw) == 32  # RFC 8463: the bare public key, not a SubjectPublicKeyInfo
    public = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    public.verify(private.sign(b"message"), b"message")


def test_selector_records(dkim_dir: Path) -> None:
    records = selector_records(dkim_dir, SELECTORS, "Example.TEST.")
    assert [name for name, _ in records] == ["mailstead-rsa._domainkey.example.test",
                                             "mailstead-ed25519._domainkey.example.test"]
    assert [tags(txt)["k"] for _, txt in records] == ["rsa", "ed25519"]


def test_txt_strings(dkim_dir: Path) -> None:
    txt = dns_txt(dkim_dir / "mailstead-rsa.key")
    parts = txt_strings(txt)
    assert len(txt) > 255 and len(parts) == 2
    assert all(len(p) <= 255 for p in parts) and "".join(parts) == txt
    assert txt_strings("short") == ["short"]
