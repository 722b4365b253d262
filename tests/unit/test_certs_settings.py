"""ACME settings: parsing, defaults and the messages for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from portal.certs import CertError
from portal.certs.issue import make_csr, new_key_pem
from portal.certs.settings import LETSENCRYPT, LETSENCRYPT_STAGING, acme_names, parse_acme_settings
from tests.unit.test_certs_support import CA, pem

from cryptography import x509


def parse(state: Path, **values: str):
    return parse_acme_settings(values, "example.test", "mail.example.test", state)


def test_defaults(tmp_path: Path) -> None:
    acme = parse(tmp_path)
    assert acme.directory == LETSENCRYPT
    assert acme.challenge == "http-01"
    assert acme.names == ("mail.example.test", "mta-sts.example.test", "autoconfig.example.test")
    assert acme.contact is None and acme.ca_bundle is None and acme.verify is True
    assert not acme.reuse_key and not acme.include_apex


def test_words_apex_reuse_and_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "acme-ca-bundle.pem"  # where the agent keeps a pasted bundle
    bundle.write_bytes(pem(CA().cert))
    acme = parse(tmp_path, acme_directory="letsencrypt-staging", acme_include_apex="1", acme_reuse_key="1",
                 acme_ca_bundle=str(bundle), acme_contact="mailto:Postmaster@example.test")
    assert acme.directory == LETSENCRYPT_STAGING
    assert acme.names[-1] == "example.test" and len(acme.names) == 4
    assert acme.reuse_key and acme.verify == str(bundle)
    assert acme.contact == "Postmaster@example.test"


def test_names_are_unique_and_lowercase() -> None:
    assert acme_names("Example.TEST", "MAIL.example.test.", True) == (
        "mail.example.test", "mta-sts.example.test", "autoconfig.example.test", "example.test")


@pytest.mark.parametrize("values, field, words", [
    ({"acme_directory": "http://ca.example.test/dir"}, "acme_directory", "not an https URL"),
    ({"acme_directory": "letsencrypted"}, "acme_directory", "not an https URL"),
    # The agent reads no path it is given: a bundle is pasted text it stored itself.
    ({"acme_ca_bundle": "/etc/shadow"}, "acme_ca_bundle", "can only be pasted as text"),
    ({"acme_ca_bundle": "relative.pem"}, "acme_ca_bundle", "can only be pasted as text"),
    ({"acme_contact": "not-an-address"}, "acme_contact", "not an email address"),
    ({"acme_contact": "a@b"}, "acme_contact", "not an email address"),
    ({"acme_challenge": "tls-alpn-01"}, "acme_challenge", "http-01 or dns-01"),
    ({"acme_challenge": "dns-01"}, "acme_challenge", "RFC 2136"),
    ({"acme_reuse_key": "maybe"}, "acme_reuse_key", "0 or 1"),
    ({"acme_caa_issuer": "not a domain"}, "acme_caa_issuer", "domain name"),
])
def test_bad_input_names_the_field(tmp_path: Path, values: dict, field: str, words: str) -> None:
    with pytest.raises(CertError) as err:
        parse(tmp_path, **values)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":") and words in str(err.value)


def test_bundle_that_is_not_pem(tmp_path: Path) -> None:
    bundle = tmp_path / "acme-ca-bundle.pem"
    bundle.write_text("hello\n")
    with pytest.raises(CertError, match="holds no PEM certificate") as err:
        parse(tmp_path, acme_ca_bundle=str(bundle))
    assert err.value.field == "acme_ca_bundle"


def test_dns01_with_rfc2136_configured(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "rfc2136.key").write_text("c2VjcmV0\n")
    acme = parse(tmp_path, acme_challenge="dns-01", rfc2136_server="127.0.0.1", rfc2136_key_name="k")
    assert acme.challenge == "dns-01"


def test_csr_names_and_key() -> None:
    key_pem = new_key_pem()
    csr = x509.load_pem_x509_csr(make_csr(key_pem, ("mail.example.test", "example.test")))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test", "example.test"]
    assert csr.subject.rfc4514_string() == "CN=mail.example.test"
    assert csr.is_signature_valid
    with pytest.raises(CertError):
        make_csr(key_pem, ())
