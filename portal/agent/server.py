"""mailstead-agent: the root daemon behind /run/mailstead/agent.sock.

Protocol: one JSON object per line, `{"op": NAME, "args": {...}}`; one JSON line
back, `{"ok": true, "result": {...}}` or
`{"ok": false, "error": {"code": CODE, "field": FIELD or null, "message": TEXT}}`.
Error codes: forbidden, bad_request, unknown_op, bad_args, internal, plus any an
operation raises.

Callers: root (the CLI, the scheduler's own process) may call every operation;
the web user (--allow-user) only those declared `web=True`. Operations are
declared once (portal/agent/registry.py) and loaded from PRIVILEGED_MODULES.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import signal
import socket
import socketserver
import stat
import struct
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NoReturn

from portal.agent import registry as ops
from portal.agent.client import DEFAULT_SOCKET
from portal.core.errors import MailsteadError
from portal.core.layout import StateLayout
from portal.core import store

log = logging.getLogger("mailstead.agent")

MAX_REQUEST = 64 * 1024
SD_LISTEN_FDS_START = 3


def is_allowed(uid: int, allowed_uids: Collection[int]) -> bool:
    return uid in allowed_uids


ROOT, WEB = "root", "web"


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "field": field, "message": message}}


def handle_request(line: bytes, registry: ops.Registry, ctx: ops.Context,
                   caller: str = ROOT) -> tuple[dict[str, Any], str]:
    """Answer one request line from `caller` (ROOT or WEB). Returns (response, what to log:
    the op name and its arguments with secrets masked)."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return error("bad_request", "request is not valid JSON (send one JSON object per line)"), "-"
    if not isinstance(request, dict):
        return error("bad_request", "request must be a JSON object with 'op' and 'args'"), "-"
    extra = sorted(set(request) - {"op", "args"})
    if extra:
        return error("bad_request", f"unexpected request field '{ops.shorten(str(extra[0]))}'"), "-"
    name = request.get("op")
    if not isinstance(name, str):
        return error("bad_request", "'op' must be a string"), "-"
    op = registry.get(name)
    if op is None:
        return error("unknown_op", f"unknown operation '{ops.shorten(name)}'"), "?"
    if caller != ROOT and not op.web:
        return error("forbidden", f"operation '{name}' is for root only (the mailstead command on the "
                                  "appliance's console), not for the web portal"), name
    logged = f"{name} {op.loggable(request.get('args'))}".rstrip()
    try:
        return {"ok": True, "result": op.invoke(ctx, request.get("args", {}))}, logged
    except MailsteadError as exc:
        return error(exc.code, exc.message, exc.field), logged
    except Exception:
        log.exception("operation %s failed", name)
        return error("internal", f"operation '{name}' failed; see the agent log (journalctl -u mailstead-agent)"), name


class Handler(socketserver.StreamRequestHandler):
    server: AgentServer

    def setup(self) -> None:
        self.request.settimeout(self.server.conn_timeout)
        super().setup()

    def send(self, response: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
        self.wfile.flush()

    def handle(self) -> None:
        uid = peer_uid(self.request)
        try:
            if is_allowed(uid, self.server.allowed_uids):
                caller = ROOT
            elif is_allowed(uid, self.server.web_uids):
                caller = WEB
            else:
                log.warning("uid=%d outcome=forbidden", uid)
                self.send(error("forbidden", f"uid {uid} may not use the mailstead agent"))
                return
            while True:
                line = self.rfile.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST:
                    log.warning("uid=%d outcome=bad_request (oversized)", uid)
                    self.send(error("bad_request", f"request larger than {MAX_REQUEST // 1024} KiB"))
                    return  # the rest of the line is unread: the stream cannot be resynchronised
                response, logged = handle_request(line, self.server.registry, self.server.ctx, caller)
                outcome = "ok" if response["ok"] else response["error"]["code"]
                log.info("op=%s uid=%d outcome=%s", logged, uid, outcome)
                self.send(response)
        except TimeoutError:
            log.info("uid=%d connection timed out", uid)
        except (BrokenPipeError, ConnectionResetError):
            log.info("uid=%d client went away", uid)


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(
        self,
        address: str,
        ctx: ops.Context,
        allowed_uids: Collection[int],
        registry: ops.Registry | None = None,
        conn_timeout: float = 30.0,
        bind_and_activate: bool = True,
        web_uids: Collection[int] = (),
    ) -> None:
        self.ctx = ctx
        self.allowed_uids = frozenset(allowed_uids)
        self.web_uids = frozenset(web_uids) - self.allowed_uids
        self.registry = ops.load_all() if registry is None else registry
        self.conn_timeout = conn_timeout
        super().__init__(address, Handler, bind_and_activate=bind_and_activate)


def systemd_socket() -> socket.socket | None:
    """The socket systemd passed us (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def notify_ready() -> None:
    """Tell systemd (Type=notify) that operations are served now: the portal
    starts after this, so its first page never waits for the agent's start."""
    addr = os.environ.pop("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        sock.sendall(b"READY=1")


def bind_socket(path: Path, group: int | None) -> socket.socket:
    """Bind a fresh unix socket at `path`, mode 0660 (group `group` if given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SystemExit(f"mailstead-agent: {path} exists and is not a socket; remove it")
        path.unlink()  # stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # nobody else can connect before the chmod below
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if group is not None:
        os.chown(path, 0, group)
    os.chmod(path, 0o660)
    sock.listen(16)
    return sock


def allowed_uids(users: list[str], uids: list[int], root: bool) -> set[int]:
    """Every uid in `uids` and of the named `users`, plus root's unless `root` is False."""
    result = set(uids)
    for user in users:
        try:
            result.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise SystemExit(f"mailstead-agent: --allow-user {user}: no such user") from None
    if root:
        result.add(0)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mailstead-agent", description="Mailstead privileged agent")
    p.add_argument("--socket", default=os.environ.get("MAILSTEAD_AGENT_SOCKET", DEFAULT_SOCKET),
                   help="unix socket path (env MAILSTEAD_AGENT_SOCKET; default %(default)s)")
    p.add_argument("--allow-user", action="append", default=[], metavar="NAME",
                   help="the web user: may call the operations declared for the web (repeatable), "
                        "e.g. mailstead")
    p.add_argument("--web-uid", action="append", default=[], type=int, metavar="UID",
                   help="uid that may call the web's operations, like --allow-user (repeatable)")
    p.add_argument("--allow-uid", action="append", default=[], type=int, metavar="UID",
                   help="uid allowed to call every operation, as root may (repeatable)")
    p.add_argument("--no-root", action="store_true",
                   help="do not implicitly allow uid 0 (for tests)")
    p.add_argument("--docker-host",
                   default=os.environ.get("MAILSTEAD_DOCKER_HOST", "unix:///var/run/docker.sock"),
                   help="docker engine URL (env MAILSTEAD_DOCKER_HOST; default %(default)s)")
    p.add_argument("--os-release", default=os.environ.get("MAILSTEAD_OS_RELEASE", "/etc/os-release"),
                   help="os-release file to report (env MAILSTEAD_OS_RELEASE)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="per-connection timeout in seconds (default %(default)s)")
    p.add_argument("--no-scheduler", action="store_true",
                   default=os.environ.get("MAILSTEAD_SCHEDULER", "1") == "0",
                   help="do not run the maintenance jobs (env MAILSTEAD_SCHEDULER=0; for tests)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _terminate(_signum: int, _frame: object) -> NoReturn:
    raise SystemExit(0)


def main(argv: list[str] | None = None, *, send_mail: Callable[..., None] | None = None) -> int:
    """`send_mail`: tests only (Context.send_mail), to catch the appliance's mail without docker."""
    signal.signal(signal.SIGTERM, _terminate)  # first: a stop during the start is a clean exit
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    uids = allowed_uids([], args.allow_uid, root=not args.no_root)
    web = allowed_uids(args.allow_user, args.web_uid, root=False)
    ctx = ops.Context(docker=ops.docker_factory(args.docker_host), os_release=Path(args.os_release),
                      send_mail=send_mail)
    layout = StateLayout(ctx.state_dir)
    layout.prepare()  # root's folders, refusing any a symlink or another user's
    dropped = store.drop_legacy_tables(layout)
    if dropped:
        log.warning("dropped the unused table(s) %s from state.db (never read)", ", ".join(dropped))

    registry = ops.load_all()  # before the socket answers: connectable means ready

    path = Path(args.socket)
    activated = systemd_socket()
    if activated is not None:
        sock, owns_path = activated, False
    else:
        group = None
        if args.allow_user and os.geteuid() == 0:
            group = pwd.getpwnam(args.allow_user[0]).pw_gid
        sock, owns_path = bind_socket(path, group), True

    server = None
    try:
        server = AgentServer(str(path), ctx, uids, registry=registry, conn_timeout=args.timeout,
                             bind_and_activate=False, web_uids=web)
        server.socket.close()
        server.socket = sock
        notify_ready()
        if not args.no_scheduler:  # in the background: operations are served meanwhile
            from portal.agent import scheduler

            scheduler.start_in_background(ctx)
        log.info("listening on %s (root uids: %s; web uids: %s; %d operations, %d for the web)", path,
                 ",".join(map(str, sorted(uids))), ",".join(map(str, sorted(server.web_uids))) or "-",
                 len(server.registry), sum(op.web for op in server.registry.values()))
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        from portal.agent import scheduler

        scheduler.shutdown()
        if server is not None:
            server.server_close()
        else:
            sock.close()
        if owns_path:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
