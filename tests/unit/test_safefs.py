"""The safe-write helper (portal/core/safefs.py) and every root write that goes through it.

The first half checks the helper itself. The second half replays the attacks of
issue 14 against the agent's own code, as the web user would have prepared them in
a state folder it could write to (1770 root:mailstead before issue 14):

- a symlink at a fixed temporary name the agent used to write (`.stack-images.json.tmp`,
  `.upgrade-state.json.tmp`, `.<selector>.key.<pid>.tmp`, ...) pointing at
  accounts/accounts.db: the operation runs, and the accounts database is untouched;
- a folder the agent makes later (`upgrade/`, the stack folder, `secrets/dkim`, ...)
  made first by another user (uid 65534 here): refused, never adopted (not chmodded,
  chowned or written into);
- a symlink in place of a state file: refused or replaced, never followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from portal.agent import registry as ops
from portal.core import safefs
from portal.core.errors import MailsteadError, UnsafePathError
from tests.support.statedb import write_settings

ops.load_all()
NOBODY = 65534
DOMAIN = "example.test"


# -- the helper --------------------------------------------------------------------------

def test_chmod_changes_files_and_folders_and_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("x")
    victim.chmod(0o644)
    (tmp_path / "folder").mkdir(mode=0o777)
    safefs.chmod(tmp_path / "folder", 0o755)
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        safefs.chmod(tmp_path / "link", 0o666)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    os.mkfifo(tmp_path / "fifo", 0o666)
    with pytest.raises(UnsafePathError, match="neither a file nor a folder"):
        safefs.chmod(tmp_path / "fifo", 0o600)


def test_a_dumped_volume_is_made_restorable_through_descriptors(tmp_path):
    """backup/contents.normalize_volume: hard links become files of their own (same bytes,
    owner and times, unsafe bits off), write-for-everyone comes off, symlinks leave."""
    from portal.backup.contents import normalize_volume

    root = tmp_path / "vol"
    (root / "cur").mkdir(parents=True)
    message = root / "cur" / "1.eml"
    message.write_bytes(b"Subject: hi\n\nbody\n")
    os.chown(message, 1234, 1234)
    os.chmod(message, 0o4666)
    os.utime(message, ns=(1_000_000_000, 2_000_000_000))
    os.link(message, root / "cur" / "2.eml")
    (root / "open").mkdir(mode=0o777)
    os.chmod(root / "open", 0o777)
    (root / "cur" / "escape").symlink_to("/etc/shadow")
    skipped, changed = [], []
    normalize_volume(root, "volumes/mail", skipped, changed)
    assert skipped == ["volumes/mail/cur/escape"] and not (root / "cur" / "escape").exists()
    assert sorted(changed) == ["volumes/mail/cur/1.eml", "volumes/mail/cur/2.eml", "volumes/mail/open"]
    for name in ("1.eml", "2.eml"):
        st = os.lstat(root / "cur" / name)
        assert st.st_nlink == 1 and (st.st_uid, st.st_gid) == (1234, 1234), name
        assert stat.S_IMODE(st.st_mode) == 0o664 and st.st_mtime_ns == 2_000_000_000, name
        assert (root / "cur" / name).read_bytes() == b"Subject: hi\n\nbody\n"
    assert stat.S_IMODE((root / "open").stat().st_mode) == 0o775


def test_write_bytes_replaces_a_symlink_at_the_target_and_never_follows_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (tmp_path / "state.json").symlink_to(victim)
    safefs.write_bytes(tmp_path / "state.json", b"{}\n", 0o640)
    assert victim.read_bytes() == b"precious\n"
    st = os.lstat(tmp_path / "state.json")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "victim"]  # no temporary left


def test_temporary_names_are_random_and_made_with_o_excl(tmp_path, monkeypatch):
    """Whatever name an attacker plants a symlink at, the helper's temporary file is a
    new file it made itself (O_EXCL): a planted name that collides is skipped."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    names = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(safefs.secrets, "token_hex", lambda _n: next(names))
    (tmp_path / ".pin.json.aaaaaaaaaaaa.tmp").symlink_to(victim)
    safefs.write_bytes(tmp_path / "pin.json", b"new\n")
    assert victim.read_bytes() == b"precious\n" and (tmp_path / "pin.json").read_bytes() == b"new\n"
    assert os.path.islink(tmp_path / ".pin.json.aaaaaaaaaaaa.tmp")  # the planted link itself is left alone


def test_a_symlink_anywhere_in_the_path_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    for call in (lambda: safefs.write_bytes(tmp_path / "link" / "f", b"x"),
                 lambda: safefs.read_bytes(tmp_path / "link" / "f"),
                 lambda: safefs.ensure_dir(tmp_path / "link" / "sub"),
                 lambda: safefs.ensure_dir(tmp_path / "link")):
        with pytest.raises(UnsafePathError, match="symlink"):
            call()
    assert list(real.iterdir()) == []


def test_write_new_never_replaces_a_file_or_a_symlink(tmp_path):
    assert safefs.write_new(tmp_path / "key", b"first", 0o600) is True
    assert safefs.write_new(tmp_path / "key", b"second", 0o600) is False
    assert (tmp_path / "key").read_bytes() == b"first"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert safefs.write_new(tmp_path / "dangling", b"x") is False
    assert not (tmp_path / "nowhere").exists()


def test_ensure_dir_refuses_another_users_folder_and_leaves_it_as_it_was(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chmod(theirs, 0o777)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
        safefs.ensure_dir(theirs, 0o700)
    st = os.stat(theirs)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o777)  # not adopted: not chmodded, not chowned
    made = safefs.ensure_dir(tmp_path / "mine", 0o700)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700


def test_reading_refuses_a_symlink_a_non_file_and_another_owner(tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    with pytest.raises(UnsafePathError, match="is a symlink"):
        safefs.read_bytes(tmp_path / "l")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        safefs.read_bytes(tmp_path)
    os.chown(tmp_path / "f", NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
        safefs.read_bytes(tmp_path / "f", owner_uid=os.geteuid())
    assert safefs.read_json(tmp_path / "missing.json", {"d": 1}) == {"d": 1}


def test_copy_tree_copies_files_and_modes_and_refuses_a_symlink(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "a.sh", 0o755)
    (src / "sub" / "b.conf").write_bytes(b"b\n")
    safefs.copy_tree(src, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.conf").read_bytes() == b"b\n"
    assert stat.S_IMODE(os.stat(tmp_path / "copy" / "a.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "copy").st_mode) == 0o700
    (src / "sub" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePathError, match="symlink or a special file"):
        safefs.copy_tree(src, tmp_path / "copy2")
    with pytest.raises(FileExistsError):
        safefs.copy_tree(src, tmp_path / "copy")  # never into a folder that is there already


def test_remove_tree_removes_a_symlink_in_place_of_the_folder_not_what_it_points_at(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_bytes(b"x")
    (tmp_path / "work").symlink_to(keep)
    safefs.remove_tree(tmp_path / "work")
    assert not os.path.lexists(tmp_path / "work") and (keep / "file").exists()
    safefs.remove_tree(tmp_path / "missing")


def test_lock_refuses_a_symlink_and_does_not_wait_when_asked_not_to(tmp_path):
    (tmp_path / "x.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(UnsafePathError):
        with safefs.lock(tmp_path / "x.lock"):
            pass
    assert not (tmp_path / "victim").exists()
    with safefs.lock(tmp_path / "y.lock"):
        with pytest.raises(BlockingIOError):
            with safefs.lock(tmp_path / "y.lock", blocking=False):
                pass
    assert stat.S_IMODE(os.stat(tmp_path / "y.lock").st_mode) == 0o600


def test_replace_symlink_switches_in_one_rename_and_refuses_a_real_file(tmp_path):
    safefs.replace_symlink(tmp_path / "live", "archive/1")
    safefs.replace_symlink(tmp_path / "live", "archive/2")
    assert os.readlink(tmp_path / "live") == "archive/2"
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(UnsafePathError, match="not a symlink"):
        safefs.replace_symlink(tmp_path / "file", "archive/2")


# -- the attacks, replayed against the agent's code -----------------------------------------

@pytest.fixture
def state(tmp_path):
    state = tmp_path / "state"
    write_settings(state / "state.db", {"domain": DOMAIN, "mail_host": f"mail.{DOMAIN}"})
    return state


@pytest.fixture
def victim(state):
    """accounts/accounts.db with a domain in it: what a planted symlink points at."""
    from portal.stack.accounts import Accounts

    Accounts(state / "accounts" / "accounts.db").add_domain(DOMAIN)
    path = state / "accounts" / "accounts.db"
    before = (path.read_bytes(), os.stat(path).st_mode, os.stat(path).st_mtime_ns)

    def untouched():
        st = os.stat(path)
        assert (path.read_bytes(), st.st_mode, st.st_mtime_ns) == before, "accounts.db was changed"

    untouched.path = path
    return untouched


def make_ctx(state: Path, tmp: Path) -> ops.Context:
    from tests.unit.test_upgrade import mkosi_folder

    return ops.Context(docker=ops.docker_factory(f"unix://{tmp}/no-docker.sock"), state_dir=state,
                       images_dir=mkosi_folder(tmp / "shipped"), portal_version="0.1.0",
                       nginx_dir=tmp / "nginx", www_dir=tmp / "www", acme_dir=tmp / "acme", reload_nginx=False)


def ca_pem() -> str:
    from tests.unit.test_certs_support import CA, pem

    return pem(CA().cert).decode()


def _write_pin(ctx):
    from tests.unit.test_upgrade import OLD_IDS
    from portal.stack import pins

    pins.write_pin(ctx.state_dir, "0.1.0", OLD_IDS)


def _upgrade_record(ctx):
    from portal.stack import upgrade

    upgrade.record(ctx.state_dir, "last_upgrade", {"at": "2026-12-07T04:00:00+00:00", "ok": True})


def _acme_configure(ctx):
    ops.REGISTRY["acme_configure"].run_checked(ctx, {"directory": "https://ca.example.test/dir",
                                                     "ca_bundle_pem": ca_pem()})


def _dns_configure_push(ctx):
    import base64

    ops.REGISTRY["dns_configure_push"].run_checked(ctx, {
        "server": "192.0.2.53", "key_name": "mailstead-key", "secret": base64.b64encode(bytes(32)).decode()})


def _dkim_keys(ctx):
    from portal.stack.dkim import ensure_keys

    ensure_keys(ctx.state_dir / "secrets" / "dkim", ("mailstead-rsa", "mailstead-ed"))


def _install_cert(ctx):
    from portal.certs.store import install
    from tests.unit.test_certs_support import CA, NAMES, NOW

    (ctx.state_dir / "tls").mkdir(exist_ok=True)
    chain, key = CA().leaf()
    install(ctx.state_dir / "tls", chain, key, NAMES, now=NOW)


TEMP_NAME_ATTACKS = [
    # (the fixed name the agent used to write, the operation that wrote it)
    (".stack-images.json.tmp", _write_pin),
    (".upgrade-state.json.tmp", _upgrade_record),
    (".acme-ca-bundle.pem.{pid}.tmp", _acme_configure),
    ("secrets/.rfc2136.key.{pid}.tmp", _dns_configure_push),
    ("secrets/dkim/.mailstead-rsa.key.{pid}.tmp", _dkim_keys),
    ("tls/.live.{pid}.tmp", _install_cert),
]


@pytest.mark.parametrize("name, operation", TEMP_NAME_ATTACKS, ids=[n for n, _ in TEMP_NAME_ATTACKS])
def test_a_symlink_at_an_old_fixed_temporary_name_is_never_followed(state, tmp_path, victim, name, operation):
    link = state / name.format(pid=os.getpid())
    link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    link.symlink_to(victim.path)
    operation(make_ctx(state, tmp_path))
    victim()


def _keep_previous(ctx):
    from portal.stack import upgrade
    from portal.stack.pins import Pin
    from tests.unit.test_upgrade import OLD_IDS

    stack = ctx.state_dir / "stack"
    stack.mkdir(mode=0o700, exist_ok=True)
    (stack / "compose.yaml").write_text("services: {}\n")
    upgrade.keep_previous(ctx.state_dir, Pin("0.1.0", OLD_IDS, "pin file"), stack)


def _render_stack(ctx):
    from portal.stack.render import render, replace_tree
    from portal.stack.settings import StackSettings

    settings = StackSettings(domain=DOMAIN, hostname=f"mail.{DOMAIN}", state_dir=ctx.state_dir)
    replace_tree(render(settings, {"redis_password": "x"}), settings.stack_dir)


def _account_key(ctx):
    from portal.certs.account import ensure_account_key

    ensure_account_key(ctx.state_dir)


def _web_files(ctx):
    from portal.stack.settings import StackSettings
    from portal.stack.web import write_web_files

    write_web_files(StackSettings(domain=DOMAIN, hostname=f"mail.{DOMAIN}", state_dir=ctx.state_dir),
                    ctx.nginx_dir, ctx.www_dir)


def _http_challenge(ctx):
    from acme import challenges

    from portal.certs.challenges import HttpChallenge, Pending, no_progress

    chall = challenges.HTTP01(token=b"t" * 32)
    HttpChallenge(ctx.acme_dir).publish([Pending(f"mail.{DOMAIN}", chall, "validation")], no_progress)


def _stack_secrets(ctx):
    from portal.stack.deploy import stack_secrets

    stack_secrets(ctx.state_dir / "secrets")


def _accounts_db(ctx):
    from portal.stack.accounts import Accounts

    Accounts(ctx.state_dir / "mail-accounts" / "accounts.db").add_domain(DOMAIN)


FOLDER_ATTACKS = [
    # (a folder the agent makes, made first by another user; the operation that makes it)
    ("upgrade", _keep_previous),
    ("stack", _render_stack),
    ("secrets/dkim", _dkim_keys),
    ("secrets/acme", _account_key),
    ("secrets", _stack_secrets),
    ("tls/archive", _install_cert),
    ("mail-accounts", _accounts_db),
    ("{tmp}/www", _web_files),
    ("{tmp}/acme", _http_challenge),
]


@pytest.mark.parametrize("name, operation", FOLDER_ATTACKS, ids=[n for n, _ in FOLDER_ATTACKS])
def test_a_folder_made_first_by_another_user_is_refused_not_adopted(state, tmp_path, name, operation):
    folder = Path(name.format(tmp=tmp_path)) if name.startswith("{tmp}") else state / name
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(MailsteadError) as err:
        operation(make_ctx(state, tmp_path))
    assert f"uid {NOBODY}" in str(err.value) and str(folder) in str(err.value), str(err.value)
    st = os.stat(folder)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o777)  # not chmodded, not chowned
    assert list(folder.iterdir()) == []  # nothing written into it


def _read_pin(ctx):
    from portal.stack.pins import read_pin

    read_pin(ctx.state_dir)


def _health_round(ctx):
    from portal.checks import CheckResult, history

    history.record(ctx.state_dir, [CheckResult("disk", "ok", "fine")])


def _accounts_open(ctx):
    from portal.stack.accounts import Accounts

    Accounts(ctx.state_dir / "mail-accounts" / "accounts.db").add_domain("other.test")


def _load_lock(ctx):
    from portal.stack.images import load_lock

    with load_lock(ctx.state_dir / "images.lock"):
        pass


def _upgrade_lock(ctx):
    from portal.stack.upgrade import upgrade_lock

    with upgrade_lock(ctx.state_dir):
        pass


def _tsig_secret(ctx):
    from portal.dns.update import load_update_target

    write_settings(ctx.state_dir / "state.db", {"rfc2136_server": "192.0.2.53", "rfc2136_key_name": "k"})
    load_update_target(ctx.state_dir)


STATE_FILE_ATTACKS = [
    # (a state file, replaced by a symlink to accounts.db; the operation that reads or writes it)
    ("stack-images.json", _read_pin),
    ("state.db", _health_round),
    ("mail-accounts/accounts.db", _accounts_open),
    ("secrets/redis-password", _stack_secrets),
    ("secrets/acme/account-key.pem", _account_key),
    ("secrets/dkim/mailstead-rsa.key", _dkim_keys),
    ("secrets/rfc2136.key", _tsig_secret),
    ("images.lock", _load_lock),
    ("upgrade.lock", _upgrade_lock),
]


@pytest.mark.parametrize("name, operation", STATE_FILE_ATTACKS, ids=[n for n, _ in STATE_FILE_ATTACKS])
def test_a_symlinked_state_file_is_refused_not_followed(state, tmp_path, victim, name, operation):
    ctx = make_ctx(state, tmp_path)
    path = state / name
    if name == "state.db":
        os.replace(path, tmp_path / "moved.db")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.symlink_to(victim.path)
    with pytest.raises(MailsteadError) as err:
        operation(ctx)
    assert "symlink" in str(err.value) and name.rsplit("/", 1)[-1] in str(err.value), str(err.value)
    victim()
    assert os.path.islink(path)
