"""radicale authentication against dovecot's auth service (the mail accounts).

Loaded by radicale as `[auth] type = mailstead_dovecot_auth` (entrypoint.sh
puts this folder on PYTHONPATH). It replaces radicale's own `dovecot` backend,
which in radicale 3.5.3 (Debian trixie) cannot talk to dovecot 2.4: it waits
for the server's whole handshake before sending its VERSION, but since 2.4.0
dovecot sends only its VERSION line and waits for the client's first
(https://github.com/Kozea/Radicale/issues/1878). This client speaks first, as
postfix does, so it works with dovecot 2.3 and 2.4 alike.

Protocol: https://doc.dovecot.org/2.4.1/developers/design/auth_protocol.html
Host and port come from radicale's own `dovecot_host` / `dovecot_port` options.
Successful logins are remembered for CACHE_SECONDS (as a keyed hash of the
password, in memory only) so that a client's burst of requests does not run
dovecot's password hash once per request; failures are never cached.
Each login carries the client's address (`rip`, from nginx's X-Forwarded-For),
so dovecot's failure penalty and its log lines are per client, not per radicale.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import itertools
import os
import secrets
import socket
import threading
import time

from radicale import auth
from radicale.log import logger

TIMEOUT = 20.0        # seconds; dovecot delays failed logins, up to 15 s for a repeat offender
CACHE_SECONDS = 30.0  # a changed password takes effect after at most this long
MAX_HANDSHAKE_LINES = 64

_request = threading.local()  # radicale serves each request in a thread of its own


class Auth(auth.BaseAuth):
    def __init__(self, configuration) -> None:
        super().__init__(configuration)
        self._address = (configuration.get("auth", "dovecot_host"),
                         int(configuration.get("auth", "dovecot_port")))
        self._ids = itertools.count(1)
        self._key = secrets.token_bytes(32)
        self._cache: dict[str, tuple[bytes, float, str]] = {}  # login -> (digest, expiry, user)
        self._cache_lock = threading.Lock()
        logger.info("auth: dovecot auth service at %s:%d (stack network)", *self._address)

    def get_external_login(self, environ):
        """Called first for every request: note the client's address, and let
        radicale go on with HTTP Basic authentication as usual."""
        forwarded = environ.get("HTTP_X_FORWARDED_FOR", "").split(",")[-1].strip()
        _request.client_ip = _ip(forwarded) or _ip(environ.get("REMOTE_ADDR", ""))
        return ()

    # -- cache of recent successful logins -------------------------------------

    def _digest(self, login: str, password: str) -> bytes:
        return hmac.new(self._key, f"{login}\0{password}".encode(), hashlib.sha256).digest()

    def _cached(self, login: str, password: str) -> str:
        """The user a recent successful login with this password mapped to, or ""."""
        with self._cache_lock:
            entry = self._cache.get(login)
        if entry is None:
            return ""
        digest, expires, user = entry
        if time.monotonic() < expires and hmac.compare_digest(digest, self._digest(login, password)):
            return user
        return ""

    def _remember(self, login: str, user: str, password: str) -> None:
        now = time.monotonic()
        with self._cache_lock:
            for name in [n for n, entry in self._cache.items() if entry[1] <= now]:
                del self._cache[name]
            self._cache[login] = (self._digest(login, password), now + CACHE_SECONDS, user)

    # -- the dovecot auth protocol -------------------------------------------------

    def _login(self, login: str, password: str) -> str:
        if not login or not password:
            return ""
        if any(c in login for c in "\0\t\n\r") or "\0" in password:
            return ""  # cannot be a mail account, nor travel in SASL PLAIN
        user = self._cached(login, password)
        if user:
            return user
        try:
            user = self._ask_dovecot(login, password)
        except (OSError, ValueError) as err:
            logger.error("auth: dovecot auth service at %s:%d failed: %s", *self._address, err)
            return ""
        if user:
            self._remember(login, user, password)
        return user

    def _ask_dovecot(self, login: str, password: str) -> str:
        with socket.create_connection(self._address, timeout=TIMEOUT) as sock, sock.makefile("rb") as reader:
            # Speak first: dovecot >= 2.4 answers the client's VERSION with the rest of its handshake.
            sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
            mechanisms = set()
            for _ in range(MAX_HANDSHAKE_LINES):
                fields = _fields(reader.readline())
                if fields[0] == b"VERSION" and (len(fields) < 2 or fields[1] != b"1"):
                    raise ValueError(f"unsupported auth protocol version {fields[1:]!r}")
                if fields[0] == b"MECH" and len(fields) > 1:
                    mechanisms.add(fields[1].upper())
                if fields[0] == b"DONE":
                    break
            else:
                raise ValueError("no end to the handshake")
            if b"PLAIN" not in mechanisms:
                raise ValueError("dovecot offers no PLAIN mechanism (auth_mechanisms)")
            request_id = next(self._ids)
            response = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())
            # `secured`: clients reach radicale only through the host's nginx, over TLS.
            client = getattr(_request, "client_ip", "")
            rip = b"\trip=" + client.encode() if client else b""
            sock.sendall(b"AUTH\t%d\tPLAIN\tservice=radicale\tsecured%s\tresp=%s\n"
                         % (request_id, rip, response))
            while True:
                fields = _fields(reader.readline())
                if len(fields) < 2 or fields[1] != b"%d" % request_id:
                    continue
                if fields[0] == b"OK":
                    params = dict(f.split(b"=", 1) for f in fields[2:] if b"=" in f)
                    return params.get(b"user", login.encode()).decode()
                if fields[0] == b"FAIL":
                    return ""
                raise ValueError(f"unexpected reply {fields[0][:16]!r} to a PLAIN login")


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return ""


def _fields(line: bytes) -> list[bytes]:
    if not line.endswith(b"\n"):
        raise ValueError("connection closed by dovecot")
    return line.rstrip(b"\r\n").split(b"\t")
