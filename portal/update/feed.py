"""An update feed, read as untrusted input.

A feed is a folder on any static HTTP(S) host (scripts/publish writes it):

    SHA256SUMS                             "<sha256> *<name>" per file
    SHA256SUMS.gpg                         detached signature of SHA256SUMS
    mailstead_<v>.root-x86-64.raw.xz       the system slot of version <v> (or .gz)
    mailstead_<v>.efi                      its kernel (a unified kernel image)
    mailstead_<v>.json                     what it is: version, build date, notes

systemd-sysupdate installs the slot and the kernel and checks the signature and
the hashes itself. The agent reads the same feed first, to show the owner what
is on offer (version, date, change notes) and to refuse early, with a clear
message, what sysupdate would refuse too: so it checks the signature against
the same keyring, and each file it reads against SHA256SUMS.

Versions are dotted numbers (0.2.0, 0.2.0.202612061830): for those, the order
below and systemd's version order (strverscmp_improved) agree, so the agent and
sysupdate always pick the same "newest".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portal.core import safefs
from portal.core.errors import MailsteadError

# Names as scripts/publish writes them, and the version in them.
VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,12}){1,4}$")
# The slot, compressed with xz (the smallest) or gzip (the quickest to unpack);
# systemd-pull tells them apart by their first bytes.
SLOT_SUFFIXES = (".root-x86-64.raw.xz", ".root-x86-64.raw.gz")
KERNEL_SUFFIX = ".efi"
NOTES_SUFFIX = ".json"
NAME_RE = re.compile(r"^mailstead_(?P<version>[0-9.]{3,70})(?P<kind>\.root-x86-64\.raw\.[gx]z|\.efi|\.json)$")
SUMS_LINE_RE = re.compile(r"^(?P<hash>[0-9a-f]{64}) [ *](?P<name>[^\x00-\x1f/]{1,200})$")
KEYRING = Path("/etc/systemd/import-pubring.gpg")   # where systemd-pull looks first
MAX_SUMS = 64 * 1024
MAX_SIGNATURE = 16 * 1024
MAX_NOTES = 64 * 1024
MAX_NOTE_LINES = 50
MAX_NOTE_CHARS = 500

Fetch = Callable[[str, int], bytes]


class FeedError(MailsteadError):
    """The feed could not be read, or was refused: the message says which and why."""

    code = "feed"

    def __init__(self, message: str, code: str = "feed") -> None:
        super().__init__(message, field="update_feed_url", code=code)


def check_version(text: str, where: str) -> str:
    if not VERSION_RE.match(text):
        raise FeedError(f"{where}: '{text[:40]}' is not a version (dotted numbers, e.g. 0.2.0)", "invalid")
    return text


def version_key(v: str) -> tuple[int, ...]:
    """Dotted numbers, compared numerically; missing parts count as older
    (0.2 < 0.2.0 < 0.2.0.1), as systemd compares them."""
    return tuple(int(p) for p in v.split("."))


def newer(a: str, b: str) -> bool:
    return version_key(a) > version_key(b)


@dataclass(frozen=True)
class Release:
    """One complete version on a feed: its three files and their hashes."""

    version: str
    hashes: dict[str, str]            # file name -> sha256

    @property
    def slot(self) -> str:
        return next((f"mailstead_{self.version}{s}" for s in SLOT_SUFFIXES
                     if f"mailstead_{self.version}{s}" in self.hashes), f"mailstead_{self.version}{SLOT_SUFFIXES[0]}")

    @property
    def kernel(self) -> str:
        return f"mailstead_{self.version}{KERNEL_SUFFIX}"

    @property
    def notes_file(self) -> str:
        return f"mailstead_{self.version}{NOTES_SUFFIX}"


@dataclass(frozen=True)
class Notes:
    """What mailstead_<v>.json says, checked."""

    version: str
    built: str                        # ISO 8601, UTC
    notes: tuple[str, ...] = ()
    slot_bytes: int = 0               # download size of the slot image

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "built": self.built, "notes": list(self.notes),
                "slot_bytes": self.slot_bytes}


@dataclass
class Feed:
    url: str
    releases: dict[str, Release] = field(default_factory=dict)

    def newest(self) -> Release | None:
        if not self.releases:
            return None
        return self.releases[max(self.releases, key=version_key)]


def check_url(url: str) -> str:
    """An http(s) URL of a folder, without credentials, query or fragment. Plain
    http is allowed: everything read is signed (and tests serve feeds that way)."""
    url = url.strip()
    if not url:
        raise FeedError("no update feed is set: enter the address of the folder scripts/publish wrote", "invalid")
    if len(url) > 500 or any(c.isspace() or ord(c) < 32 for c in url):
        raise FeedError("the feed address must be one http(s) URL of at most 500 characters", "invalid")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FeedError(f"'{url[:80]}' is not an http:// or https:// address", "invalid")
    if "%" in url:
        raise FeedError("the feed address may not hold '%' (systemd-sysupdate reads it as a specifier): "
                        "rename the folder", "invalid")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise FeedError("the feed address may not hold a user name, password, '?' or '#'", "invalid")
    return url if url.endswith("/") else url + "/"


def http_fetch(url: str, limit: int, timeout: float = 30) -> bytes:
    """GET `url`, at most `limit` bytes, or FeedError naming the address."""
    req = urllib.request.Request(url, headers={"User-Agent": "mailstead-update"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (scheme checked)
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FeedError(f"{url} answered {exc.code} {exc.reason}: is the feed address right, "
                        "and did scripts/publish finish?", "unreachable") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FeedError(f"cannot reach {url}: {reason}. Check the address and the machine's network.",
                        "unreachable") from None
    if len(data) > limit:
        raise FeedError(f"{url} is larger than {limit} bytes: this is not a Mailstead feed file", "refused")
    return data


def verify_signature(data: bytes, signature: bytes, keyring: Path = KEYRING) -> str:
    """The fingerprint of the key that signed `data`, or FeedError. gpg in a
    throwaway home, only `keyring`'s keys, and the answer read from its status
    lines (a good signature is VALIDSIG, not an exit code)."""
    if not keyring.is_file():
        raise FeedError(f"this appliance has no update key ({keyring}): it was built without one", "refused")
    with tempfile.TemporaryDirectory(prefix="mailstead-gpg-") as home:
        sig = Path(home) / "SHA256SUMS.gpg"
        safefs.write_bytes(sig, signature, 0o600)
        try:
            proc = subprocess.run(
                ["gpg", "--homedir", home, "--batch", "--no-tty", "--no-default-keyring",
                 "--keyring", str(keyring), "--trust-model", "always", "--status-fd", "1",
                 "--verify", str(sig), "-"],
                input=data, capture_output=True, timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                                 "LC_ALL": "C"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FeedError(f"could not run gpg to check the feed's signature: {exc}", "refused") from None
    status = proc.stdout.decode("utf-8", "replace").splitlines()
    valid = [line.split()[2] for line in status if line.startswith("[GNUPG:] VALIDSIG ") and len(line.split()) > 2]
    bad = any(line.startswith(("[GNUPG:] BADSIG", "[GNUPG:] ERRSIG", "[GNUPG:] EXPKEYSIG", "[GNUPG:] REVKEYSIG"))
              for line in status)
    if proc.returncode != 0 or bad or not valid:
        if any(line.startswith("[GNUPG:] BADSIG") for line in status):
            why = "the signature does not match SHA256SUMS (the file was changed after it was signed)"
        elif any(line.startswith("[GNUPG:] ERRSIG") or line.startswith("[GNUPG:] NO_PUBKEY") for line in status):
            why = "it is signed by a key this appliance does not trust"
        elif any(line.startswith("[GNUPG:] NODATA") for line in status):
            why = "SHA256SUMS.gpg is not a signature"
        else:
            why = "gpg did not accept the signature"
        raise FeedError(f"refused the feed: {why}. Nothing was changed.", "refused")
    return valid[0]


def parse_sums(text: str) -> dict[str, str]:
    """SHA256SUMS as {name: hash}. Lines that are not ours are refused, not skipped:
    the file is signed, so anything odd in it is the publisher's mistake to fix."""
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = SUMS_LINE_RE.match(line)
        if not m:
            raise FeedError(f"SHA256SUMS line {n} is not '<sha256> *<file name>'", "refused")
        name = m["name"]
        if name in sums:
            raise FeedError(f"SHA256SUMS names {name} twice", "refused")
        sums[name] = m["hash"]
    return sums


def releases(sums: dict[str, str]) -> dict[str, Release]:
    """The complete versions in SHA256SUMS (slot, kernel and notes all listed).
    Other names (SHA256SUMS itself, files of other tools) are ignored."""
    found: dict[str, dict[str, str]] = {}
    for name, digest in sums.items():
        m = NAME_RE.match(name)
        if not m or not VERSION_RE.match(m["version"]):
            continue
        found.setdefault(m["version"], {})[name] = digest
    out = {v: Release(v, files) for v, files in found.items() if len(files) == 3}
    return {v: r for v, r in out.items() if {r.slot, r.kernel, r.notes_file} == set(r.hashes)}


def parse_notes(data: bytes, release: Release) -> Notes:
    """mailstead_<v>.json, checked field by field (it is shown to the owner)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FeedError(f"{release.notes_file} is not JSON", "refused") from None
    if not isinstance(doc, dict):
        raise FeedError(f"{release.notes_file} is not a JSON object", "refused")
    if doc.get("version") != release.version:
        raise FeedError(f"{release.notes_file} says version {str(doc.get('version'))[:40]!r}, "
                        f"not {release.version}", "refused")
    built = doc.get("built")
    try:
        when = dt.datetime.fromisoformat(str(built))
    except ValueError:
        raise FeedError(f"{release.notes_file}: 'built' is not an ISO date", "refused") from None
    if when.tzinfo is None:
        raise FeedError(f"{release.notes_file}: 'built' has no time zone", "refused")
    notes = doc.get("notes", [])
    if (not isinstance(notes, list) or len(notes) > MAX_NOTE_LINES
            or not all(isinstance(n, str) and len(n) <= MAX_NOTE_CHARS for n in notes)):
        raise FeedError(f"{release.notes_file}: 'notes' must be a list of at most {MAX_NOTE_LINES} "
                        f"lines of text", "refused")
    size = doc.get("slot_bytes", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FeedError(f"{release.notes_file}: 'slot_bytes' is not a size", "refused")
    clean = tuple("".join(c for c in n if c.isprintable()) for n in notes)
    return Notes(release.version, when.astimezone(dt.timezone.utc).isoformat(timespec="seconds"), clean, size)


def read_feed(url: str, *, keyring: Path = KEYRING, fetch: Fetch = http_fetch) -> Feed:
    """The feed at `url`: SHA256SUMS fetched, its signature checked, its versions."""
    url = check_url(url)
    sums = fetch(url + "SHA256SUMS", MAX_SUMS)
    try:
        signature = fetch(url + "SHA256SUMS.gpg", MAX_SIGNATURE)
    except FeedError as exc:
        if exc.code == "unreachable" and " answered 404 " in exc.message:
            raise FeedError("refused the feed: it has no signature (SHA256SUMS.gpg). "
                            "Nothing was changed.", "refused") from None
        raise
    verify_signature(sums, signature, keyring)
    try:
        text = sums.decode("utf-8")
    except UnicodeDecodeError:
        raise FeedError("SHA256SUMS is not text", "refused") from None
    return Feed(url, releases(parse_sums(text)))


def read_notes(feed: Feed, release: Release, fetch: Fetch = http_fetch) -> Notes:
    data = fetch(feed.url + release.notes_file, MAX_NOTES)
    if hashlib.sha256(data).hexdigest() != release.hashes[release.notes_file]:
        raise FeedError(f"refused {release.notes_file}: it does not match its hash in the signed "
                        "SHA256SUMS (changed after signing, or a broken download). Nothing was changed.",
                        "refused")
    return parse_notes(data, release)


def check(url: str, running: str, *, keyring: Path = KEYRING, fetch: Fetch = http_fetch) -> dict[str, Any]:
    """What the feed offers compared to `running`, as data for the page, the CLI and
    the scheduler: {"feed", "running", "newest", "available", "notes", "message"}."""
    running = check_version(running, "the running version")
    feed = read_feed(url, keyring=keyring, fetch=fetch)
    newest = feed.newest()
    result: dict[str, Any] = {"feed": feed.url, "running": running, "newest": None, "available": False,
                              "notes": None}
    if newest is None:
        result["message"] = "The feed holds no complete version (slot, kernel and notes)."
        return result
    notes = read_notes(feed, newest, fetch)
    result.update(newest=newest.version, notes=notes.as_dict())
    if newer(newest.version, running):
        result.update(available=True, message=f"Version {newest.version} is available (running {running}).")
    elif newest.version == running:
        result["message"] = f"Up to date: {running} is the newest version on the feed."
    else:
        result["message"] = (f"The feed's newest version, {newest.version}, is older than the running "
                             f"{running}: it is not installed (no downgrades).")
    return result
