"""portal.dns.names and TSIG key parsing: good names normalized, bad ones refused with the fix."""

from __future__ import annotations

import base64

import pytest

from portal.dns.names import Name, normalize_domain
from portal.dns.update import DnsError, TsigKey


@pytest.mark.parametrize(("value", "ascii", "unicode"), [
    ("example.org", "example.org", "example.org"),
    ("  MAIL.Example.ORG ", "mail.example.org", "mail.example.org"),
    ("example.org.", "example.org", "example.org"),                     # trailing dot accepted
    ("Bücher.example", "xn--bcher-kva.example", "bücher.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example", "bücher.example"),
    ("münchen。de", "xn--mnchen-3ya.de", "münchen.de"),                 # ideographic full stop
    ("a-b.c0.example", "a-b.c0.example", "a-b.c0.example"),
    ("a" * 63 + ".org", "a" * 63 + ".org", "a" * 63 + ".org"),
])
def test_good_names(value: str, ascii: str, unicode: str) -> None:
    assert normalize_domain(value, "domain") == Name(ascii, unicode)


@pytest.mark.parametrize(("value", "fragment"), [
    ("", "is required"),
    ("   ", "is required"),
    ("a_b.example.org", "contains '_'"),
    ("_dmarc.example.org", "use '-' instead"),
    ("192.0.2.1", "is an IP address"),
    ("2001:db8::1", "is an IP address"),
    ("[2001:db8::1]", "is an IP address"),
    ("localhost", "is this machine itself"),
    ("mail.localhost", "is this machine itself"),
    ("box.local", "local network only"),
    ("example", "single name without a dot"),
    ("a" * 64 + ".org", "at most 63"),
    (".".join(["a" * 63] * 4), "at most 253"),
    ("a..example.org", "empty part between dots"),
    (".example.org", "empty part between dots"),
    ("example.org..", "empty part between dots"),
    ("-a.example.org", "starts or ends with a hyphen"),
    ("a-.example.org", "starts or ends with a hyphen"),
    ("user@example.org", "email address"),
    ("https://example.org/", "web address"),
    ("example.org:25", "without a port"),
    ("exa mple.org", "contains a space"),
    ("exa!mple.org", "not allowed"),
    ("*.example.org", "wildcards"),
    ("xn--zz.example", "not a valid international domain name"),
    ("host.123", "looks like an IP address"),
])
def test_bad_names(value: str, fragment: str) -> None:
    with pytest.raises(DnsError) as err:
        normalize_domain(value, "mail_host")
    assert err.value.field == "mail_host"
    assert fragment in str(err.value)
    assert "mail_host" in str(err.value)


def test_underscore_allowed_for_service_names() -> None:
    assert normalize_domain("_DMARC.example.org", "name", allow_underscore=True).ascii == "_dmarc.example.org"
    with pytest.raises(DnsError, match="may only start with '_'"):
        normalize_domain("a_b.example.org", "name", allow_underscore=True)


SECRET = base64.b64encode(bytes(range(32))).decode()


def test_tsig_parse() -> None:
    key = TsigKey.parse(" Mailstead-Key. ", SECRET[:20] + "\n" + SECRET[20:], "HMAC-SHA512")
    assert key == TsigKey("mailstead-key", SECRET, "hmac-sha512")
    assert SECRET not in repr(key)
    assert key.keyring()


@pytest.mark.parametrize(("name", "secret", "algorithm", "field"), [
    ("k", SECRET, "hmac-md5", "rfc2136_algorithm"),
    ("k", SECRET, "", "rfc2136_algorithm"),
    ("", SECRET, "hmac-sha256", "rfc2136_key_name"),
    ("k", "not base64!", "hmac-sha256", "rfc2136_secret"),
    ("k", "", "hmac-sha256", "rfc2136_secret"),
    ("k", "abc", "hmac-sha256", "rfc2136_secret"),  # bad padding
])
def test_tsig_parse_refuses(name: str, secret: str, algorithm: str, field: str) -> None:
    with pytest.raises(DnsError) as err:
        TsigKey.parse(name, secret, algorithm)
    assert err.value.field == field and field in str(err.value)
    if secret:
        assert secret not in str(err.value)
