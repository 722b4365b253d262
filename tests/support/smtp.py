"""The appliance's mail, caught on loopback: an SMTP sink, and the agent's mail seam
(`Context.send_mail`) for rigs without docker, which hands the mail to that sink."""

from __future__ import annotations

import email
import smtplib
import socketserver
from typing import Any

from portal.stack.localmail import NotSent
from portal.stack.settings import DEFAULT_PORTS


# -- SMTP sink ------------------------------------------------------------------------------

class _SmtpHandler(socketserver.StreamRequestHandler):
    server: SmtpSink

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 sink.test ESMTP")
        sender, rcpts = None, []
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            cmd = line.decode(errors="replace").strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 sink.test")
            elif verb == "MAIL":
                sender, rcpts = cmd.split(":", 1)[1].strip().strip("<>"), []
                self.reply("250 ok")
            elif verb == "RCPT":
                rcpts.append(cmd.split(":", 1)[1].strip().strip("<>"))
                self.reply("250 ok")
            elif verb == "DATA":
                self.reply("354 go ahead")
                data = b""
                while True:
                    chunk = self.rfile.readline(65536)
                    if chunk in (b".\r\n", b".\n", b""):
                        break
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                self.server.messages.append({"from": sender, "to": rcpts,
                                             "message": email.message_from_bytes(data)})
                self.reply("250 queued")
            elif verb == "RSET":
                sender, rcpts = None, []
                self.reply("250 ok")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not here")


class SmtpSink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _SmtpHandler)
        self.messages: list[dict[str, Any]] = []

    @property
    def port(self) -> int:
        return self.server_address[1]


def send_to_smtp_port(settings: Any, msg: Any, sender: str, to: str) -> None:
    """Context.send_mail for tests without docker: SMTP to 127.0.0.1 at the port the stack
    settings name for smtp (an SmtpSink), where the appliance hands its mail to postfix."""
    port = {**DEFAULT_PORTS, **settings.ports}["smtp"]
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname=settings.hostname, timeout=10) as smtp:
            smtp.send_message(msg, from_addr=sender, to_addrs=[to])
    except (OSError, smtplib.SMTPException) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise NotSent(f"127.0.0.1:{port}: {reason}") from None
