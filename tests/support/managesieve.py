"""A ManageSieve (RFC 5804) client for the tests: just the commands they use, over a
real socket, with STARTTLS. (sievelib's client verifies the certificate against the
system's CAs and the host name, which a stack on 127.0.0.1 with its own certificate
cannot pass; the protocol is small enough to speak here.)"""

from __future__ import annotations

import base64
import re
import socket
import ssl
from typing import Any

STATUS = re.compile(rb"(OK|NO|BYE)\b ?(.*)")
LITERAL = re.compile(rb"\{(\d+)\+?\}$")
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


class ManageSieve:
    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout)
        self.file = self.sock.makefile("rb")
        self.capabilities = self._capabilities()

    def __enter__(self) -> ManageSieve:
        return self

    def __exit__(self, *_exc: Any) -> None:
        try:
            self.command("LOGOUT")
        except OSError:
            pass
        self.sock.close()

    def _line(self) -> bytes:
        line = self.file.readline(65536)
        if not line:
            raise ConnectionError("the server closed the connection")
        return line.rstrip(b"\r\n")

    def _response(self) -> tuple[str, list[str], str]:
        """(OK, NO or BYE; the lines before it; its text, from a quoted string or a literal)."""
        lines: list[str] = []
        while True:
            line = self._line()
            match = STATUS.match(line)
            if not match:
                lines.append(line.decode(errors="replace"))
                continue
            rest = match.group(2).strip()
            literal = LITERAL.search(rest)
            if literal:
                text = self.file.read(int(literal.group(1)))
                self._line()
            else:
                text = rest
            return match.group(1).decode(), lines, text.decode(errors="replace")

    def _capabilities(self) -> dict[str, str]:
        status, lines, text = self._response()
        assert status == "OK", (status, text)
        caps = {}
        for line in lines:
            words = QUOTED.findall(line)
            if words:
                caps[words[0].upper()] = words[1] if len(words) > 1 else ""
        return caps

    def command(self, text: str, literal: bytes | None = None) -> tuple[str, list[str], str]:
        data = text.encode()
        if literal is not None:
            data += b" {%d+}\r\n" % len(literal) + literal
        self.sock.sendall(data + b"\r\n")
        return self._response()

    def starttls(self, context: ssl.SSLContext) -> None:
        status, _lines, text = self.command("STARTTLS")
        assert status == "OK", text
        self.sock = context.wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")
        self.capabilities = self._capabilities()  # sent again over TLS (RFC 5804 2.2)

    def authenticate(self, user: str, password: str) -> tuple[str, str]:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        status, _lines, text = self.command(f'AUTHENTICATE "PLAIN" "{token}"')
        return status, text

    def put_script(self, name: str, script: str) -> tuple[str, str]:
        status, _lines, text = self.command(f'PUTSCRIPT "{name}"', script.encode())
        return status, text

    def set_active(self, name: str) -> tuple[str, str]:
        status, _lines, text = self.command(f'SETACTIVE "{name}"')
        return status, text

    def scripts(self) -> dict[str, bool]:
        """name -> active."""
        status, lines, text = self.command("LISTSCRIPTS")
        assert status == "OK", text
        return {QUOTED.findall(line)[0]: line.rstrip().upper().endswith("ACTIVE") for line in lines}
