"""The agent's allowlist of operations: typed functions with checked arguments."""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from portal import __version__


class OpError(Exception):
    """An operation failed in a way the caller should see (code + message, no secrets)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
    nginx_dir: Path = field(default_factory=lambda: _env_path("MAILSTEAD_NGINX_DIR", "/etc/nginx/conf.d"))
    www_dir: Path = field(default_factory=lambda: _env_path("MAILSTEAD_WWW_DIR", "/var/lib/mailstead-www"))
    # ACME HTTP-01 tokens, served by the host nginx on port 80 (portal/certs).
    acme_dir: Path = field(default_factory=lambda: _env_path("MAILSTEAD_ACME_DIR", "/var/lib/mailstead-acme"))
    reload_nginx: bool = field(default_factory=lambda: os.environ.get("MAILSTEAD_RELOAD_NGINX", "1") != "0")


def _env_path(var: str, default: str) -> Path:
    return Path(os.environ.get(var) or default)


@dataclass(frozen=True)
class Param:
    type: type
    required: bool


@dataclass(frozen=True)
class Operation:
    name: str
    func: Callable[..., dict[str, Any]]
    params: Mapping[str, Param]

    def __call__(self, ctx: Context, args: Any) -> dict[str, Any]:
        return self.func(ctx, **validate_args(self, args))


Registry = dict[str, Operation]
REGISTRY: Registry = {}

ALLOWED_TYPES = (str, int, bool, float)


def operation(name: str, registry: Registry = REGISTRY) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register `func(ctx, **typed_args)` as operation `name`.

    Arguments are read from the signature: each parameter after `ctx` needs an
    annotation of str, int, bool or float; a default makes it optional.
    """

    def register(func: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        sig = inspect.signature(func, eval_str=True)
        params: dict[str, Param] = {}
        for pname, p in list(sig.parameters.items())[1:]:
            if p.annotation not in ALLOWED_TYPES:
                raise TypeError(f"{name}: parameter {pname} needs a str/int/bool/float annotation")
            params[pname] = Param(p.annotation, p.default is inspect.Parameter.empty)
        registry[name] = Operation(name, func, params)
        return func

    return register


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
                raise OpError("bad_args", f"missing argument '{pname}' for operation '{op.name}'")
            continue
        value = args[pname]
        # bool is an int in Python; JSON true must not pass as a number and vice versa.
        ok = type(value) is param.type or (param.type is float and type(value) is int)
        if not ok:
            raise OpError("bad_args", f"argument '{pname}' of operation '{op.name}' must be "
                                      f"of type {param.type.__name__}")
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


@operation("status")
def status(ctx: Context) -> dict[str, Any]:
    """OS, docker engine and portal versions."""
    return {
        "os": os_pretty_name(ctx.os_release),
        "docker": docker_version(ctx.docker),
        "portal": ctx.portal_version,
    }
