"""The update feeds the VM scenarios install from, served on the host's loopback
(the guest reaches them at 10.0.2.2), and the ones that must be refused."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

from tests.support.feeds import gpg

from .machine import Machine

HOST_ALIAS = "10.0.2.2"


class FeedServer:
    """`root`'s folders over HTTP on 127.0.0.1; `url(name)` is a folder's address as the guest sees it."""

    def __init__(self, root: Path):
        self.root = root
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a: None  # type: ignore[attr-defined]
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://{HOST_ALIAS}:{self.httpd.server_address[1]}/{name}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def version_of(feed: Path) -> str:
    (notes,) = feed.glob("mailstead_*.json")
    return json.loads(notes.read_text())["version"]


def key_home() -> Path:
    home = Path(os.environ.get("MAILSTEAD_PUBLISH_KEY_DIR") or Path.home() / ".local/share/mailstead/publish-key")
    assert (home / "update-key.gpg").is_file(), f"no publishing key in {home} (scripts/test makes it)"
    return home


def sign(feed: Path) -> None:
    (feed / "SHA256SUMS.gpg").write_bytes(gpg(key_home(), "--detach-sign", "--output", "-",
                                              data=(feed / "SHA256SUMS").read_bytes()))


def refused_feeds(good: Path, root: Path) -> dict[str, Path]:
    """Next to `good` (a published feed): the same without its signature ("unsigned"),
    the same with one byte of its signed list flipped ("flipped"), and a signed feed
    whose only version is older than any that runs ("older")."""
    out = {}
    for name in ("unsigned", "flipped"):
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in good.iterdir():
            os.link(f, folder / f.name)
        out[name] = folder
    (out["unsigned"] / "SHA256SUMS.gpg").unlink()
    sums = out["flipped"] / "SHA256SUMS"
    data = bytearray(sums.read_bytes())
    sums.unlink()  # a hard link: the good feed's list stays as it is
    data[5] ^= 0x01  # a hex digit of the first hash
    sums.write_bytes(bytes(data))
    older = root / "older"
    shutil.rmtree(older, ignore_errors=True)
    older.mkdir(parents=True)
    files = {"mailstead_0.0.1.root-x86-64.raw.gz": b"not a slot", "mailstead_0.0.1.efi": b"not a kernel",
             "mailstead_0.0.1.json": json.dumps({"version": "0.0.1", "built": "2026-01-01T00:00:00+00:00",
                                                  "notes": ["An old version"], "slot_bytes": 10}).encode()}
    lines = []
    for name, data_ in files.items():
        (older / name).write_bytes(data_)
        lines.append(f"{hashlib.sha256(data_).hexdigest()} *{name}\n")
    (older / "SHA256SUMS").write_text("".join(lines))
    sign(older)
    out["older"] = older
    return out


def verified_on(m: Machine, version: str) -> bool:
    """`version` runs and its mailstead-update-verify finished well (a trial passed, or
    the recovery after a rollback is done)."""
    m.check_alive()
    try:
        rc, out = m.execute(f". /etc/os-release && test \"$IMAGE_VERSION\" = {version} && "
                            "systemctl show -P ActiveState mailstead-update-verify", timeout=20)
    except (OSError, TimeoutError, ConnectionError):
        m._disconnect()
        return False
    assert rc == 0 and out.strip() == "active", f"[{rc}] {out.strip()}"
    return True


def update_timeline(m: Machine) -> list[str]:
    """For the report: the guest's boots (first and last entry of each) and what the
    update units said, with wall-clock times, across the boots an update spans."""
    return m.execute(
        "journalctl --list-boots --no-pager | tail -4; journalctl --no-pager -o short-iso-precise "
        "-u 'mailstead-update*' -u mailstead-images.service -u docker.service -u mailstead-agent.service "
        "--since -2h | grep -v 'level=info' | tail -250", timeout=120)[1].splitlines()
