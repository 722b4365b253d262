"""The update feed as the agent reads it (portal/update/feed.py): real gpg keys,
a real HTTP server on loopback, and feeds that are right, tampered with,
unsigned, signed by a stranger, or older than what runs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from portal.update import feed as F
from tests.support.feeds import make_key, publish, serve, stop_agent

RUNNING = "0.2.0"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("keys")
    homes = [root / "ours", root / "stranger"]
    try:
        yield {"ours": make_key(homes[0], "Mailstead test feed <feed@example.test>"),
               "stranger": make_key(homes[1], "Someone else <else@example.test>")}
    finally:  # gpg left an agent running for each home
        for home in homes:
            stop_agent(home)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with serve(tmp_path / "www") as url:
        yield url, tmp_path / "www" / "feed"


def test_a_signed_feed_offers_its_newest_version_with_its_notes(server, keys) -> None:
    url, folder = server
    publish(folder, ["0.1.9", "0.2.0", "0.2.1", "0.10.0"], keys["ours"].parent)
    result = F.check(url, RUNNING, keyring=keys["ours"])
    assert result["available"] is True and result["newest"] == "0.10.0"
    assert result["notes"] == {"version": "0.10.0", "built": "2026-12-06T10:00:00+00:00",
                               "notes": ["Version 0.10.0"], "slot_bytes": 7}
    assert "0.10.0 is available" in result["message"]


def test_up_to_date_and_older_feeds_offer_nothing(server, keys) -> None:
    url, folder = server
    publish(folder, ["0.2.0"], keys["ours"].parent)
    assert F.check(url, RUNNING, keyring=keys["ours"])["available"] is False
    publish(folder, ["0.1.9"], keys["ours"].parent)
    older = F.check(url, RUNNING, keyring=keys["ours"])
    assert older["available"] is False and "older than the running 0.2.0" in older["message"]


def test_a_flipped_byte_in_the_signed_list_is_refused(server, keys) -> None:
    url, folder = server
    publish(folder, ["0.3.0"], keys["ours"].parent)
    sums = bytearray((folder / "SHA256SUMS").read_bytes())
    sums[5] ^= 0x01
    (folder / "SHA256SUMS").write_bytes(bytes(sums))
    with pytest.raises(F.FeedError) as err:
        F.check(url, RUNNING, keyring=keys["ours"])
    assert err.value.code == "refused" and "does not match SHA256SUMS" in err.value.message
    assert err.value.field == "update_feed_url"


def test_an_unsigned_feed_is_refused(server, keys) -> None:
    url, folder = server
    publish(folder, ["0.3.0"], None)
    with pytest.raises(F.FeedError, match="no signature"):
        F.check(url, RUNNING, keyring=keys["ours"])


def test_a_feed_signed_by_another_key_is_refused(server, keys) -> None:
    url, folder = server
    publish(folder, ["0.3.0"], keys["stranger"].parent)
    with pytest.raises(F.FeedError, match="key this appliance does not trust"):
        F.check(url, RUNNING, keyring=keys["ours"])


def test_notes_changed_after_signing_are_refused(server, keys) -> None:
    url, folder = server
    publish(folder, ["0.3.0"], keys["ours"].parent)
    (folder / "mailstead_0.3.0.json").write_text(json.dumps(
        {"version": "0.3.0", "built": "2026-12-06T10:00:00+00:00", "notes": ["Free upgrade! Click here"]}))
    with pytest.raises(F.FeedError, match="does not match its hash"):
        F.check(url, RUNNING, keyring=keys["ours"])


def test_a_missing_feed_names_the_address(server, keys) -> None:
    url, _folder = server
    with pytest.raises(F.FeedError) as err:
        F.check(url, RUNNING, keyring=keys["ours"])
    assert err.value.code == "unreachable" and "404" in err.value.message and url in err.value.message


def test_an_appliance_without_a_key_refuses_every_feed(server, keys, tmp_path) -> None:
    url, folder = server
    publish(folder, ["0.3.0"], keys["ours"].parent)
    with pytest.raises(F.FeedError, match="no update key"):
        F.check(url, RUNNING, keyring=tmp_path / "none.gpg")


@pytest.mark.parametrize("notes,why", [
    ({"version": "0.3.1", "built": "2026-12-06T10:00:00+00:00"}, "says version"),
    ({"version": "0.3.0", "built": "yesterday"}, "not an ISO date"),
    ({"version": "0.3.0", "built": "2026-12-06T10:00:00"}, "no time zone"),
    ({"version": "0.3.0", "built": "2026-12-06T10:00:00+00:00", "notes": "text"}, "must be a list"),
    ({"version": "0.3.0", "built": "2026-12-06T10:00:00+00:00", "notes": ["x" * 501]}, "must be a list"),
    ({"version": "0.3.0", "built": "2026-12-06T10:00:00+00:00", "slot_bytes": -1}, "not a size"),
    (["0.3.0"], "not a JSON object"),
])
def test_bad_notes_are_refused_saying_what_is_wrong(server, keys, notes, why) -> None:
    url, folder = server
    publish(folder, ["0.3.0"], keys["ours"].parent, notes=notes)
    with pytest.raises(F.FeedError, match=why):
        F.check(url, RUNNING, keyring=keys["ours"])


def test_versions_order_numerically_as_systemd_does() -> None:
    ordered = ["0.1", "0.1.0", "0.1.9", "0.1.10", "0.2.0", "0.2.0.1", "0.2.0.202612061830", "1.0.0"]
    assert sorted(reversed(ordered), key=F.version_key) == ordered
    # The same order as systemd's own (systemd-analyze compare-versions, systemd >= 252).
    for a, b in zip(ordered, ordered[1:]):
        out = subprocess.run(["systemd-analyze", "compare-versions", a, b], capture_output=True, text=True,
                             timeout=30)
        assert out.stdout.strip() == f"{a} < {b}", out.stdout


@pytest.mark.parametrize("line", [
    "xyz *mailstead_0.3.0.efi",
    f"{'a' * 64} */etc/passwd",
    f"{'a' * 64}  mailstead_0.3.0.efi trailing\x01",
    f"{'A' * 64} *mailstead_0.3.0.efi",
])
def test_odd_lines_in_sha256sums_are_refused(line) -> None:
    with pytest.raises(F.FeedError, match="SHA256SUMS line 1"):
        F.parse_sums(line + "\n")


def test_only_complete_versions_with_our_names_are_offered() -> None:
    h = "a" * 64
    sums = F.parse_sums("".join(f"{h} *{n}\n" for n in [
        "mailstead_0.3.0.root-x86-64.raw.xz", "mailstead_0.3.0.efi", "mailstead_0.3.0.json",
        "mailstead_0.4.0.efi", "mailstead_0.4.0.json",                      # no slot: incomplete
        "mailstead_0.5.0-rc1.efi", "other.iso", "mailstead_0.6.0.root-x86-64.raw.zst"]))
    assert list(F.releases(sums)) == ["0.3.0"]


@pytest.mark.parametrize("url,why", [
    ("", "no update feed is set"),
    ("ftp://feed.example/", "not an http"),
    ("https://user:pw@feed.example/", "user name"),
    ("https://feed.example/?x=1", "user name"),
    ("https://feed.example/a b/", "one http"),
    ("/srv/feed", "not an http"),
])
def test_feed_addresses_are_checked(url, why) -> None:
    with pytest.raises(F.FeedError, match=why):
        F.check_url(url)
    assert F.check_url("https://updates.example.org/mailstead") == "https://updates.example.org/mailstead/"
