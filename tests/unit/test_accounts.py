"""portal/stack/accounts.py: the accounts database postfix and dovecot read."""

from __future__ import annotations

import shutil
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import argon2
import pytest

from portal.stack.accounts import (
    KEY_KDF_CURRENT,
    KEY_KDF_SCRYPT,
    KEY_KDF_SHA256,
    MAX_QUOTA_MB,
    MIN_PASSWORD_LENGTH,
    AccountError,
    Accounts,
    KeyKdf,
    MailboxKeys,
    NoKeys,
    check_address,
    check_domain,
    check_password,
    hash_password,
    verify_password,
)

PASSWORD = "correct horse battery"
NEW_PASSWORD = "staple grey cloud river"
DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
INFO = f"info@{DOMAIN}"  # an alias of alice


def dump(path: Path) -> list[str]:
    """Schema and every row, read as a read-only client (postfix, dovecot) would."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return list(conn.iterdump())


def stored_hash(path: Path, address: str) -> str:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT password FROM mailboxes WHERE address = ?", (address,)).fetchone()[0]


@contextmanager
def refused(db: Accounts, field: str) -> Iterator[pytest.ExceptionInfo[AccountError]]:
    """Expect AccountError naming `field`, with the database left as it was."""
    before = dump(db.path)
    with pytest.raises(AccountError) as info:
        yield info
    assert info.value.field == field, info.value
    assert dump(db.path) == before


class KeysFailed(RuntimeError):
    pass


class BrokenKeys(NoKeys):
    """Failure injection: method `fail` raises, after noting the call and the
    mailboxes a separate reader of the file (as dovecot) saw at that moment."""

    def __init__(self, fail: str, path: Path) -> None:
        self.fail, self.path = fail, path
        self.call: tuple[Any, ...] | None = None
        self.kdfs: tuple[KeyKdf, ...] = ()
        self.seen: list[str] = []

    def _step(self, method: str, *args: str, kdfs: tuple[KeyKdf, ...] = ()) -> None:
        if method == self.fail:
            self.call, self.kdfs = (method, *args), kdfs
            with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as conn:
                self.seen = [row[0] for row in conn.execute("SELECT address FROM mailboxes")]
            raise KeysFailed(f"{method} failed")

    def generate(self, address: str, password: str, kdf: KeyKdf) -> None:
        self._step("generate", address, password, kdfs=(kdf,))

    def change_password(self, address: str, old: str, new: str, old_kdf: KeyKdf, new_kdf: KeyKdf) -> None:
        self._step("change_password", address, old, new, kdfs=(old_kdf, new_kdf))

    def reset(self, address: str, password: str, kdf: KeyKdf) -> None:
        self._step("reset", address, password, kdfs=(kdf,))

    def rename(self, old: str, new: str) -> None:
        self._step("rename", old, new)

    def remove(self, address: str) -> None:
        self._step("remove", address)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice and bob, and info → alice, built once per module (argon2 is slow on purpose)."""
    path = tmp_path_factory.mktemp("template") / "accounts.db"
    db = Accounts(path)
    db.create_mailbox(ALICE, PASSWORD, 0, NoKeys())
    db.create_mailbox(BOB, PASSWORD, 100, NoKeys())
    db.add_alias(INFO, ALICE)
    return path


@pytest.fixture
def db(template: Path, tmp_path: Path) -> Accounts:
    folder = tmp_path / "accounts"
    folder.mkdir(mode=0o750)
    shutil.copy2(template, folder / "accounts.db")
    return Accounts(folder / "accounts.db")


# -- the file ---------------------------------------------------------------------

def test_opening_creates_folder_and_file_with_private_modes(tmp_path: Path) -> None:
    db = Accounts(tmp_path / "state" / "accounts" / "accounts.db")
    assert db.domains() == []
    assert stat.S_IMODE(db.path.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o640


def test_journal_mode_is_delete_and_foreign_keys_are_on(db: Accounts) -> None:
    with db.connect() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO mailboxes (address, local, domain, password, quota_mb, created) "
                         "VALUES ('x@nowhere.test', 'x', 'nowhere.test', 'h', 0, 'now')")
    db.set_quota(ALICE, 5)
    assert sorted(p.name for p in db.path.parent.iterdir()) == ["accounts.db"]  # no -wal, no -journal


def test_schema_is_the_documented_one(db: Accounts) -> None:
    with db.connect() as conn:
        def columns(table: str) -> list[str]:
            return [row["name"] for row in conn.execute(f"PRAGMA table_info({table})")]

        assert columns("domains") == ["name"]
        assert columns("mailboxes") == ["address", "local", "domain", "password", "quota_mb", "created",
                                        "key_kdf", "key_salt"]
        assert columns("aliases") == ["source", "destination"]
        fk = conn.execute("PRAGMA foreign_key_list(mailboxes)").fetchone()
        assert (fk["from"], fk["table"], fk["to"]) == ("domain", "domains", "name")


# -- input checks -------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("example.org", "example.org"),
    ("Mail.Example.ORG", "mail.example.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a-b.c0.example", "a-b.c0.example"),
])
def test_check_domain_normalizes(name: str, expected: str) -> None:
    assert check_domain(name, "domain") == expected


@pytest.mark.parametrize("name", [
    "", "localhost", "example.org.", ".example.org", "a..example.org", "-a.example.org", "a-.example.org",
    "a_b.example.org", "ex ample.org", "example.org;reboot", "$(reboot).org", "exa\u00a0mple.org",
    "1.2.3.4", "xn--.org", "a" * 64 + ".org", ".".join(["a" * 63] * 4) + ".org", "a/b.org", "a@b.org",
])
def test_check_domain_refuses(name: str) -> None:
    with pytest.raises(AccountError) as info:
        check_domain(name, "hostname")
    assert info.value.field == "hostname"
    assert "hostname" in str(info.value)


@pytest.mark.parametrize("address, expected", [
    ("alice@example.org", "alice@example.org"),
    ("Alice.Smith@Example.ORG", "alice.smith@example.org"),
    ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
    ("a_b-c9@example.org", "a_b-c9@example.org"),
    ("anna@bücher.example", "anna@xn--bcher-kva.example"),
])
def test_check_address_normalizes(address: str, expected: str) -> None:
    assert check_address(address) == expected


BAD_ADDRESSES = [
    "", "alice", "alice@", "@example.test", "a@b@example.test", "alice@localhost", "alice@example.test.",
    ".alice@example.test", "alice.@example.test", "al..ice@example.test", "-alice@example.test",
    "a" * 65 + "@example.test", "anna@bü cher.example", "jürgen@example.test", "\u212aelvin@example.test",
    "a';DROP TABLE mailboxes;--@example.test", "$(reboot)@example.test", "`reboot`@example.test",
    'a"b@example.test', "a b@example.test", " alice@example.test", "a|b@example.test", "a&b@example.test",
    "a<b>@example.test", "a\\b@example.test", "a%b@example.test", "a*b@example.test", "a\0@example.test",
    "alice\n@example.test", "alice@example.test\n", "alice@example.test;reboot", "alice@$(reboot).test",
    "a/../b@example.test",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_check_address_refuses_naming_the_field(address: str) -> None:
    with pytest.raises(AccountError) as info:
        check_address(address, "destination")
    assert info.value.field == "destination"
    assert str(info.value).startswith("destination")


@pytest.mark.parametrize("password, hint", [
    ("", str(MIN_PASSWORD_LENGTH)),
    ("x" * (MIN_PASSWORD_LENGTH - 1), str(MIN_PASSWORD_LENGTH)),
    ("x" * 1025, "1024"),
    ("long enough\0password", "NUL"),
    ("long enough\npassword", "line"),
    ("long enough\rpassword", "line"),
])
def test_check_password_refuses(password: str, hint: str) -> None:
    with pytest.raises(AccountError) as info:
        check_password(password, "new_password")
    assert info.value.field == "new_password"
    assert "new_password" in str(info.value) and hint in str(info.value)
    if password:
        assert password not in str(info.value)


def test_check_password_accepts_the_minimum() -> None:
    check_password("x" * MIN_PASSWORD_LENGTH)


# -- password hashes -------------------------------------------------------------------

def test_hash_is_argon2id_in_dovecot_syntax() -> None:
    stored = hash_password(PASSWORD)
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
    assert PASSWORD not in stored
    assert argon2.PasswordHasher().verify(stored.removeprefix("{ARGON2ID}"), PASSWORD)
    assert verify_password(stored, PASSWORD)
    assert not verify_password(stored, PASSWORD + "!")
    assert hash_password(PASSWORD) != stored  # salted


@pytest.mark.parametrize("stored", ["", "{ARGON2ID}", "{ARGON2ID}$argon2id$garbage", "{PLAIN}" + PASSWORD,
                                    "$argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaA"])
def test_verify_refuses_other_stored_values(stored: str) -> None:
    assert not verify_password(stored, PASSWORD)


# -- reading ---------------------------------------------------------------------------

def test_reads_never_return_password_hashes(db: Accounts) -> None:
    mailboxes = db.list_mailboxes()
    assert [m["address"] for m in mailboxes] == [ALICE, BOB]
    assert all(set(m) == {"address", "quota_mb", "created"} for m in mailboxes)
    assert mailboxes[1]["quota_mb"] == 100
    alice = db.get_mailbox("Alice@Example.test")
    assert alice is not None and "password" not in alice and alice["domain"] == DOMAIN
    everything = repr([mailboxes, alice, db.list_aliases(), db.domains()])
    assert "argon2" not in everything and "ARGON2" not in everything


def test_get_mailbox_unknown_is_none(db: Accounts) -> None:
    assert db.get_mailbox(f"nobody@{DOMAIN}") is None


# -- domains and mailboxes ----------------------------------------------------------------

def test_add_domain_is_idempotent_and_normalized(db: Accounts) -> None:
    assert db.add_domain("Bücher.example") == "xn--bcher-kva.example"
    assert db.add_domain("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert db.domains() == [DOMAIN, "xn--bcher-kva.example"]


def test_add_domain_refuses_bad_names(db: Accounts) -> None:
    with refused(db, "domain"):
        db.add_domain("example.test';DROP TABLE domains;--")


def test_create_mailbox(db: Accounts) -> None:
    mailbox = db.create_mailbox("Carol@Bücher.Example", PASSWORD, 2048, NoKeys())
    assert mailbox["address"] == "carol@xn--bcher-kva.example"
    assert (mailbox["local"], mailbox["domain"], mailbox["quota_mb"]) == ("carol", "xn--bcher-kva.example", 2048)
    assert "xn--bcher-kva.example" in db.domains()
    stored = stored_hash(db.path, "carol@xn--bcher-kva.example")
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert argon2.PasswordHasher().verify(stored.removeprefix("{ARGON2ID}"), PASSWORD)


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_create_mailbox_refuses_bad_addresses(db: Accounts, address: str) -> None:
    with refused(db, "address"):
        db.create_mailbox(address, PASSWORD, 0, NoKeys())


@pytest.mark.parametrize("address, words", [
    (ALICE, "already exists"),
    ("ALICE@Example.Test", "already exists"),
    (INFO, "alias"),
])
def test_create_mailbox_refuses_existing_addresses(db: Accounts, address: str, words: str) -> None:
    with refused(db, "address") as info:
        db.create_mailbox(address, PASSWORD, 0, NoKeys())
    assert words in str(info.value)


@pytest.mark.parametrize("password", ["short", "x" * (MIN_PASSWORD_LENGTH - 1), "long enough\npassword"])
def test_create_mailbox_refuses_bad_passwords(db: Accounts, password: str) -> None:
    with refused(db, "password") as info:
        db.create_mailbox(f"carol@{DOMAIN}", password, 0, NoKeys())
    assert password not in str(info.value)


@pytest.mark.parametrize("quota", [-1, MAX_QUOTA_MB + 1, "10", 1.5, True, None])
def test_create_mailbox_refuses_bad_quotas(db: Accounts, quota: Any) -> None:
    with refused(db, "quota_mb"):
        db.create_mailbox(f"carol@{DOMAIN}", PASSWORD, quota, NoKeys())


@pytest.mark.parametrize("address", [f"carol@{DOMAIN}", "carol@new-domain.test"])
def test_create_mailbox_undone_when_keys_fail(db: Accounts, address: str) -> None:
    keys = BrokenKeys("generate", db.path)
    before = dump(db.path)
    with pytest.raises(KeysFailed):
        db.create_mailbox(address, PASSWORD, 0, keys)
    assert keys.call == ("generate", address, PASSWORD)
    assert address in keys.seen  # committed before the keys were made: dovecot must see it
    assert dump(db.path) == before


def test_create_mailbox_needs_keys(db: Accounts) -> None:
    with pytest.raises(TypeError):
        db.create_mailbox(f"carol@{DOMAIN}", PASSWORD)


def test_delete_mailbox_removes_its_aliases(db: Accounts) -> None:
    db.add_alias(f"sales@{DOMAIN}", ALICE)
    db.add_alias(f"sales@{DOMAIN}", BOB)
    result = db.delete_mailbox(ALICE, NoKeys())
    assert result == {"address": ALICE, "aliases_removed": [
        {"source": INFO, "destination": ALICE}, {"source": f"sales@{DOMAIN}", "destination": ALICE}]}
    assert db.get_mailbox(ALICE) is None
    assert db.list_aliases() == [{"source": f"sales@{DOMAIN}", "destination": BOB}]


def test_delete_mailbox_refuses_unknown(db: Accounts) -> None:
    with refused(db, "address"):
        db.delete_mailbox(f"nobody@{DOMAIN}", NoKeys())


def test_delete_mailbox_unchanged_when_keys_fail(db: Accounts) -> None:
    before = dump(db.path)
    with pytest.raises(KeysFailed):
        db.delete_mailbox(ALICE, BrokenKeys("remove", db.path))
    assert dump(db.path) == before


# -- rename ------------------------------------------------------------------------------

def test_rename_mailbox_moves_row_aliases_and_password(db: Accounts) -> None:
    renamed = db.rename_mailbox(ALICE, "Alice@Other.test", NoKeys())
    assert (renamed["address"], renamed["local"], renamed["domain"]) == ("alice@other.test", "alice", "other.test")
    assert db.get_mailbox(ALICE) is None
    assert "other.test" in db.domains()
    assert db.list_aliases() == [{"source": INFO, "destination": "alice@other.test"}]
    assert verify_password(stored_hash(db.path, "alice@other.test"), PASSWORD)


def test_rename_mailbox_merges_alias_rows(db: Accounts) -> None:
    db.add_alias(INFO, f"alice2@{DOMAIN}")  # not a mailbox (yet)
    db.rename_mailbox(ALICE, f"alice2@{DOMAIN}", NoKeys())
    assert db.list_aliases() == [{"source": INFO, "destination": f"alice2@{DOMAIN}"}]


@pytest.mark.parametrize("old, new, field", [
    (f"nobody@{DOMAIN}", f"carol@{DOMAIN}", "address"),
    (ALICE, BOB, "new_address"),
    (ALICE, INFO, "new_address"),
    (ALICE, "ALICE@example.test", "new_address"),
    (ALICE, "a';DROP TABLE mailboxes;--@example.test", "new_address"),
    (ALICE, "$(reboot)@example.test", "new_address"),
    ("$(reboot)@example.test", f"carol@{DOMAIN}", "address"),
])
def test_rename_mailbox_refuses(db: Accounts, old: str, new: str, field: str) -> None:
    with refused(db, field):
        db.rename_mailbox(old, new, NoKeys())


def test_rename_mailbox_unchanged_when_keys_fail(db: Accounts) -> None:
    keys = BrokenKeys("rename", db.path)
    before = dump(db.path)
    with pytest.raises(KeysFailed):
        db.rename_mailbox(ALICE, "alice@other.test", keys)
    assert keys.call == ("rename", ALICE, "alice@other.test")
    assert dump(db.path) == before


# -- passwords and quotas ----------------------------------------------------------------

def test_change_password(db: Accounts) -> None:
    db.change_password(ALICE, PASSWORD, NEW_PASSWORD, NoKeys())
    stored = stored_hash(db.path, ALICE)
    assert verify_password(stored, NEW_PASSWORD) and not verify_password(stored, PASSWORD)
    assert verify_password(stored_hash(db.path, BOB), PASSWORD)


@pytest.mark.parametrize("address, old, new, field", [
    (ALICE, "wrong password!", NEW_PASSWORD, "old_password"),
    (ALICE, PASSWORD, "short", "new_password"),
    (f"nobody@{DOMAIN}", PASSWORD, NEW_PASSWORD, "address"),
    ("alice';--@example.test", PASSWORD, NEW_PASSWORD, "address"),
])
def test_change_password_refuses(db: Accounts, address: str, old: str, new: str, field: str) -> None:
    with refused(db, field) as info:
        db.change_password(address, old, new, NoKeys())
    assert old not in str(info.value) and new not in str(info.value)


def test_change_password_checks_a_password_even_for_an_unknown_address(db: Accounts,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown address costs one argon2id check, as a wrong password does: the self-service
    page (portal/web/password.py) must not tell by its time which addresses exist."""
    from portal.stack import accounts as accounts_mod

    checked: list[str] = []
    real = accounts_mod.verify_password
    monkeypatch.setattr(accounts_mod, "verify_password",
                        lambda stored, password: checked.append(stored) or real(stored, password))
    for address in (f"nobody@{DOMAIN}", ALICE):
        with refused(db, "address" if address != ALICE else "old_password"):
            db.change_password(address, "wrong password!", NEW_PASSWORD, NoKeys())
    assert len(checked) == 2 and all(h.startswith("{ARGON2ID}$argon2id$") for h in checked), checked


def test_change_password_unchanged_when_keys_fail(db: Accounts) -> None:
    keys = BrokenKeys("change_password", db.path)
    before = dump(db.path)
    with pytest.raises(KeysFailed):
        db.change_password(ALICE, PASSWORD, NEW_PASSWORD, keys)
    assert keys.call == ("change_password", ALICE, PASSWORD, NEW_PASSWORD)
    assert dump(db.path) == before


def test_reset_password(db: Accounts) -> None:
    db.reset_password(ALICE, NEW_PASSWORD, NoKeys())
    assert verify_password(stored_hash(db.path, ALICE), NEW_PASSWORD)


@pytest.mark.parametrize("address, new, field", [
    (ALICE, "short", "new_password"),
    (f"nobody@{DOMAIN}", NEW_PASSWORD, "address"),
])
def test_reset_password_refuses(db: Accounts, address: str, new: str, field: str) -> None:
    with refused(db, field):
        db.reset_password(address, new, NoKeys())


def test_reset_password_unchanged_when_keys_fail(db: Accounts) -> None:
    before = dump(db.path)
    with pytest.raises(KeysFailed):
        db.reset_password(ALICE, NEW_PASSWORD, BrokenKeys("reset", db.path))
    assert dump(db.path) == before


@pytest.mark.parametrize("quota", [0, 1, MAX_QUOTA_MB])
def test_set_quota(db: Accounts, quota: int) -> None:
    assert db.set_quota(ALICE, quota)["quota_mb"] == quota
    assert db.list_mailboxes()[0]["quota_mb"] == quota


@pytest.mark.parametrize("address, quota, field", [
    (ALICE, -1, "quota_mb"), (ALICE, MAX_QUOTA_MB + 1, "quota_mb"), (ALICE, "5", "quota_mb"),
    (f"nobody@{DOMAIN}", 5, "address"), ("$(reboot)@example.test", 5, "address"),
])
def test_set_quota_refuses(db: Accounts, address: str, quota: Any, field: str) -> None:
    with refused(db, field):
        db.set_quota(address, quota)


# -- aliases --------------------------------------------------------------------------------

def test_add_and_remove_aliases(db: Accounts) -> None:
    assert db.add_alias(f"Sales@{DOMAIN}", "Someone@Elsewhere.example") == {
        "source": f"sales@{DOMAIN}", "destination": "someone@elsewhere.example"}
    db.add_alias(f"sales@{DOMAIN}", INFO)  # a chain without a loop
    db.add_alias(f"team@{DOMAIN}", f"sales@{DOMAIN}")
    db.add_alias(f"team@{DOMAIN}", INFO)  # two paths to one address is no loop
    assert len(db.list_aliases()) == 5
    db.remove_alias(f"team@{DOMAIN}", INFO)
    assert {"source": f"team@{DOMAIN}", "destination": INFO} not in db.list_aliases()


def test_a_catch_all_takes_a_mailbox_or_an_address_elsewhere(db: Accounts) -> None:
    assert db.add_alias(f"@{DOMAIN.upper()}", BOB) == {"source": f"@{DOMAIN}", "destination": BOB}
    db.add_alias(f"@{DOMAIN}", "owner@elsewhere.example")
    assert {"source": f"@{DOMAIN}", "destination": BOB} in db.list_aliases()
    db.rename_mailbox(BOB, f"robert@{DOMAIN}", NoKeys())  # it follows the mailbox
    assert {"source": f"@{DOMAIN}", "destination": f"robert@{DOMAIN}"} in db.list_aliases()
    db.delete_mailbox(f"robert@{DOMAIN}", NoKeys())  # and goes with it
    assert [a for a in db.list_aliases() if a["source"] == f"@{DOMAIN}"] == [
        {"source": f"@{DOMAIN}", "destination": "owner@elsewhere.example"}]
    db.remove_alias(f"@{DOMAIN}", "owner@elsewhere.example")
    assert all(a["source"] != f"@{DOMAIN}" for a in db.list_aliases())


@pytest.mark.parametrize("destination", [INFO, f"nobody@{DOMAIN}"])
def test_a_catch_all_to_anything_but_a_mailbox_of_a_hosted_domain_is_refused(db: Accounts,
                                                                              destination: str) -> None:
    """An alias, or an address nothing receives, would be caught again: a loop in waiting."""
    with refused(db, "destination") as info:
        db.add_alias(f"@{DOMAIN}", destination)
    assert "loop" in str(info.value)


@pytest.mark.parametrize("source", ["@", "@not-hosted.test", "@@example.test", "@exa mple.test", "@;reboot"])
def test_a_bad_catch_all_source_is_refused(db: Accounts, source: str) -> None:
    with refused(db, "source"):
        db.add_alias(source, ALICE)


@pytest.mark.parametrize("existing, source, destination, loop", [
    ([], "a", "a", "a → a"),
    ([("a", "b")], "b", "a", "b → a → b"),
    ([("a", "b"), ("b", "c")], "c", "a", "c → a → b → c"),
    ([("a", "b"), ("b", "c"), ("b", "x"), ("c", "d")], "d", "a", "d → a → b → c → d"),
], ids=["length-1", "length-2", "length-3", "length-4"])
def test_add_alias_refuses_loops(db: Accounts, existing: list[tuple[str, str]], source: str,
                                 destination: str, loop: str) -> None:
    def addr(local: str) -> str:
        return f"{local}@{DOMAIN}"

    for src, dst in existing:
        db.add_alias(addr(src), addr(dst))
    with refused(db, "destination") as info:
        db.add_alias(addr(source), addr(destination))
    assert " → ".join(addr(p) for p in loop.split(" → ")) in str(info.value)


@pytest.mark.parametrize("source, destination, field", [
    (f"sales@{DOMAIN}", "x';DROP TABLE aliases;--@example.test", "destination"),
    (f"sales@{DOMAIN}", "$(reboot)@example.test", "destination"),
    (f"sales@{DOMAIN}", "not an address", "destination"),
    ("a';DROP TABLE aliases;--@example.test", ALICE, "source"),
    ("`reboot`@example.test", ALICE, "source"),
    ("sales@not-hosted.test", ALICE, "source"),
    (BOB, ALICE, "source"),
    (INFO, ALICE, "destination"),
    ("Info@Example.Test", "ALICE@example.test", "destination"),
])
def test_add_alias_refuses(db: Accounts, source: str, destination: str, field: str) -> None:
    with refused(db, field):
        db.add_alias(source, destination)


@pytest.mark.parametrize("source, destination, field", [
    (INFO, BOB, "source"),
    (f"nobody@{DOMAIN}", ALICE, "source"),
    ("$(reboot)@example.test", ALICE, "source"),
    (INFO, "alice;reboot@example.test", "destination"),
])
def test_remove_alias_refuses(db: Accounts, source: str, destination: str, field: str) -> None:
    with refused(db, field):
        db.remove_alias(source, destination)


def test_no_keys_is_mailbox_keys() -> None:
    keys: MailboxKeys = NoKeys()
    keys.generate(ALICE, PASSWORD, KeyKdf.new())
    keys.change_password(ALICE, PASSWORD, NEW_PASSWORD, KeyKdf(KEY_KDF_SHA256), KeyKdf.new())
    keys.reset(ALICE, PASSWORD, KeyKdf.new())
    keys.rename(ALICE, BOB)
    keys.remove(ALICE)


# -- how each mailbox's key password is derived (KeyKdf) -----------------------------------

def stored_kdf(path: Path, address: str) -> tuple[int, str]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT key_kdf, key_salt FROM mailboxes WHERE address = ?", (address,)).fetchone()


class RecordingKeys(NoKeys):
    """Notes the derivations the Accounts hand to the key manager."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[KeyKdf, ...]]] = []

    def generate(self, address: str, password: str, kdf: KeyKdf) -> None:
        self.calls.append(("generate", (kdf,)))

    def change_password(self, address: str, old: str, new: str, old_kdf: KeyKdf, new_kdf: KeyKdf) -> None:
        self.calls.append(("change_password", (old_kdf, new_kdf)))

    def reset(self, address: str, password: str, kdf: KeyKdf) -> None:
        self.calls.append(("reset", (kdf,)))


def test_new_mailboxes_get_the_current_kdf_and_their_own_salt(db: Accounts) -> None:
    keys = RecordingKeys()
    db.create_mailbox(f"carol@{DOMAIN}", PASSWORD, 0, keys)
    db.create_mailbox(f"dave@{DOMAIN}", PASSWORD, 0, keys)
    carol, dave = stored_kdf(db.path, f"carol@{DOMAIN}"), stored_kdf(db.path, f"dave@{DOMAIN}")
    assert carol[0] == dave[0] == KEY_KDF_CURRENT == KEY_KDF_SCRYPT
    assert len(carol[1]) == 32 and carol[1] != dave[1]  # same password, different key passwords
    assert keys.calls == [("generate", (KeyKdf(*carol),)), ("generate", (KeyKdf(*dave),))]
    assert db.key_kdf(f"carol@{DOMAIN}") == KeyKdf(*carol)


def test_a_password_change_derives_afresh_and_the_same_password_is_allowed(db: Accounts) -> None:
    before = db.key_kdf(ALICE)
    keys = RecordingKeys()
    db.change_password(ALICE, PASSWORD, PASSWORD, keys)
    after = db.key_kdf(ALICE)
    assert keys.calls == [("change_password", (before, after))]
    assert after.version == KEY_KDF_SCRYPT and after.salt != before.salt
    assert verify_password(stored_hash(db.path, ALICE), PASSWORD)


def test_a_reset_derives_afresh(db: Accounts) -> None:
    before = db.key_kdf(ALICE)
    keys = RecordingKeys()
    db.reset_password(ALICE, NEW_PASSWORD, keys)
    after = db.key_kdf(ALICE)
    assert keys.calls == [("reset", (after,))] and after.version == KEY_KDF_SCRYPT and after.salt != before.salt


def test_the_kdf_is_unchanged_when_the_keys_fail(db: Accounts) -> None:
    before = db.key_kdf(ALICE)
    keys = BrokenKeys("change_password", db.path)
    with pytest.raises(KeysFailed):
        db.change_password(ALICE, PASSWORD, NEW_PASSWORD, keys)
    assert keys.kdfs[0] == before and keys.kdfs[1].salt != before.salt
    assert db.key_kdf(ALICE) == before


# The schema before the key_kdf and key_salt columns, and a row as it made them.
OLD_SCHEMA = """
CREATE TABLE domains   (name TEXT PRIMARY KEY);
CREATE TABLE mailboxes (address TEXT PRIMARY KEY, local TEXT NOT NULL,
                        domain TEXT NOT NULL REFERENCES domains(name), password TEXT NOT NULL,
                        quota_mb INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE aliases   (source TEXT NOT NULL, destination TEXT NOT NULL, PRIMARY KEY (source, destination));
"""


def old_database(path: Path) -> None:
    path.parent.mkdir(mode=0o750)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO domains VALUES (?)", (DOMAIN,))
        conn.execute("INSERT INTO mailboxes VALUES (?, 'alice', ?, ?, 100, '2024-01-01T00:00:00+00:00')",
                     (ALICE, DOMAIN, hash_password(PASSWORD)))
        conn.execute("INSERT INTO aliases VALUES (?, ?)", (INFO, ALICE))


def test_an_older_database_is_migrated_keeping_its_rows_as_version_1(tmp_path: Path) -> None:
    path = tmp_path / "accounts" / "accounts.db"
    old_database(path)
    before = dump(path)
    db = Accounts(path)
    assert db.list_mailboxes() == [{"address": ALICE, "quota_mb": 100, "created": "2024-01-01T00:00:00+00:00"}]
    assert db.list_aliases() == [{"source": INFO, "destination": ALICE}]
    assert stored_kdf(path, ALICE) == (KEY_KDF_SHA256, "")  # its keys were made with sha256(password)
    assert db.key_kdf(ALICE) == KeyKdf(KEY_KDF_SHA256)
    assert verify_password(stored_hash(path, ALICE), PASSWORD)
    migrated = dump(path)
    assert migrated != before
    Accounts(path).domains()  # opening again changes nothing
    assert dump(path) == migrated

    # A password change (the same password, or another) moves it to the current derivation.
    keys = RecordingKeys()
    db.change_password(ALICE, PASSWORD, PASSWORD, keys)
    now = db.key_kdf(ALICE)
    assert keys.calls == [("change_password", (KeyKdf(KEY_KDF_SHA256), now))]
    assert now.version == KEY_KDF_SCRYPT


def test_an_invalid_stored_kdf_is_refused_naming_the_address(db: Accounts) -> None:
    with db.connect() as conn:
        conn.execute("UPDATE mailboxes SET key_kdf = 7 WHERE address = ?", (ALICE,))
    with refused(db, "address") as info:
        db.change_password(ALICE, PASSWORD, NEW_PASSWORD, RecordingKeys())
    assert "reset" in info.value.message


@pytest.mark.parametrize("version, salt", [
    (KEY_KDF_SHA256, "00" * 16), (KEY_KDF_SCRYPT, ""), (KEY_KDF_SCRYPT, "00" * 15),
    (KEY_KDF_SCRYPT, "0G" * 16), (KEY_KDF_SCRYPT, "AB" * 16), (0, ""), (3, "00" * 16),
])
def test_key_kdf_refuses_what_no_derivation_takes(version: int, salt: str) -> None:
    with pytest.raises(ValueError):
        KeyKdf(version, salt)


def test_key_kdf_new_salts_differ() -> None:
    salts = {KeyKdf.new().salt for _ in range(100)}
    assert len(salts) == 100 and all(len(s) == 32 for s in salts)
