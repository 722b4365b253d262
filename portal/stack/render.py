"""Render the stack (compose.yaml + every service's config) from settings.

A pure function: the same settings and secrets give byte-identical files.
Writing them is a separate step (`write_tree`), done by the agent.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2

from portal.core import safefs
from portal.core.errors import UnsafePathError
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
    """Write `files` into a fresh folder `target` (which must not exist), every folder
    and file through the safe-write helper (nothing followed, modes set on descriptors)."""
    safefs.new_dir(target, 0o700)
    for rel, f in files.items():
        path = target / rel
        for parent in reversed(path.relative_to(target).parents[:-1]):
            safefs.ensure_dir(target / parent, 0o755)
        safefs.write_bytes(path, f.content, f.mode)


def tree_holds(files: Mapping[str, File], target: Path) -> bool:
    """Whether the folder `target` holds exactly `files`: the same paths, contents and
    modes, and nothing else (a symlink or anything but a plain file makes it differ)."""
    if not _own_folder(target):
        return False
    seen = set()
    for folder, _dirs, names in os.walk(target):  # symlinked folders are not followed
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(target).as_posix()
            want, st = files.get(rel), safefs.lstat(path)
            if want is None or st is None or not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != want.mode:
                return False
            if safefs.read_bytes(path, owner_uid=os.geteuid()) != want.content:
                return False
            seen.add(rel)
    return seen == set(files)


def _own_folder(path: Path) -> bool:
    """True if `path` is a folder this process made; False if nothing is there;
    UnsafePathError if it is a symlink, a file or another user's folder (never adopted)."""
    st = safefs.lstat(path)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} is not a folder of the agent's (it is a symlink, a file or uid "
                              f"{st.st_uid}'s); as root, check it and remove it if you did not make it")
    return True


def replace_tree(files: Mapping[str, File], stack_dir: Path) -> Path | None:
    """Make `stack_dir` hold `files`; the old folder is kept as `<stack_dir>.prev`
    (returned, or None on a first deploy) so a failed deploy can roll back. The new
    tree is written under a random name first, then renamed into place."""
    with safefs.open_dir(stack_dir.parent, create=True):  # the state folder (0755 if missing)
        pass
    had_old = _own_folder(stack_dir)
    nxt = stack_dir.with_name(f".{stack_dir.name}.next.{secrets.token_hex(6)}.tmp")
    prev = stack_dir.with_name(stack_dir.name + ".prev")
    try:
        write_tree(files, nxt)
        if had_old:
            safefs.remove_tree(prev)
            safefs.rename(stack_dir, prev)
        safefs.rename(nxt, stack_dir)
    except BaseException:
        safefs.remove_tree(nxt)
        raise
    return prev if had_old else None


def restore_tree(stack_dir: Path, prev: Path) -> None:
    """Put the previous folder back after a failed deploy."""
    _own_folder(prev)
    failed = stack_dir.with_name(stack_dir.name + ".failed")
    safefs.remove_tree(failed)
    if safefs.lstat(stack_dir) is not None:
        safefs.rename(stack_dir, failed)
    safefs.rename(prev, stack_dir)
