"""Installing certificates: verification before the switch, the live/ symlink, archives,
and where the mail stack and nginx read the certificate from."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
import yaml

from portal.certs import CertError
from portal.certs.store import install, prune, read_live, verify_pair
from portal.stack.render import render
from portal.stack.settings import StackSettings
from portal.agent.registry import Context
from portal.certs.privileged import reloader
from portal.stack.web import NGINX_CONF_NAME, nginx_conf, write_web_files
from tests.unit.test_certs_support import CA, NAMES, NOW


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    d = tmp_path / "state" / "tls"
    d.mkdir(parents=True)
    (d / "bootstrap.crt").write_text("bootstrap cert\n")
    (d / "bootstrap.key").write_text("bootstrap key\n")
    (d / "bootstrap.sha256").write_text("AB:CD\n")
    return d


def test_install_switches_live_and_keeps_bootstrap(tls: Path) -> None:
    ca = CA()
    chain, key = ca.leaf()
    done = install(tls, chain, key, NAMES, now=NOW)
    assert os.readlink(tls / "live") == os.path.relpath(done.path, tls) and not os.path.isabs(os.readlink(tls / "live"))
    assert read_live(tls) == (chain, key)
    assert (done.path / "privkey.pem").stat().st_mode & 0o777 == 0o600
    assert (done.path / "fullchain.pem").stat().st_mode & 0o777 == 0o644
    assert (tls / "bootstrap.crt").read_text() == "bootstrap cert\n"
    assert (tls / "bootstrap.sha256").read_text() == "AB:CD\n"
    assert set(done.names) == set(NAMES)


@pytest.mark.parametrize("case, words", [
    ("mismatched key", "does not match"),
    ("wrong names", "does not cover mta-sts.example.test"),
    ("expired", "expired"),
    ("no chain", "without its issuer"),
    ("wrong issuer", "not issued by"),
    ("garbage", "does not parse"),
])
def test_a_broken_certificate_never_replaces_a_valid_one(tls: Path, case: str, words: str) -> None:
    ca = CA()
    good_chain, good_key = ca.leaf()
    install(tls, good_chain, good_key, NAMES, now=NOW)
    chain, key = ca.leaf()
    if case == "mismatched key":
        key = ca.leaf()[1]
    elif case == "wrong names":
        chain, key = ca.leaf(names=("mail.example.test",))
    elif case == "expired":
        chain, key = ca.leaf(start=NOW - dt.timedelta(days=100), days=90)
    elif case == "no chain":
        chain = chain.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    elif case == "wrong issuer":
        chain = chain.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n" + \
            CA("Other CA").leaf()[0].split(b"-----END CERTIFICATE-----\n", 1)[1]
    elif case == "garbage":
        chain = b"not a certificate"
    before = sorted((tls / "archive").iterdir())
    with pytest.raises(CertError, match=words) as err:
        install(tls, chain, key, NAMES, now=NOW)
    assert "current certificate stays in place" in str(err.value)
    assert read_live(tls) == (good_chain, good_key)
    assert sorted((tls / "archive").iterdir()) == before


def test_verify_returns_the_chain() -> None:
    chain, key = CA().leaf()
    assert len(verify_pair(chain, key, NAMES, NOW)) == 2


def test_keeps_the_last_three_archives(tls: Path) -> None:
    ca = CA()
    paths = []
    for i in range(5):
        chain, key = ca.leaf()
        paths.append(install(tls, chain, key, NAMES, now=NOW + dt.timedelta(minutes=i)).path)
    assert sorted((tls / "archive").iterdir()) == paths[-3:]
    assert (tls / "live").resolve() == paths[-1].resolve()
    assert prune(tls) == []


def test_live_that_is_a_folder_is_refused(tls: Path) -> None:
    (tls / "live").mkdir()
    chain, key = CA().leaf()
    with pytest.raises(CertError, match="not a symlink"):
        install(tls, chain, key, NAMES, now=NOW)


def stack(state: Path, **kw) -> StackSettings:
    return StackSettings(domain="example.test", hostname="mail.example.test", state_dir=state, **kw)


def test_stack_reads_bootstrap_then_live_through_the_tls_folder(tls: Path) -> None:
    state = tls.parent
    files = render(stack(state), {"redis_password": "x"})
    spec = yaml.safe_load(files["compose.yaml"].content)
    for service in ("postfix", "dovecot"):
        mounts = [(v["source"], v["target"], v.get("read_only")) for v in spec["services"][service]["volumes"]]
        assert (str(tls), "/etc/mailstead/tls", True) in mounts
        assert not any("cert.pem" in target for _s, target, _r in mounts)
    assert b"smtpd_tls_chain_files = /etc/mailstead/tls/bootstrap.key, /etc/mailstead/tls/bootstrap.crt" \
        in files["postfix/main.cf"].content
    assert f"ssl_certificate     {tls}/bootstrap.crt;" in nginx_conf(stack(state))

    chain, key = CA().leaf()
    install(tls, chain, key, NAMES, now=NOW)
    files = render(stack(state), {"redis_password": "x"})
    assert b"smtpd_tls_chain_files = /etc/mailstead/tls/live/privkey.pem, /etc/mailstead/tls/live/fullchain.pem" \
        in files["postfix/main.cf"].content
    assert b"ssl_server_cert_file = /etc/mailstead/tls/live/fullchain.pem" in files["dovecot/dovecot.conf"].content
    assert b"ssl_server_key_file = /etc/mailstead/tls/live/privkey.pem" in files["dovecot/dovecot.conf"].content
    conf = nginx_conf(stack(state))
    assert f"ssl_certificate     {tls}/live/fullchain.pem;" in conf
    assert f"ssl_certificate_key {tls}/live/privkey.pem;" in conf


def test_certificate_outside_the_tls_folder_is_mounted_file_by_file(tmp_path: Path) -> None:
    s = stack(tmp_path, tls_cert=Path("/etc/le/fullchain.pem"), tls_key=Path("/etc/le/key.pem"))
    files = render(s, {"redis_password": "x"})
    volumes = yaml.safe_load(files["compose.yaml"].content)["services"]["postfix"]["volumes"]
    mounts = [(v["source"], v["target"], v.get("read_only")) for v in volumes]
    assert ("/etc/le/fullchain.pem", "/etc/mailstead/tls/cert.pem", True) in mounts
    assert ("/etc/le/key.pem", "/etc/mailstead/tls/key.pem", True) in mounts
    assert b"smtpd_tls_chain_files = /etc/mailstead/tls/key.pem, /etc/mailstead/tls/cert.pem" \
        in files["postfix/main.cf"].content


def test_installing_a_ca_certificate_turns_on_hsts_in_the_include(tls: Path, tmp_path: Path) -> None:
    """The reloader that certificate installation and renewal run re-renders the host
    nginx's include, which then sends Strict-Transport-Security (tests/integration/
    test_nginx_front.py serves it)."""
    state = tls.parent

    def no_docker():
        raise OSError("no docker engine here")

    ctx = Context(docker=no_docker, state_dir=state, nginx_dir=tmp_path / "conf.d", www_dir=tmp_path / "www",
                  reload_nginx=False)
    write_web_files(stack(state), ctx.nginx_dir, ctx.www_dir)  # the deploy, with the bootstrap certificate
    assert "Strict-Transport-Security" not in (ctx.nginx_dir / NGINX_CONF_NAME).read_text()

    chain, key = CA().leaf()
    install(tls, chain, key, NAMES, now=NOW)
    results = reloader(ctx, stack(state))()
    assert results["nginx"] == "skipped: reloads are off"
    conf = (ctx.nginx_dir / NGINX_CONF_NAME).read_text()
    assert f"ssl_certificate     {tls}/live/fullchain.pem;" in conf
    assert 'add_header Strict-Transport-Security "max-age=31536000" always;' in conf
