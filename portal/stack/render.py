"""Render the stack (compose.yaml + every service's config) from settings.

A pure function: the same settings and secrets give byte-identical files.
Writing them is a separate step (`write_tree`), done by the agent.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2

from portal.stack.compose import compose_yaml
from portal.stack.settings import SERVICES, SettingsError, StackSettings

# Where recipes/ is installed in the image; tests use the checkout's.
DEFAULT_RECIPES_DIR = Path("/usr/share/mailstead/recipes")


def recipes_dir() -> Path:
    env = os.environ.get("MAILSTEAD_RECIPES_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    return checkout if (checkout / "postfix" / "templates").is_dir() else DEFAULT_RECIPES_DIR


def one_line(value: object) -> object:
    """Every value a template prints is one line: the line-based formats rendered here
    (postfix, dovecot, rspamd, redis) have no quoting, so a line break or NUL in a value
    would start a directive of its own. Checked values never hold one; this refuses,
    at render time, any that does."""
    if isinstance(value, str) and any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
        raise SettingsError("settings", "a value to be written into a configuration file holds a line break "
                                        "or a control character; set it again")
    return value


@dataclass(frozen=True)
class File:
    content: bytes
    mode: int


def render(settings: StackSettings, secrets: Mapping[str, str], recipes: Path | None = None) -> dict[str, File]:
    """{relative path: File} for the whole stack folder."""
    recipes = recipes or recipes_dir()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(recipes)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=one_line,
    )
    settings = settings.validate()
    variables = settings.as_template_vars() | {"secrets": dict(secrets)}
    files = {"compose.yaml": File(compose_yaml(settings).encode(), 0o644)}
    for service in SERVICES:
        root = recipes / service / "templates"
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(recipes).as_posix()
            out = f"{service}/{path.relative_to(root).as_posix()}"
            if path.suffix == ".j2":
                out = out.removesuffix(".j2")
                content = env.get_template(rel).render(variables | {"service": service}).encode()
            else:
                content = path.read_bytes()
            # The stack folder is 0700 root: these modes only matter inside
            # the containers, whose unprivileged users must read their config.
            mode = 0o755 if out.endswith(".sh") else 0o644
            files[out] = File(content, mode)
    return files


def write_tree(files: Mapping[str, File], target: Path) -> None:
    """Write `files` into a fresh folder `target` (which must not exist)."""
    target.mkdir(mode=0o700, parents=False)
    for rel, f in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.content)
        os.chmod(path, f.mode)
    for d in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755 if d != target else 0o700)


def replace_tree(files: Mapping[str, File], stack_dir: Path) -> Path | None:
    """Make `stack_dir` hold `files`; the old folder is kept as `<stack_dir>.prev`
    (returned, or None on a first deploy) so a failed deploy can roll back."""
    stack_dir.parent.mkdir(parents=True, exist_ok=True)
    nxt = stack_dir.with_name(stack_dir.name + ".next")
    prev = stack_dir.with_name(stack_dir.name + ".prev")
    shutil.rmtree(nxt, ignore_errors=True)
    write_tree(files, nxt)
    had_old = stack_dir.exists()
    if had_old:
        shutil.rmtree(prev, ignore_errors=True)
        stack_dir.rename(prev)
    nxt.rename(stack_dir)
    return prev if had_old else None


def restore_tree(stack_dir: Path, prev: Path) -> None:
    """Put the previous folder back after a failed deploy."""
    failed = stack_dir.with_name(stack_dir.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    if stack_dir.exists():
        stack_dir.rename(failed)
    prev.rename(stack_dir)
