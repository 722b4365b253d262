"""mailstead-agent: the root daemon behind /run/mailstead/agent.sock.

Protocol: one JSON object per line, `{"op": NAME, "args": {...}}`; one JSON line
back, `{"ok": true, "result": {...}}` or
`{"ok": false, "error": {"code": CODE, "message": TEXT}}`. Error codes:
forbidden, bad_request, unknown_op, bad_args, internal, plus any an operation raises.
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
from collections.abc import Collection
from pathlib import Path
from typing import Any, NoReturn

from portal.agent import jobs as _jobs  # noqa: F401  (registers job_start/job_status/job_latest)
from portal.agent import ops
from portal.agent.client import DEFAULT_SOCKET
from portal.admin import privileged as _adminauth  # noqa: F401  (registers admin_* and net_addresses)
from portal.certs import privileged as _certs_ops  # noqa: F401  (registers the certificate operations)
from portal.dns import privileged as _dns_ops  # noqa: F401  (registers the DNS operations)
from portal.stack import privileged as agentops  # noqa: F401  (registers the mail stack operations)
from portal.setup import privileged as _setup_ops  # noqa: F401  (registers setup_deploy, setup_finish, dashboard ops)
from portal.agent import scheduler as _scheduler  # noqa: F401  (registers schedule_*; started in main(), not here)
from portal.checks import privileged as _checks_ops  # noqa: F401  (registers health_run, health_history)
from portal.backup import privileged as _backup_ops  # noqa: F401  (registers backup_configure/run/list/verify/restore/state)
from portal.stack import upgradeops as _upgrade_ops  # noqa: F401  (registers upgrade_check/run/state/configure, job kind upgrade)

log = logging.getLogger("mailstead.agent")

MAX_REQUEST = 64 * 1024
SD_LISTEN_FDS_START = 3


def is_allowed(uid: int, allowed_uids: Collection[int]) -> bool:
    return uid in allowed_uids


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def handle_request(line: bytes, registry: ops.Registry, ctx: ops.Context) -> tuple[dict[str, Any], str]:
    """Answer one request line. Returns (response, op name safe to log)."""
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
    try:
        return {"ok": True, "result": op(ctx, request.get("args", {}))}, name
    except ops.OpError as exc:
        return error(exc.code, exc.message), name
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
            if not is_allowed(uid, self.server.allowed_uids):
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
                response, name = handle_request(line, self.server.registry, self.server.ctx)
                outcome = "ok" if response["ok"] else response["error"]["code"]
                log.info("op=%s uid=%d outcome=%s", name, uid, outcome)
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
    ) -> None:
        self.ctx = ctx
        self.allowed_uids = frozenset(allowed_uids)
        self.registry = ops.REGISTRY if registry is None else registry
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


def prepare_state_db(path: Path, owner: tuple[int, int] | None) -> None:
    """Make state.db, if it is missing, as the web user's file (0660). The portal
    creates and writes it; the agent (root) writes it too, but a file root created
    (the scheduler's job store at the first boot) would be read-only to the portal."""
    if path.exists():
        return
    from portal.web import db

    db.connect(path).close()
    if owner is not None:
        os.chown(path, *owner)
    os.chmod(path, 0o660)


def allowed_uids(users: list[str], uids: list[int], root: bool) -> set[int]:
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
                   help="user allowed to call the agent (repeatable), e.g. mailstead")
    p.add_argument("--allow-uid", action="append", default=[], type=int, metavar="UID",
                   help="uid allowed to call the agent (repeatable)")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    uids = allowed_uids(args.allow_user, args.allow_uid, root=not args.no_root)
    ctx = ops.Context(docker=ops.docker_factory(args.docker_host), os_release=Path(args.os_release))

    path = Path(args.socket)
    activated = systemd_socket()
    if activated is not None:
        sock, owns_path = activated, False
    else:
        group = None
        if args.allow_user and os.geteuid() == 0:
            group = pwd.getpwnam(args.allow_user[0]).pw_gid
        sock, owns_path = bind_socket(path, group), True

    server = AgentServer(str(path), ctx, uids, conn_timeout=args.timeout, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    signal.signal(signal.SIGTERM, _terminate)
    web_user = None
    if args.allow_user and os.geteuid() == 0:
        entry = pwd.getpwnam(args.allow_user[0])
        web_user = (entry.pw_uid, entry.pw_gid)
    prepare_state_db(ctx.state_dir / "state.db", web_user)
    notify_ready()
    if not args.no_scheduler:  # in the background: operations are served meanwhile
        _scheduler.start_in_background(ctx)
    log.info("listening on %s (allowed uids: %s; ops: %s)", path,
             ",".join(map(str, sorted(uids))), ",".join(sorted(server.registry)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        _scheduler.shutdown()
        server.server_close()
        if owns_path:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
