"""The privileged agent, run as a real process on a temporary socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import portal
from portal.agent import registry as ops, server
from portal.agent.client import AgentClient, AgentError
from tests.conftest import OS_PRETTY_NAME, REPO, AgentProcess, retry

StartAgent = Callable[..., AgentProcess]


def raw(sock_path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw request lines on one connection; return the answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        with s.makefile("rwb") as f:
            answers = []
            for line in lines:
                f.write(line)
                f.flush()
                answers.append(json.loads(f.readline()))
            return answers


def error_of(answer: dict[str, Any]) -> tuple[str, str]:
    assert answer["ok"] is False, answer
    return answer["error"]["code"], answer["error"]["message"]


# -- through the real socket --------------------------------------------------------

def test_status(start_agent: StartAgent) -> None:
    agent = start_agent()
    result = AgentClient(str(agent.socket)).call("status")
    assert result["os"] == OS_PRETTY_NAME
    assert result["docker"].startswith("unavailable: ")
    assert result["portal"] == portal.__version__
    assert "op=status uid=%d outcome=ok" % os.getuid() in agent.log_text()


def test_socket_mode(start_agent: StartAgent) -> None:
    agent = start_agent()
    mode = agent.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert mode & 0o777 == 0o660


def test_forbidden_uid_is_refused(start_agent: StartAgent) -> None:
    agent = start_agent("--no-root", allow_uid=65534)
    with pytest.raises(AgentError) as info:
        AgentClient(str(agent.socket)).call("status")
    assert info.value.code == "forbidden"
    assert "outcome=forbidden" in agent.log_text()


def test_forbidden_connection_is_closed(start_agent: StartAgent) -> None:
    agent = start_agent("--no-root", allow_uid=65534)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(agent.socket))
        with s.makefile("rb") as f:
            assert json.loads(f.readline())["error"]["code"] == "forbidden"
            assert f.readline() == b""  # closed without reading a request


def test_unknown_op(start_agent: StartAgent) -> None:
    agent = start_agent()
    with pytest.raises(AgentError) as info:
        AgentClient(str(agent.socket)).call("rm_rf")
    assert info.value.code == "unknown_op"
    assert "rm_rf" in str(info.value)


@pytest.mark.parametrize(("line", "code", "names"), [
    (b'{"op": "status", "args": {"verbose": true}}\n', "bad_args", "'verbose'"),
    (b'{"op": "status", "args": ["x"]}\n', "bad_args", "'args'"),
    (b'{"op": "status", "args": "x"}\n', "bad_args", "'args'"),
    (b'{"op": 5}\n', "bad_request", "'op'"),
    (b'{"args": {}}\n', "bad_request", "'op'"),
    (b'{"op": "status", "sudo": true}\n', "bad_request", "'sudo'"),
    (b'["status"]\n', "bad_request", "JSON object"),
    (b'{"op": "status"\n', "bad_request", "not valid JSON"),
    (b'\xff\xfe\n', "bad_request", "not valid JSON"),
    (b'\n', "bad_request", "not valid JSON"),
])
def test_bad_requests(start_agent: StartAgent, line: bytes, code: str, names: str) -> None:
    agent = start_agent()
    got_code, message = error_of(raw(agent.socket, line)[0])
    assert (got_code, names in message) == (code, True), message


def test_connection_survives_a_bad_request(start_agent: StartAgent) -> None:
    agent = start_agent()
    bad, good = raw(agent.socket, b"not json\n", b'{"op": "status"}\n')
    assert error_of(bad)[0] == "bad_request"
    assert good["ok"] is True


def test_oversized_request(start_agent: StartAgent) -> None:
    agent = start_agent()
    huge = json.dumps({"op": "status", "args": {"x": "a" * (70 * 1024)}}).encode() + b"\n"
    code, message = error_of(raw(agent.socket, huge)[0])
    assert code == "bad_request"
    assert "64 KiB" in message


def test_request_just_under_the_limit_is_read(start_agent: StartAgent) -> None:
    agent = start_agent()
    line = json.dumps({"op": "status", "args": {"x": "a" * (63 * 1024)}}).encode() + b"\n"
    assert error_of(raw(agent.socket, line)[0])[0] == "bad_args"


def test_logs_name_the_op_but_not_argument_values(start_agent: StartAgent) -> None:
    agent = start_agent()
    raw(agent.socket, b'{"op": "status", "args": {"password": "hunter2-secret"}}\n',
        b'{"op": "hunter3-secret-op"}\n')
    log = agent.log_text()
    assert "op=status uid=%d outcome=bad_args" % os.getuid() in log
    assert "outcome=unknown_op" in log
    assert "hunter2" not in log
    assert "hunter3" not in log


def test_idle_connection_times_out(start_agent: StartAgent) -> None:
    agent = start_agent("--timeout", "0.5")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(agent.socket))
        assert s.recv(1) == b""  # the agent hung up


def test_sigterm_stops_cleanly_and_removes_the_socket(start_agent: StartAgent) -> None:
    agent = start_agent()
    assert agent.stop() == 0
    assert not agent.socket.exists()


def test_stale_socket_is_replaced(start_agent: StartAgent) -> None:
    first = start_agent()
    first.proc.kill()
    first.proc.wait()
    assert first.socket.exists()  # SIGKILL leaves the socket behind
    env = {**os.environ, "MAILSTEAD_AGENT_SOCKET": str(first.socket), "MAILSTEAD_SCHEDULER": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "portal.agent.server", "--allow-uid", "0"],
                            env=env, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        retry(lambda: AgentClient(str(first.socket), timeout=2).call("status"), 15, "restarted agent")
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_socket_activation(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    # As systemd does: the socket on fd 3, LISTEN_PID set to the agent's own pid.
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'portal.agent.server', *sys.argv[2:]])"
    )
    fd = listener.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, str(fd), "--socket", str(path), "--allow-uid", str(os.getuid())],
        pass_fds=(fd,), cwd=REPO, stderr=subprocess.PIPE, env={**os.environ, "MAILSTEAD_SCHEDULER": "0"},
    )
    listener.close()
    try:
        result = AgentClient(str(path), timeout=10).call("status")
        assert result["portal"] == portal.__version__
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert path.exists()  # systemd owns an activated socket: the agent leaves it alone


# -- client --------------------------------------------------------------------------

def test_client_without_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        AgentClient(str(tmp_path / "nothing.sock"), timeout=1).call("status")
    assert info.value.code == "unavailable"
    assert "is mailstead-agent running" in str(info.value)


def test_client_times_out(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(1)
        with pytest.raises(AgentError) as info:
            AgentClient(str(path), timeout=0.3).call("status")
    assert info.value.code == "timeout"


def test_cli_status(start_agent: StartAgent) -> None:
    agent = start_agent()
    out = subprocess.run([sys.executable, "-m", "portal.cli", "--socket", str(agent.socket), "status", "--versions"],
                         check=True, capture_output=True, text=True, cwd=REPO).stdout
    assert json.loads(out)["os"] == OS_PRETTY_NAME


def test_cli_without_agent(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "portal.cli", "--socket", str(tmp_path / "x.sock"), "status"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "is mailstead-agent running" in proc.stderr


# -- pure functions --------------------------------------------------------------------

def test_is_allowed() -> None:
    assert server.is_allowed(998, {0, 998})
    assert server.is_allowed(0, {0, 998})
    assert not server.is_allowed(1000, {0, 998})
    assert not server.is_allowed(0, {65534})


def test_allowed_uids() -> None:
    assert server.allowed_uids([], [5], root=True) == {0, 5}
    assert server.allowed_uids([], [5], root=False) == {5}
    assert server.allowed_uids(["nobody"], [], root=False) == {65534}
    with pytest.raises(SystemExit, match="no such user"):
        server.allowed_uids(["no-such-user-here"], [], root=True)


@pytest.fixture
def typed_registry() -> ops.Registry:
    registry: ops.Registry = {}

    @ops.privileged(registry=registry)
    def typed(ctx: ops.Context, name: str, count: int, force: bool = False, ratio: float = 1.0) -> dict[str, Any]:
        return {"name": name, "count": count, "force": force, "ratio": ratio}

    return registry


@pytest.mark.parametrize(("args", "message"), [
    ({}, "missing argument 'name'"),
    ({"name": "x"}, "missing argument 'count'"),
    ({"name": 1, "count": 1}, "argument 'name' of operation 'typed' must be of type str"),
    ({"name": "x", "count": "1"}, "argument 'count' of operation 'typed' must be of type int"),
    ({"name": "x", "count": True}, "argument 'count' of operation 'typed' must be of type int"),
    ({"name": "x", "count": 1.5}, "argument 'count' of operation 'typed' must be of type int"),
    ({"name": "x", "count": 1, "force": 1}, "argument 'force' of operation 'typed' must be of type bool"),
    ({"name": "x", "count": 1, "ratio": "2"}, "argument 'ratio' of operation 'typed' must be of type float"),
    ({"name": "x", "count": 1, "extra": 1}, "unexpected argument 'extra'"),
    ([], "'args' for operation 'typed' must be a JSON object"),
])
def test_validate_args_refuses(typed_registry: ops.Registry, args: Any, message: str) -> None:
    with pytest.raises(ops.OpError) as info:
        ops.validate_args(typed_registry["typed"], args)
    assert info.value.code == "bad_args"
    assert message in str(info.value)


def test_validate_args_accepts(typed_registry: ops.Registry) -> None:
    op = typed_registry["typed"]
    assert op.invoke(ops.Context(), {"name": "x", "count": 2, "ratio": 3}) == {
        "name": "x", "count": 2, "force": False, "ratio": 3}


def test_untyped_operation_is_rejected_at_registration() -> None:
    with pytest.raises(TypeError):
        @ops.privileged(registry={})
        def bad(ctx: ops.Context, anything: list) -> dict[str, Any]:  # type: ignore[type-arg]
            return {}


def test_handle_request_reports_internal_errors_without_details() -> None:
    registry: ops.Registry = {}

    @ops.privileged(registry=registry)
    def boom(ctx: ops.Context) -> dict[str, Any]:
        raise RuntimeError("secret detail")

    answer, name = server.handle_request(b'{"op": "boom"}', registry, ops.Context())
    assert name == "boom"
    code, message = error_of(answer)
    assert code == "internal"
    assert "secret detail" not in message


def test_docker_version_with_real_client_and_no_engine(tmp_path: Path) -> None:
    make = ops.docker_factory(f"unix://{tmp_path}/docker.sock", timeout=2)
    assert ops.docker_version(make) == (
        f"unavailable: no docker socket at {tmp_path}/docker.sock; is the docker engine running?")


def test_docker_version_from_client() -> None:
    class FakeEngine:
        closed = False

        def version(self) -> dict[str, str]:
            return {"Version": "26.1.5+dfsg1"}

        def close(self) -> None:
            FakeEngine.closed = True

    assert ops.docker_version(FakeEngine) == "26.1.5+dfsg1"
    assert FakeEngine.closed


@pytest.mark.parametrize(("text", "expected"), [
    ('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\n', "Debian GNU/Linux 13 (trixie)"),
    ("PRETTY_NAME='Ubuntu 24.04 LTS'\n", "Ubuntu 24.04 LTS"),
    ("PRETTY_NAME=Plain\n", "Plain"),
    ('NAME="x"\n', "unknown (no PRETTY_NAME)"),
])
def test_os_pretty_name(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "os-release"
    path.write_text(text)
    assert ops.os_pretty_name(path) == expected


def test_os_pretty_name_missing_file(tmp_path: Path) -> None:
    assert ops.os_pretty_name(tmp_path / "nope").startswith("unknown (")


def test_status_when_docker_socket_is_dead(start_agent: StartAgent, tmp_path: Path) -> None:
    dead = tmp_path / "dead-docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dead))  # a socket file nobody listens on, as after dockerd crashed
    agent = start_agent("--docker-host", f"unix://{dead}")
    result = AgentClient(str(agent.socket)).call("status")
    assert result["docker"].startswith("unavailable: ")
    assert result["os"] == OS_PRETTY_NAME


def test_agent_starts_without_heavy_libraries():
    """The agent imports flask, acme, OpenSSL and dnspython only when an operation
    needs them: under emulation each one costs seconds before the first answer."""
    code = ("import sys, portal.agent.server; from portal.agent.registry import load_all; load_all(); "
            "print(sorted(m for m in ('flask', 'acme', 'OpenSSL', 'dns.resolver', 'dns.query', 'josepy', 'qrcode', 'apscheduler', 'sqlalchemy', 'docker') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_notify_ready_tells_systemd(tmp_path, monkeypatch):
    import socket as socket_mod

    from portal.agent.server import notify_ready

    path = tmp_path / "notify"
    listener = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
    listener.bind(str(path))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        notify_ready()
        assert listener.recv(64) == b"READY=1"
    finally:
        listener.close()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify_ready()  # not under systemd: nothing to do


def test_the_agents_state_is_roots_and_a_folder_it_did_not_make_is_refused(tmp_path):
    """The state folder is root's 0755 (an old one, 1770 root:mailstead, is tightened), its
    secrets 0700; a sub-folder someone else made first (a pre-creation attack) or a symlink
    in its place is refused, never adopted."""
    import stat

    from portal.core.errors import UnsafePathError
    from portal.core.layout import StateLayout
    from portal.core import store

    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o1770)
    layout = StateLayout(state)
    layout.prepare()
    assert stat.S_IMODE(state.stat().st_mode) == 0o755
    assert stat.S_IMODE((state / "secrets").stat().st_mode) == 0o700
    conn = store.connect(layout)
    conn.close()
    st = (state / "state.db").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o600)

    other = tmp_path / "other"
    other.mkdir()
    (other / "jobs").mkdir()
    os.chown(other / "jobs", 65534, 65534)  # made first by another user
    with pytest.raises(UnsafePathError, match="belongs to uid 65534"):
        StateLayout(other).prepare()
    third = tmp_path / "third"
    third.mkdir()
    (third / "secrets").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="symlink"):
        StateLayout(third).prepare()


def test_the_web_user_may_call_only_the_operations_declared_for_it(tmp_path):
    """A web caller (--allow-user / web uid) gets web=True operations only; root-only ones
    (loading images, upgrades from a folder, the lockout's unlock...) are forbidden."""
    from tests.support.agent import ThreadAgent

    agent = ThreadAgent(tmp_path / "state", tmp_path / "agent.sock", web_uids=(os.getuid(),), root_uids=())
    try:
        assert agent.call("status")["portal"]
        for name, args in (("stack_load_images", {}), ("admin_unlock", {}), ("upgrade_run", {"source": "/tmp"}),
                           ("cert_renew", {}), ("net_check", {}), ("alerts_private", {"allow": True})):
            with pytest.raises(AgentError) as err:
                agent.call(name, **args)
            assert err.value.code == "forbidden" and "root only" in err.value.message, name
    finally:
        agent.stop()
    registry = ops.load_all()
    root_only = sorted(n for n, op in registry.items() if not op.web)
    assert root_only == ["admin_unlock", "alerts_private", "cert_renew", "net_check", "settings_set",
                         "stack_load_images", "update_recover", "update_trial", "update_window",
                         "upgrade_run"], root_only


def test_each_operation_is_declared_once_with_its_secrets():
    """Every declared secret is a parameter; every password-like parameter is declared secret."""
    for name, op in ops.load_all().items():
        for param in op.params:
            if any(word in param for word in ("password", "secret", "token", "code")) and param != "totp_code":
                assert param in op.secret or name == "setup_token_check", (name, param)
        assert op.timeout > 0 and op.doc, name
