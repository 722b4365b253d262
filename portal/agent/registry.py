"""The agent's allowlist of operations, each declared once.

`@privileged(...)` on a typed function `func(ctx, **args)` (or, for a job,
`func(ctx, progress, **args)`) declares an operation: its argument types (from
the annotations: str, int, bool or float), how long a caller waits for it,
whether it runs as a background job, whether the web process may call it, and
which arguments are secret (never logged or echoed). The decorator returns the
declaration itself, which is also the caller's stub:

    from portal.stack.privileged import mailbox_create
    mailbox_create(address="a@example.org", password=pw)   # web, CLI: over the socket
    mailbox_create.run(ctx, "a@example.org", pw)            # inside the agent, directly

The agent (portal/agent/server.py) checks the caller's uid against the
declaration, the arguments against their types, and runs it; the stub sends
the call as one JSON line and raises AgentError with the error's code, field
and message. Every privileged module is listed once, in PRIVILEGED_MODULES.
"""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from portal import __version__
from portal.core.errors import MailsteadError

if TYPE_CHECKING:
    from email.message import EmailMessage


class OpError(MailsteadError):
    """An operation failed in a way the caller should see: code, field and message
    as data (portal/core/errors.py), never a secret."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, code=code)


class DockerClientLike(Protocol):
    def version(self) -> Mapping[str, Any]: ...
    def close(self) -> None: ...


def docker_factory(base_url: str, timeout: int = 5) -> Callable[[], DockerClientLike]:
    """Make docker clients for `base_url` (e.g. unix:///var/run/docker.sock)."""

    def make() -> DockerClientLike:
        if base_url.startswith("unix://"):
            path = Path(base_url.removeprefix("unix://"))
            # Checked here because docker-py leaks a socket when connect() fails.
            if not path.exists():
                raise OpError("docker_unavailable",
                              f"no docker socket at {path}; is the docker engine running?")
        import docker  # imported lazily: only operations that need docker pay for it

        return docker.DockerClient(base_url=base_url, timeout=timeout)

    return make


@dataclass
class Context:
    """The outside world an operation may touch, injectable for tests."""

    docker: Callable[[], DockerClientLike] = field(
        default_factory=lambda: docker_factory("unix:///var/run/docker.sock")
    )
    os_release: Path = Path("/etc/os-release")
    portal_version: str = __version__
    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("MAILSTEAD_STATE_DIR", "/var/lib/mailstead")))
    # The preloaded container image tars (see recipes/README.md).
    images_dir: Path = field(default_factory=lambda: Path(os.environ.get("MAILSTEAD_IMAGES_DIR",
                                                                          "/usr/lib/mailstead/images")))
    # The host nginx's generated routes (portal/stack/web.py). The environment
    # overrides are for an agent run by the tests (never set on the appliance).
    nginx_dir: Path = field(default_factory=lambda: _env_path("MAILSTEAD_NGINX_DIR", "/var/lib/mailstead/nginx"))
    www_dir: Path = field(default_factory=lambda: _env_path("MAILSTEAD_WWW_DIR", "/var/lib/mailstead-www"))
    # ACME HTTP-01 tokens, served by the host nginx on port 80 (portal/certs).
    acme_dir: Path = field(default_factory=lambda: _env_path("MAILSTEAD_ACME_DIR", "/var/lib/mailstead-acme"))
    reload_nginx: bool = field(default_factory=lambda: os.environ.get("MAILSTEAD_RELOAD_NGINX", "1") != "0")
    # The image update's record and state copy (portal/update/state.py): root's, read here.
    update_dir: Path = field(default_factory=lambda: _env_path("MAILSTEAD_UPDATE_DIR", "/var/lib/mailstead-update"))
    # The public key the feed must be signed with (baked into the image at build time).
    update_keyring: Path = Path("/etc/systemd/import-pubring.gpg")
    # Where the appliance's own mail goes (alerts, the test message): None is the stack's
    # postfix (portal/stack/localmail.py); the unit tests, which have no docker, hand it
    # to an SMTP sink: send_mail(stack settings, message, sender, recipient).
    send_mail: Callable[[Any, EmailMessage, str, str], None] | None = None


def _env_path(var: str, default: str) -> Path:
    return Path(os.environ.get(var) or default)


@dataclass(frozen=True)
class Param:
    type: type
    required: bool


ALLOWED_TYPES = (str, int, bool, float)
DEFAULT_TIMEOUT = 60.0
# Every module that declares operations (imported by load_all: the agent, the CLI's
# listing, the tests). One list, instead of side-effect imports scattered in the server.
PRIVILEGED_MODULES = (
    "portal.agent.registry",
    "portal.agent.jobs",
    "portal.agent.scheduler",
    "portal.admin.privileged",
    "portal.setup.privileged",
    "portal.stack.privileged",
    "portal.dns.privileged",
    "portal.certs.privileged",
    "portal.checks.privileged",
    "portal.backup.privileged",
    "portal.update.privileged",
)


@dataclass(frozen=True, eq=False)
class Operation:
    """One declared operation; calling it is the stub (over the agent socket)."""

    name: str
    func: Callable[..., dict[str, Any]]
    params: Mapping[str, Param]
    timeout: float
    web: bool
    job: bool
    secret: frozenset[str]
    check: Callable[..., dict[str, Any] | None] | None = None
    doc: str = ""

    # -- callers outside the agent ---------------------------------------------------
    def __call__(self, **args: Any) -> dict[str, Any]:
        """Run it in the agent (over the socket); a job's call returns the job."""
        from portal.agent.client import channel

        return channel(self.timeout).call(self.name, **args)

    # -- inside the agent --------------------------------------------------------------
    def run(self, ctx: Context, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call the function directly, in this process (the agent's own callers: the
        scheduler, other operations). A job's function runs here in the caller's
        thread; use `start` to run it as a background job."""
        if self.job:
            return self.func(ctx, kwargs.pop("progress", _quiet), *args, **kwargs)
        return self.func(ctx, *args, **kwargs)

    def start(self, ctx: Context, **args: Any) -> dict[str, Any]:
        """A job operation: start it in the background (or return the one of its kind
        already running) after its check; the job record is returned."""
        from portal.agent import jobs

        if not self.job:
            raise TypeError(f"{self.name} is not a job")
        if self.check is not None:
            args = {**args, **(self.check(ctx, **args) or {})}
        return jobs.start(ctx, self.name, args)

    def invoke(self, ctx: Context, args: Any) -> dict[str, Any]:
        """The server's call: arguments checked against the declaration first."""
        checked = validate_args(self, args)
        if self.job:
            return self.start(ctx, **checked)
        return self.func(ctx, **checked)

    def run_checked(self, ctx: Context, args: Any) -> dict[str, Any]:
        """As the server would, but in this thread: arguments checked, then (a job's check
        first) the function run to its end. For the agent's own callers and tests."""
        checked = validate_args(self, args)
        if self.job and self.check is not None:
            checked = {**checked, **(self.check(ctx, **checked) or {})}
        return self.run(ctx, **checked)

    def loggable(self, args: Any) -> str:
        """The arguments as the agent logs them: secrets replaced, values shortened."""
        if not isinstance(args, dict):
            return ""
        return " ".join(f"{k}={'***' if k in self.secret else shorten(repr(v), 40)}"
                        for k, v in sorted(args.items()) if k in self.params)


def _quiet(_step: str, _detail: str) -> None:
    pass


Registry = dict[str, Operation]
REGISTRY: Registry = {}


def privileged(func: Callable[..., dict[str, Any]] | None = None, *, timeout: float = DEFAULT_TIMEOUT,
               web: bool = False, job: bool = False, secret: tuple[str, ...] = (),
               check: Callable[..., dict[str, Any] | None] | None = None,
               name: str | None = None, registry: Registry | None = None) -> Any:
    """Declare `func` as an agent operation (see the module docstring).

    timeout: seconds a caller waits for the answer (a job answers at once: its
             timeout is for starting it);
    web:     the web process may call it (otherwise only root: the CLI, the scheduler);
    job:     runs in the background; `func(ctx, progress, **args)`; `check(ctx, **args)`
             runs first, in the caller's request, and may refuse or normalize the args;
    secret:  argument names that are never logged or echoed.
    """

    def declare(f: Callable[..., dict[str, Any]]) -> Operation:
        op_name = name or f.__name__
        sig = inspect.signature(f, eval_str=True)
        skip = 2 if job else 1
        params: dict[str, Param] = {}
        for pname, p in list(sig.parameters.items())[skip:]:
            if p.annotation not in ALLOWED_TYPES:
                raise TypeError(f"{op_name}: parameter {pname} needs a str/int/bool/float annotation")
            params[pname] = Param(p.annotation, p.default is inspect.Parameter.empty)
        unknown = set(secret) - set(params)
        if unknown:
            raise TypeError(f"{op_name}: secret names unknown parameters {sorted(unknown)}")
        op = Operation(op_name, f, params, float(timeout), web, job, frozenset(secret), check,
                       inspect.getdoc(f) or "")
        target = REGISTRY if registry is None else registry
        if registry is None and op_name in target and target[op_name].func.__qualname__ != f.__qualname__:
            raise TypeError(f"operation {op_name} is declared twice")
        target[op_name] = op
        return op

    return declare(func) if func is not None else declare


def load_all() -> Registry:
    """Import every privileged module (each declares its operations); the registry."""
    import importlib

    for module in PRIVILEGED_MODULES:
        importlib.import_module(module)
    return REGISTRY


def shorten(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def validate_args(op: Operation, args: Any) -> dict[str, Any]:
    """Check `args` against the operation's parameters; raise OpError('bad_args')
    naming the offending argument (never echoing its value)."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise OpError("bad_args", f"'args' for operation '{op.name}' must be a JSON object")
    for key in args:
        if key not in op.params:
            raise OpError("bad_args", f"unexpected argument '{shorten(str(key))}' for operation '{op.name}'")
    for pname, param in op.params.items():
        if pname not in args:
            if param.required:
                raise OpError("bad_args", f"missing argument '{pname}' for operation '{op.name}'", pname)
            continue
        value = args[pname]
        # bool is an int in Python; JSON true must not pass as a number and vice versa.
        ok = type(value) is param.type or (param.type is float and type(value) is int)
        if not ok:
            raise OpError("bad_args", f"argument '{pname}' of operation '{op.name}' must be "
                                      f"of type {param.type.__name__}", pname)
    return dict(args)


# -- operations ------------------------------------------------------------------

def os_pretty_name(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"unknown ({path}: {exc.strerror})"
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "PRETTY_NAME":
            try:
                parts = shlex.split(value)
            except ValueError:  # unbalanced quotes
                parts = [value.strip().strip("'\"")]
            return " ".join(parts) or "unknown"
    return "unknown (no PRETTY_NAME)"


def docker_version(make_client: Callable[[], DockerClientLike], wait: float = 2.0) -> str:
    """The engine's version, or why it is unavailable. Answers within `wait`
    seconds even when the engine is busy (e.g. loading images at first boot)."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(_ask_docker_version, make_client)
    pool.shutdown(wait=False)
    try:
        return future.result(timeout=wait)
    except FutureTimeout:
        return f"busy: the docker engine did not answer within {wait:g} s"


def _ask_docker_version(make_client: Callable[[], DockerClientLike]) -> str:
    client = None
    try:
        client = make_client()
        return str(client.version()["Version"])
    except Exception as exc:  # any failure to reach the engine is reported, not raised
        reason = exc.message if isinstance(exc, OpError) else " ".join(str(exc).split())
        reason = reason or type(exc).__name__
        return f"unavailable: {shorten(reason, 300)}"
    finally:
        if client is not None:
            client.close()


@privileged(web=True, timeout=5.0)
def status(ctx: Context) -> dict[str, Any]:
    """OS, docker engine and portal versions."""
    return {
        "os": os_pretty_name(ctx.os_release),
        "docker": docker_version(ctx.docker),
        "portal": ctx.portal_version,
    }
