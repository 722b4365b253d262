"""portal/stack/web.py: the host nginx include and the static files it serves."""

from __future__ import annotations

import configparser
import re
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from portal.stack import web
from portal.stack.render import render
from portal.stack.settings import SettingsError, StackSettings

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONF = REPO / "image" / "extra" / "etc" / "nginx" / "conf.d" / "mailstead.conf"


def settings(**changes) -> StackSettings:
    return replace(StackSettings(domain="example.org", hostname="mail.example.org"), **changes)


@dataclass(frozen=True)
class WithMode(StackSettings):
    """Settings that carry an MTA-STS mode (StackSettings itself has none yet)."""

    mta_sts_mode: str = "testing"


def servers(conf: str) -> dict[str, str]:
    """{server_name: the server block's text}."""
    blocks = re.split(r"(?m)^server \{\n", conf)[1:]
    found = {}
    for block in blocks:
        name = re.search(r"^\s*server_name ([^;]+);", block, re.MULTILINE)
        assert name, block
        found[name.group(1)] = block
    return found


# -- MTA-STS ------------------------------------------------------------------------------

def test_mta_sts_policy_is_rfc8461_text_with_crlf_lines():
    assert web.mta_sts_policy(settings()) == (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.org\r\nmax_age: 604800\r\n")


def test_mta_sts_mode_follows_the_setting_and_changes_the_policy_id():
    enforce, testing = settings(), WithMode(domain="example.org", hostname="mail.example.org")
    assert "mode: testing\r\n" in web.mta_sts_policy(testing)
    ids = web.mta_sts_policy_id(enforce), web.mta_sts_policy_id(testing)
    assert ids[0] != ids[1]
    assert ids[0] == web.mta_sts_policy_id(settings())  # stable for the same policy
    assert all(re.fullmatch(r"[A-Za-z0-9]{1,32}", i) for i in ids)


def test_unknown_mta_sts_mode_is_refused():
    with pytest.raises(SettingsError) as err:
        web.mta_sts_policy(WithMode(domain="example.org", hostname="mail.example.org", mta_sts_mode="on"))
    assert err.value.field == "mta_sts_mode"
    assert "enforce, testing, none" in str(err.value)


# -- names: IDN, case, bad input ------------------------------------------------------------

IDN = settings(domain="Bücher.example", hostname="Mail.Bücher.example")
PUNY_HOST, PUNY_DOMAIN = "mail.xn--bcher-kva.example", "xn--bcher-kva.example"


def test_idn_names_are_punycode_everywhere_but_the_display_name():
    assert f"mx: {PUNY_HOST}\r\n" in web.mta_sts_policy(IDN)
    names = servers(web.nginx_conf(IDN))
    assert set(names) == {PUNY_HOST, f"mta-sts.{PUNY_DOMAIN}",
                          f"autoconfig.{PUNY_DOMAIN} autodiscover.{PUNY_DOMAIN}"}
    config = ET.fromstring(web.autoconfig_xml(IDN))
    assert {h.text for h in config.iter("hostname")} == {PUNY_HOST}
    assert config.findtext("emailProvider/domain") == PUNY_DOMAIN
    assert config.find("emailProvider").get("id") == PUNY_DOMAIN
    assert config.findtext("emailProvider/displayName") == "bücher.example"
    assert config.findtext("calendar/serverURL") == f"https://{PUNY_HOST}/dav/"
    discover = web.autodiscover_xml(IDN)
    assert f"<Server>{PUNY_HOST}</Server>" in discover and "ü" not in discover


@pytest.mark.parametrize("field, value", [
    ("hostname", "mail.example.org;"),
    ("hostname", "mail.example.org { }"),
    ("hostname", "mail example.org"),
    ("hostname", "localhost"),
    ("domain", "example.org\nserver {"),
    ("domain", "$host.org"),
])
def test_bad_names_are_refused_before_they_reach_a_file(field, value):
    bad = settings(**{field: value})
    for build in (web.nginx_conf, web.mta_sts_policy, web.autoconfig_xml, web.autodiscover_xml):
        with pytest.raises(SettingsError) as err:
            build(bad)
        assert err.value.field == field


@pytest.mark.parametrize("path", [
    "relative/cert.pem",
    "/etc/ssl/my cert.pem",
    "/etc/ssl/cert.pem;",
    "/etc/ssl/$host.pem",
    '/etc/ssl/"cert".pem',
    "/etc/ssl/{cert}.pem",
    "/etc/ssl/../../cert.pem",
])
def test_paths_nginx_would_misread_are_refused(path):
    with pytest.raises(SettingsError) as err:
        web.nginx_conf(settings(tls_cert=Path(path), tls_key=Path("/etc/ssl/key.pem")))
    assert err.value.field == "tls_cert"
    with pytest.raises(SettingsError) as err:
        web.nginx_conf(settings(), www_dir=Path(path))
    assert err.value.field == "www_dir"


@pytest.mark.parametrize("prefix", ["mta-sts", "autoconfig", "autodiscover"])
def test_mail_host_cannot_be_one_of_the_served_names(prefix):
    with pytest.raises(SettingsError) as err:
        web.nginx_conf(settings(hostname=f"{prefix}.example.org"))
    assert err.value.field == "hostname"


# -- autoconfig and autodiscover -------------------------------------------------------------

def test_autoconfig_lists_the_four_services_on_their_standard_ports():
    config = ET.fromstring(web.autoconfig_xml(settings()))
    assert config.tag == "clientConfig" and config.get("version") == "1.1"
    found = [(s.tag, s.get("type"), s.findtext("hostname"), s.findtext("port"), s.findtext("socketType"),
              s.findtext("authentication"), s.findtext("username"))
             for s in config.find("emailProvider") if s.tag.endswith("Server")]
    host, auth, user = "mail.example.org", "password-cleartext", "%EMAILADDRESS%"
    assert found == [
        ("incomingServer", "imap", host, "993", "SSL", auth, user),
        ("incomingServer", "pop3", host, "995", "SSL", auth, user),
        ("outgoingServer", "smtp", host, "465", "SSL", auth, user),
        ("outgoingServer", "smtp", host, "587", "STARTTLS", auth, user),
    ]
    for tag, kind in (("addressBook", "carddav"), ("calendar", "caldav")):
        dav = config.find(tag)
        assert dav is not None and dav.get("type") == kind
        assert dav.findtext("serverURL") == "https://mail.example.org/dav/"
        assert dav.findtext("authentication") == "http-basic"


def test_client_configs_follow_the_published_ports():
    moved = settings(ports={"imaps": 10993, "pop3s": 10995, "submissions": 10465, "submission": 10587})
    ports = [p.text for p in ET.fromstring(web.autoconfig_xml(moved)).iter("port")]
    assert ports == ["10993", "10995", "10465", "10587"]
    assert re.findall(r"<Port>(\d+)</Port>", web.autodiscover_xml(moved)) == ["10993", "10995", "10465"]


def test_xml_values_are_escaped():
    name = 'Tom & Jerry\'s <b>"Mail"</b>'
    text = web.autoconfig_xml(settings(), display_name=name)
    assert "Tom &amp; Jerry's &lt;b&gt;" in text
    config = ET.fromstring(text)
    assert config.findtext("emailProvider/displayName") == name
    assert config.findtext("emailProvider/displayShortName") == name
    assert "%EMAILADDRESS%" in text


def test_autodiscover_is_outlooks_response_schema():
    text = web.autodiscover_xml(settings())
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n')
    doc = ET.fromstring(text)
    assert doc.tag == f"{{{web.AUTODISCOVER_RESPONSE_NS}}}Autodiscover"
    ns = {"o": web.AUTODISCOVER_OUTLOOK_NS}
    account = doc.find("o:Response/o:Account", ns)
    assert account is not None
    assert account.findtext("o:AccountType", namespaces=ns) == "email"
    assert account.findtext("o:Action", namespaces=ns) == "settings"
    protocols = [{child.tag.split("}")[1]: child.text for child in p} for p in account.iterfind("o:Protocol", ns)]
    assert [(p["Type"], p["Server"], p["Port"], p["SSL"]) for p in protocols] == [
        ("IMAP", "mail.example.org", "993", "on"),
        ("POP3", "mail.example.org", "995", "on"),
        ("SMTP", "mail.example.org", "465", "on"),
    ]
    assert all(p["AuthRequired"] == "on" and p["SPA"] == "off" for p in protocols)


# -- the nginx include -----------------------------------------------------------------------

def _directive(conf: str, name: str) -> set[str]:
    return set(re.findall(rf"(?m)^\s*{name}\s+([^;]+);", conf))


def test_tls_matches_the_shipped_front():
    conf, shipped = web.nginx_conf(settings()), SHIPPED_CONF.read_text()
    for name in ("ssl_protocols", "ssl_ciphers", "ssl_prefer_server_ciphers", "ssl_session_tickets",
                 "ssl_session_cache"):
        assert _directive(conf, name) == _directive(shipped, name), name
    assert len(_directive(shipped, "ssl_ciphers")) == 1


def test_every_server_is_https_only_with_the_settings_certificate():
    s = settings(tls_cert=Path("/etc/mailstead/le/fullchain.pem"), tls_key=Path("/etc/mailstead/le/key.pem"))
    blocks = servers(web.nginx_conf(s))
    assert len(blocks) == 3
    for block in blocks.values():
        assert re.findall(r"(?m)^\s*listen\s+([^;]+);", block) == ["443 ssl http2", "[::]:443 ssl http2"]
        assert "ssl_certificate     /etc/mailstead/le/fullchain.pem;" in block
        assert "ssl_certificate_key /etc/mailstead/le/key.pem;" in block
        assert "server_tokens off;" in block
        assert "default_server" not in block  # mailstead.conf keeps that (and port 80, for ACME)
    # Without settings for them: the bootstrap certificate, as mailstead.conf.
    assert "ssl_certificate     /var/lib/mailstead/tls/bootstrap.crt;" in web.nginx_conf(settings())


def test_dav_is_proxied_to_radicale_on_loopback_with_the_prefix():
    block = servers(web.nginx_conf(settings(ports={"dav": 15232})))["mail.example.org"]
    dav = re.search(r"location /dav/ \{(.*?)\n    \}", block, re.DOTALL)
    assert dav, block
    body = dav.group(1)
    # No URI part: the request URI goes through as the client sent it (no re-encoding).
    assert "proxy_pass http://127.0.0.1:15232;" in body
    assert "proxy_set_header X-Script-Name /dav;" in body
    assert "proxy_set_header Host $http_host;" in body
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in body  # replaced, never appended
    assert "proxy_request_buffering off;" in body and "proxy_buffering off;" in body
    for well_known in ("caldav", "carddav"):
        assert re.search(rf"location = /\.well-known/{well_known} \{{\s*return 301 /dav/;", block)
    assert re.search(r"location / \{\s*proxy_pass http://unix:/run/mailstead/web\.sock;", block)


def test_dav_body_limit_is_radicales_limit():
    body_mb = re.search(r"location /dav/ \{[^}]*client_max_body_size (\d+)m;", web.nginx_conf(settings()))
    assert body_mb and int(body_mb.group(1)) == web.DAV_MAX_BODY_MB
    files = render(settings(), {"redis_password": "x"})
    config = configparser.ConfigParser()
    config.read_string(files["radicale/config"].content.decode())
    assert config.getint("server", "max_content_length") == web.DAV_MAX_BODY_MB * 1024 * 1024


def test_static_files_are_served_from_www_dir_by_name():
    conf = web.nginx_conf(settings(), www_dir=Path("/srv/www/"))
    assert _directive(conf, "alias") == {"/srv/www/mta-sts.txt", "/srv/www/config-v1.1.xml",
                                         "/srv/www/autodiscover.xml"}
    mta_sts = servers(conf)["mta-sts.example.org"]
    assert "alias /srv/www/mta-sts.txt;" in mta_sts and "config-v1.1" not in mta_sts
    # Autodiscover answers POST: nginx's static 405 becomes an internal GET of the file.
    assert conf.count("error_page 405 =200 $uri;") == 2


def test_same_settings_give_the_same_files():
    assert web.web_files(settings()) == web.web_files(settings())
    assert web.web_files(settings()) != web.web_files(settings(hostname="mx.example.org"))


# -- writing ----------------------------------------------------------------------------------

def test_write_web_files_writes_once_and_reports_changes(tmp_path):
    nginx_dir, www_dir = tmp_path / "conf.d", tmp_path / "www"
    first = web.write_web_files(settings(), nginx_dir, www_dir)
    assert [p.name for p in first] == ["mta-sts.txt", "config-v1.1.xml", "autodiscover.xml",
                                       web.NGINX_CONF_NAME, web.REDIRECT_NAME]
    assert sorted(p.name for p in nginx_dir.iterdir()) == sorted(web.NGINX_FILES)
    assert stat.S_IMODE(www_dir.stat().st_mode) == 0o755
    for path in first:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    conf = (nginx_dir / web.NGINX_CONF_NAME).read_text()
    assert conf == web.nginx_conf(settings(), www_dir)
    for alias in _directive(conf, "alias"):
        assert Path(alias).is_file(), alias
    assert (www_dir / "mta-sts.txt").read_bytes() == web.mta_sts_policy(settings()).encode()

    assert web.write_web_files(settings(), nginx_dir, www_dir) == []
    changed = web.write_web_files(WithMode(domain="example.org", hostname="mail.example.org"), nginx_dir, www_dir)
    assert changed == [www_dir / "mta-sts.txt"]
    assert sorted(p.name for p in www_dir.iterdir()) == ["autodiscover.xml", "config-v1.1.xml", "mta-sts.txt"]


def test_write_web_files_writes_nothing_for_bad_settings(tmp_path):
    with pytest.raises(SettingsError):
        web.write_web_files(settings(hostname="bad host"), tmp_path / "conf.d", tmp_path / "www")
    assert list(tmp_path.iterdir()) == []


# -- HSTS: only once a CA's certificate is served -----------------------------------------------

HSTS = f'add_header Strict-Transport-Security "max-age={web.HSTS_MAX_AGE}" always;'


def _locations_with_headers(block: str) -> list[str]:
    """Every location block of a server that sets add_header itself (and so inherits none)."""
    return [loc for loc in re.findall(r"(?ms)^    location [^{]*\{.*?^    \}", block) if "add_header" in loc]


def test_no_hsts_with_the_bootstrap_certificate(tmp_path):
    (tmp_path / "tls").mkdir()
    conf = web.nginx_conf(settings(state_dir=tmp_path))
    assert "ssl_certificate     " + str(tmp_path / "tls" / "bootstrap.crt") + ";" in conf
    assert "Strict-Transport-Security" not in conf


def test_no_hsts_with_certificate_files_from_settings(tmp_path):
    """Files named in settings may be self-signed: the appliance cannot promise them."""
    (tmp_path / "tls" / "live").mkdir(parents=True)
    s = settings(state_dir=tmp_path, tls_cert=Path("/etc/own/cert.pem"), tls_key=Path("/etc/own/key.pem"))
    assert not web.serves_ca_certificate(s)
    assert "Strict-Transport-Security" not in web.nginx_conf(s)


def test_hsts_on_every_server_and_location_with_the_ca_certificate(tmp_path):
    (tmp_path / "tls" / "live").mkdir(parents=True)  # what portal/certs/store.py installs
    s = settings(state_dir=tmp_path)
    assert web.serves_ca_certificate(s)
    conf = web.nginx_conf(s)
    blocks = servers(conf)
    assert len(blocks) == 3
    for name, block in blocks.items():
        assert f"\n    {HSTS}\n" in block, name  # server level: the proxied and redirecting answers
        locations = _locations_with_headers(block)
        assert locations, name
        for location in locations:  # an add_header of its own hides the server's
            assert HSTS in location, (name, location)
    assert "includeSubDomains" not in conf and "preload" not in conf
    assert 180 * 86400 <= web.HSTS_MAX_AGE <= 2 * 365 * 86400


def test_shipped_front_never_sends_hsts():
    """mailstead.conf's servers always serve the self-signed bootstrap certificate."""
    assert "Strict-Transport-Security" not in re.sub(r"(?m)#.*$", "", SHIPPED_CONF.read_text())


# -- the port-80 redirect ----------------------------------------------------------------------

def _port80(conf: str) -> str:
    block = re.search(r"(?ms)^server \{\n\s*listen 80 default_server;.*?^\}", conf)
    assert block, conf
    return block.group(0)


def test_port_80_never_redirects_to_the_clients_host_header():
    port80 = re.sub(r"(?m)#.*$", "", _port80(SHIPPED_CONF.read_text()))
    returns = re.findall(r"return\s+([^;]+);", port80)
    assert returns == ["301 https://$mailstead_server_host$request_uri"], returns
    for variable in ("$host", "$http_host", "$server_name"):
        assert variable not in port80
    # The address the request came in on, IPv6 in brackets, until the agent names the mail host.
    assert re.search(r"map \$server_addr \$mailstead_server_host \{\s*~:\s+\[\$server_addr\];"
                     r"\s*default\s+\$server_addr;\s*\}", SHIPPED_CONF.read_text())


def test_port_80_includes_the_agents_redirect_before_its_fallback():
    port80 = _port80(SHIPPED_CONF.read_text())
    location = re.search(r"(?ms)location / \{(.*?)\}", port80).group(1)
    lines = [line.strip() for line in location.splitlines() if line.strip() and not line.strip().startswith("#")]
    include = f"include {web.NGINX_DIR}/{web.REDIRECT_NAME.replace('.inc', '*.inc')};"
    assert lines == [include, "return 301 https://$mailstead_server_host$request_uri;"]
    # The ACME challenges stay on port 80, ahead of the redirect.
    assert "location /.well-known/acme-challenge/ {" in port80


def test_redirect_conf_names_the_mail_host_only(tmp_path):
    conf = web.redirect_conf(settings())
    assert [line for line in conf.splitlines() if not line.startswith("#")] == [
        "return 301 https://mail.example.org$request_uri;"]
    assert web.redirect_conf(settings(hostname="xn--mil-ula.example.org")).endswith(
        "return 301 https://xn--mil-ula.example.org$request_uri;\n")
    with pytest.raises(SettingsError):
        web.redirect_conf(settings(hostname="evil.example;return 302 https://x"))
    web.write_web_files(settings(), tmp_path / "conf.d", tmp_path / "www")
    assert (tmp_path / "conf.d" / web.REDIRECT_NAME).read_text() == conf
