"""Configuration defaults, read from the environment when the app is built."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

DEFAULT_WEB_DIR = "/var/lib/mailstead-web"
DEFAULT_RUN_DIR = "/run/mailstead"

# Environment variables the web process reads (all optional). The web process
# has its own folder (WEB_DIR: its session signing key) and never reads the
# agent's state folder: it asks the agent (portal/web/state.py).
ENV = {
    "WEB_DIR": "MAILSTEAD_WEB_DIR",
    "RUN_DIR": "MAILSTEAD_RUN_DIR",
    "SECRET_KEY_FILE": "MAILSTEAD_SECRET_KEY_FILE",
    "AGENT_SOCKET": "MAILSTEAD_AGENT_SOCKET",
    "RATELIMIT_STORAGE_URI": "MAILSTEAD_RATELIMIT_STORAGE_URI",
}


def build(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults < environment < `overrides`; derived paths follow WEB_DIR/RUN_DIR."""
    overrides = dict(overrides or {})
    env = {key: os.environ[var] for key, var in ENV.items() if os.environ.get(var)}
    cfg: dict[str, Any] = {
        "WEB_DIR": DEFAULT_WEB_DIR,
        "RUN_DIR": DEFAULT_RUN_DIR,
        "RATELIMIT_STORAGE_URI": "memory://",
        "RATELIMIT_HEADERS_ENABLED": True,
        "TOKEN_RATE_LIMIT": "5 per minute",
        "SESSION_COOKIE_NAME": "__Host-mailstead",
        "SESSION_COOKIE_SECURE": True,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Strict",
        "PERMANENT_SESSION_LIFETIME": timedelta(minutes=30),
        "WTF_CSRF_TIME_LIMIT": 30 * 60,
        "MAX_CONTENT_LENGTH": 64 * 1024,
    }
    cfg.update(env)
    cfg.update(overrides)
    web, run = Path(cfg["WEB_DIR"]), Path(cfg["RUN_DIR"])
    cfg.setdefault("SECRET_KEY_FILE", str(web / "secret_key"))
    cfg.setdefault("AGENT_SOCKET", str(run / "agent.sock"))
    return cfg


def load_or_create_secret_key(path: str | os.PathLike[str]) -> str:
    """Read the session signing key, creating it (0600) on first use.

    Safe when several workers start at once: the key is written to a temporary
    file and hard-linked into place, so readers never see a partial file and
    the first writer wins.
    """
    path = Path(path)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp makes it 0600
            f.write(secrets.token_hex(32).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> str:
    key = path.read_text(encoding="ascii").strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} holds no usable secret key; delete it to make a new one")
    return key
