"""portal/stack/dovecot_keys.py: the mail_crypt key password, as the agent
derives it for doveadm and dovecot's passdb (mailstead-keys.lua) at login.

That both give the same value for real is shown by the mail core integration
tests (keys made here, mail read over IMAP with dovecot's value); the values
pinned below were printed by dovecot 2.4.1 itself (`doveadm auth login` with
the Lua passdb, trixie's lua-luaossl)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from portal.stack import dovecot_keys
from portal.stack.accounts import ARGON2_MEMORY_COST_KIB, KEY_KDF_SCRYPT, KEY_KDF_SHA256, KEY_KDF_VERSIONS, KeyKdf
from portal.stack.dovecot_keys import key_password

LUA = Path(__file__).resolve().parents[2] / "recipes/dovecot/templates/mailstead-keys.lua"
SALT = "00112233445566778899aabbccddeeff"


def test_version_2_is_the_value_dovecot_derives() -> None:
    assert (key_password("new password 123", KeyKdf(KEY_KDF_SCRYPT, SALT))
            == "0ae65ba60f587cadc8e68daff190932e907753b5db447389e9df151d4dfceb7e")


def test_version_1_is_the_old_unsalted_sha256() -> None:
    assert (key_password("old password 123", KeyKdf(KEY_KDF_SHA256))
            == "9e44608d8d209d347211ce217cc11f5c5e2c6efe4bfec94f9c4ceb7a57fb34e1"
            == hashlib.sha256(b"old password 123").hexdigest())


def test_version_2_is_scrypt_of_the_utf8_password_with_the_salt_as_text() -> None:
    password = "pässwörd ünïcode ✓"
    expected = hashlib.scrypt(password.encode(), salt=SALT.encode(), n=2**16, r=8, p=1,
                              maxmem=2**27, dklen=32).hex()
    assert key_password(password, KeyKdf(KEY_KDF_SCRYPT, SALT)) == expected


def test_the_salt_and_the_password_both_matter() -> None:
    base = key_password("correct horse battery", KeyKdf(KEY_KDF_SCRYPT, SALT))
    assert key_password("correct horse battery", KeyKdf(KEY_KDF_SCRYPT, "f" + SALT[1:])) != base
    assert key_password("correct horse batterz", KeyKdf(KEY_KDF_SCRYPT, SALT)) != base
    assert key_password("correct horse battery", KeyKdf(KEY_KDF_SHA256)) != base
    assert re.fullmatch(r"[0-9a-f]{64}", base)


def test_version_2_needs_at_least_the_memory_of_the_login_hash() -> None:
    """The cost per guess: scrypt's memory (128 r N bytes) is no less than
    argon2id's (bench/keykdf.py measures the time of both)."""
    assert 128 * dovecot_keys.SCRYPT_R * dovecot_keys.SCRYPT_N >= ARGON2_MEMORY_COST_KIB * 1024
    assert dovecot_keys.SCRYPT_MAXMEM > 128 * dovecot_keys.SCRYPT_R * dovecot_keys.SCRYPT_N


def test_every_stored_version_has_a_derivation_here_and_in_the_passdb() -> None:
    lua = LUA.read_text()
    for version in KEY_KDF_VERSIONS:
        key_password("x" * 12, KeyKdf(version, SALT if version != KEY_KDF_SHA256 else ""))
        assert f'version == "{version}"' in lua


def test_the_passdb_uses_the_same_scrypt_parameters() -> None:
    lua = LUA.read_text()

    def lua_number(name: str) -> int:
        found = re.findall(rf"^local {name} = (\d+)$", lua, re.MULTILINE)
        assert len(found) == 1, f"{name} in {LUA.name}"
        return int(found[0])

    assert lua_number("SCRYPT_N") == dovecot_keys.SCRYPT_N
    assert lua_number("SCRYPT_R") == dovecot_keys.SCRYPT_R
    assert lua_number("SCRYPT_P") == dovecot_keys.SCRYPT_P
    assert lua_number("SCRYPT_BYTES") == dovecot_keys.SCRYPT_BYTES


def test_an_unknown_version_is_refused() -> None:
    kdf = KeyKdf(KEY_KDF_SCRYPT, SALT)
    object.__setattr__(kdf, "version", 9)  # KeyKdf itself refuses it: this is the last guard
    with pytest.raises(ValueError, match="version 9"):
        key_password("x" * 12, kdf)
