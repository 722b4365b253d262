"""Update feeds for tests: real gpg keys and a feed folder as scripts/publish
writes it (small stand-ins for the slot and the kernel), served over HTTP on
loopback."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode", "loopback",
                           "--passphrase", "", *args], input=data, capture_output=True, check=True,
                          timeout=60).stdout


def make_key(home: Path, uid: str) -> Path:
    """A signing key in gpg home `home`; returns its exported public keyring."""
    home.mkdir(mode=0o700)
    gpg(home, "--quick-gen-key", uid, "ed25519", "sign", "never")
    keyring = home / "pub.gpg"
    keyring.write_bytes(gpg(home, "--export", uid))
    return keyring


def stop_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, timeout=30)


def publish(folder: Path, versions: list[str], key_home: Path | None, notes: dict | None = None) -> None:
    folder.mkdir(exist_ok=True)
    lines = []
    for v in versions:
        files = {f"mailstead_{v}.root-x86-64.raw.xz": f"slot {v}".encode(),
                 f"mailstead_{v}.efi": f"kernel {v}".encode(),
                 f"mailstead_{v}.json": json.dumps(notes or {"version": v, "built": "2026-12-06T10:00:00+00:00",
                                                              "notes": [f"Version {v}"], "slot_bytes": 7}).encode()}
        for name, data in files.items():
            (folder / name).write_bytes(data)
            lines.append(f"{hashlib.sha256(data).hexdigest()} *{name}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))
    if key_home is not None:
        (folder / "SHA256SUMS.gpg").write_bytes(
            gpg(key_home, "--detach-sign", "--output", "-", data=(folder / "SHA256SUMS").read_bytes()))


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """`root` over HTTP on loopback; yields the URL of its feed/ folder."""
    root.mkdir(exist_ok=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/feed/"
    finally:
        httpd.shutdown()
        httpd.server_close()
