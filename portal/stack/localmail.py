"""Mail the appliance sends itself: health and update alerts, the wizard's test message.

It is handed to postfix inside its container (postfix's `sendmail`, then its pickup
service), not sent to the published port 25. That way rspamd scans it as local mail
(postfix's non_smtpd_milters) and DKIM-signs it with the domain's keys. Over port 25
it would arrive unauthenticated from docker's gateway address, fail the domain's own
SPF and DMARC and score as spam (measured: 10.5 against -0.1 this way).

Only root gets here (docker's socket). The sender and the recipient are checked
addresses and reach sendmail as arguments after `--`; the message goes through the
environment, never through a shell's parsing.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

from portal.stack.accounts import AccountError, check_address

# An alert or test message is a few kB; a docker exec's environment holds far more,
# but nothing the appliance writes needs it.
MAX_BYTES = 256 * 1024
SCRIPT = 'printf "%s" "$MS_MESSAGE" | /usr/sbin/sendmail -i -f "$MS_FROM" -- "$MS_TO"'


class NotSent(Exception):
    """The message did not reach postfix; `reason` says why, for the owner."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def send(ctx: Any, settings: Any, msg: EmailMessage, sender: str, to: str) -> None:
    """Hand `msg` from `sender` to `to` to the stack's postfix (or to ctx.send_mail, the
    tests' SMTP sink). Raises NotSent."""
    try:
        sender, to = check_address(sender, "sender"), check_address(to, "to")
    except AccountError as err:
        raise NotSent(err.message) from None
    hook = getattr(ctx, "send_mail", None)
    if hook is not None:
        hook(settings, msg, sender, to)
        return
    text = msg.as_string()
    if len(text.encode()) > MAX_BYTES:
        raise NotSent(f"the message is over {MAX_BYTES // 1024} kB")
    import docker

    name = f"{settings.project}-postfix"
    try:
        client = ctx.docker()
    except Exception as err:  # noqa: BLE001 - OpError (no socket) or docker's own
        raise NotSent(f"cannot ask docker: {getattr(err, 'message', None) or err}") from None
    try:
        try:
            container = client.containers.get(name)
        except docker.errors.NotFound:
            raise NotSent(f"the mail stack is not deployed (no container {name})") from None
        if container.status != "running":
            raise NotSent(f"{name} is {container.status}, not running")
        code, output = container.exec_run(["/bin/sh", "-c", SCRIPT], demux=True,
                                          environment={"MS_MESSAGE": text, "MS_FROM": sender, "MS_TO": to})
    except docker.errors.DockerException as err:
        raise NotSent(f"docker: {type(err).__name__}: {str(err)[:200]}") from None
    except OSError as err:
        raise NotSent(f"docker: {err.strerror or type(err).__name__}") from None
    finally:
        client.close()
    if code != 0:
        out, err_ = output if isinstance(output, tuple) else (output, b"")
        said = " ".join(((err_ or b"") + (out or b"")).decode(errors="replace").split())[-300:]
        raise NotSent(f"postfix's sendmail exited {code}" + (f": {said}" if said else ""))
