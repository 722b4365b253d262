"""CalDAV/CardDAV (radicale, logging in against dovecot) and the stack's web side
(portal/stack/web.py) through a real host nginx, all on loopback.

One real stack (stackharness) with two mailboxes; nginx runs the shipped
mailstead.conf and the generated mailstead-stack.conf, localized to loopback
ports; a stand-in portal answers on the unix socket that both proxy to.
Requests reach nginx at 127.0.0.1 and name the virtual host in Host.
"""

from __future__ import annotations

import base64
import http.server
import secrets
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import uuid
from urllib.parse import unquote
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import caldav
import pytest
import requests

from portal.stack.accounts import Accounts, NoKeys
from portal.stack.web import (AUTODISCOVER_OUTLOOK_NS, AUTODISCOVER_RESPONSE_NS, NGINX_CONF_NAME,
                              REDIRECT_NAME, write_web_files)
from tests.conftest import free_port, retry, stop_process
from tests.integration import stackharness
from tests.integration.tlsaudit import tls_problems
from tests.integration.conftest import (NGINX, SHIPPED_CONF, TIMEOUT, localize_nginx_conf, localize_stack_conf,
                                       start_nginx)

DOMAIN, HOST = stackharness.DOMAIN, stackharness.HOSTNAME
MTA_STS, AUTOCONFIG, AUTODISCOVER = f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}", f"autodiscover.{DOMAIN}"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PORTAL_ANSWER = "stand-in portal"


class _PortalHandler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = PORTAL_ANSWER.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@dataclass
class Env:
    stack: stackharness.Stack
    https_port: int
    cert: Path
    passwords: dict[str, str]
    nginx_dir: Path

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.https_port}{path}"

    def session(self, user: str | None = None, password: str | None = None) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.cert)
        if user is not None:
            s.auth = (user, password if password is not None else self.passwords[user])
        return s

    def request(self, method: str, path: str, host: str = HOST, user: str | None = None,
                password: str | None = None, **kwargs) -> requests.Response:
        headers = {"Host": host, **kwargs.pop("headers", {})}
        with self.session(user, password) as s:
            return s.request(method, self.url(path), headers=headers, allow_redirects=False,
                             timeout=kwargs.pop("timeout", TIMEOUT * 6), **kwargs)

    def dav(self, user: str) -> caldav.DAVClient:
        client = caldav.DAVClient(url=self.url("/dav/"), username=user, password=self.passwords[user],
                                  ssl_verify_cert=str(self.cert), headers={"Host": HOST},
                                  timeout=TIMEOUT * 6)
        client.session.trust_env = False
        return client


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    assert Path(NGINX).exists(), f"{NGINX} is missing: apt-get install -y --no-install-recommends nginx-light"
    root = tmp_path_factory.mktemp("dav")
    stack = stackharness.start_stack(root / "state", "mstest-dav", 26000)
    ngx, www, tls = root / "nginx", root / "www", root / "web-tls"
    ngx.mkdir()
    nginx: subprocess.Popen[bytes] | None = None
    portal: _UnixHTTPServer | None = None
    try:
        started = time.monotonic()
        stack.deploy()
        print(f"stack healthy after {time.monotonic() - started:.1f} s")
        passwords = {ALICE: "alice-" + secrets.token_urlsafe(12), BOB: "bob-" + secrets.token_urlsafe(12)}
        accounts = Accounts(stack.settings.accounts_db)
        for address, password in passwords.items():
            accounts.create_mailbox(address, password, keys=NoKeys())

        # The web side, as the agent writes it, with a certificate for every name it serves.
        cert, key = stackharness.make_tls(tls, [HOST, MTA_STS, AUTOCONFIG, AUTODISCOVER])
        shutil.copy(cert, tls / "bootstrap.crt")
        shutil.copy(key, tls / "bootstrap.key")
        web_sock = root / "web.sock"
        changed = write_web_files(replace(stack.settings, tls_cert=cert, tls_key=key), ngx / "conf.d", www,
                                  web_sock=web_sock)
        assert {p.name for p in changed} == {NGINX_CONF_NAME, REDIRECT_NAME, "mta-sts.txt",
                                             "config-v1.1.xml", "autodiscover.xml"}
        portal = _UnixHTTPServer(str(web_sock), _PortalHandler)
        threading.Thread(target=portal.serve_forever, daemon=True).start()

        http_port, https_port = free_port(), free_port()
        generated = ngx / "conf.d" / NGINX_CONF_NAME
        generated.write_text(localize_stack_conf(generated.read_text(), https_port))
        shipped = ngx / "mailstead.conf"
        shipped.write_text(localize_nginx_conf(SHIPPED_CONF.read_text(), http_port=http_port,
                                               https_port=https_port, tls_dir=tls, acme_dir=root,
                                               web_sock=web_sock, nginx_dir=ngx / "conf.d", stack_conf=generated))
        site = ngx / "sites.conf"
        site.write_text(f"include {shipped};\n")
        nginx = start_nginx(ngx, site, generated)

        def listening() -> None:
            assert nginx is not None
            if nginx.poll() is not None:
                raise AssertionError(f"nginx exited: {(ngx / 'error.log').read_text(errors='replace')}")
            socket.create_connection(("127.0.0.1", https_port), timeout=1).close()

        retry(listening, 15, "nginx on its loopback port")
        yield Env(stack, https_port, cert, passwords, ngx)
    finally:
        stop_process(nginx)
        if portal is not None:
            portal.shutdown()
            portal.server_close()
        for service in ("radicale", "dovecot"):
            try:
                logs = stack.container(service).logs(tail=30).decode(errors="replace")
                print(f"--- {service} log:\n{logs}")
            except Exception as exc:  # noqa: BLE001 - only for the report
                print(f"--- {service} log unavailable: {exc}")
        if (ngx / "error.log").exists():
            print(f"--- nginx error.log:\n{(ngx / 'error.log').read_text(errors='replace')[-3000:]}")
        stack.down()


# -- radicale itself ------------------------------------------------------------------------

def test_radicale_is_published_on_loopback_only_and_runs_unprivileged(env: Env) -> None:
    container = env.stack.container("radicale")
    bindings = container.attrs["NetworkSettings"]["Ports"]["5232/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(env.stack.port("dav"))}]
    top = container.top(ps_args="-o pid,uid,args")
    uids = {uid for _pid, uid, args in top["Processes"] if "/usr/bin/radicale" in args}
    assert uids == {"127"}, top  # only the radicale user (recipes/base sysusers) runs it


# -- CalDAV / CardDAV through nginx -----------------------------------------------------------

def test_caldav_event_round_trip(env: Env) -> None:
    principal = env.dav(ALICE).principal()
    assert "Calendar" in [c.name for c in principal.calendars()], "the predefined calendar is missing"
    calendar = principal.make_calendar(name="Work", cal_id="work")
    uid = str(uuid.uuid4())
    calendar.save_event(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Mailstead tests//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20300101T080000Z\r\n"
        "DTSTART:20300102T090000Z\r\nDTEND:20300102T100000Z\r\n"
        "SUMMARY:Quarterly review & planning\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")

    again = env.dav(ALICE).principal().calendar(cal_id="work")  # a fresh client and connection
    event = again.event_by_uid(uid)
    assert str(event.icalendar_component["summary"]) == "Quarterly review & planning"
    assert [str(e.icalendar_component["uid"]) for e in again.events()] == [uid]
    assert unquote(str(again.url.path)) == f"/dav/{ALICE}/work/"


VCARD = ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:Bob Example\r\nN:Example;Bob;;;\r\n"
         "EMAIL;TYPE=INTERNET:{email}\r\n{extra}END:VCARD\r\n")
MKCOL_ADDRESSBOOK = """<?xml version="1.0" encoding="utf-8"?>
<D:mkcol xmlns:D="DAV:" xmlns:CR="urn:ietf:params:xml:ns:carddav">
  <D:set><D:prop>
    <D:resourcetype><D:collection/><CR:addressbook/></D:resourcetype>
    <D:displayname>Friends</D:displayname>
  </D:prop></D:set>
</D:mkcol>"""


def unfold(text: str) -> str:
    return text.replace("\r\n ", "").replace("\n ", "")


def test_carddav_vcard_round_trip_including_a_large_photo(env: Env) -> None:
    book = f"/dav/{ALICE}/friends/"
    made = env.request("MKCOL", book, user=ALICE, data=MKCOL_ADDRESSBOOK,
                       headers={"Content-Type": "application/xml; charset=utf-8"})
    assert made.status_code == 201, made.text

    uid = str(uuid.uuid4())
    card = VCARD.format(uid=uid, email=BOB, extra="")
    put = env.request("PUT", f"{book}{uid}.vcf", user=ALICE, data=card.encode(),
                      headers={"Content-Type": "text/vcard; charset=utf-8"})
    assert put.status_code == 201, put.text
    got = env.request("GET", f"{book}{uid}.vcf", user=ALICE)
    assert got.status_code == 200
    assert got.headers["Content-Type"].startswith("text/vcard")
    assert f"UID:{uid}" in got.text and "FN:Bob Example" in got.text and BOB in got.text

    # 3 MB of photo: far past nginx's default 1 MiB request body limit.
    photo = base64.b64encode(secrets.token_bytes(2_250_000)).decode()
    big_uid = str(uuid.uuid4())
    big = VCARD.format(uid=big_uid, email=ALICE, extra=f"PHOTO;ENCODING=b;TYPE=JPEG:{photo}\r\n")
    put = env.request("PUT", f"{book}{big_uid}.vcf", user=ALICE, data=big.encode(),
                      headers={"Content-Type": "text/vcard; charset=utf-8"})
    assert put.status_code == 201, put.text[:500]
    got = env.request("GET", f"{book}{big_uid}.vcf", user=ALICE)
    assert got.status_code == 200
    assert photo in unfold(got.text)

    listing = env.request("PROPFIND", book, user=ALICE, headers={"Depth": "1"})
    assert listing.status_code == 207
    assert listing.text.count(".vcf</") == 2, listing.text


def test_users_cannot_reach_each_others_collections(env: Env) -> None:
    uid = str(uuid.uuid4())
    own = f"/dav/{ALICE}/contacts/{uid}.vcf"
    card = VCARD.format(uid=uid, email=ALICE, extra="")
    assert env.request("PUT", own, user=ALICE, data=card.encode(),
                       headers={"Content-Type": "text/vcard"}).status_code == 201

    attempts = [
        ("GET", own, {}),
        ("PROPFIND", f"/dav/{ALICE}/", {"headers": {"Depth": "1"}}),
        ("PROPFIND", f"/dav/{ALICE}/contacts/", {"headers": {"Depth": "1"}}),
        ("PUT", own, {"data": VCARD.format(uid=uid, email=BOB, extra="").encode(),
                      "headers": {"Content-Type": "text/vcard"}}),
        ("PUT", f"/dav/{ALICE}/contacts/{uuid.uuid4()}.vcf",
         {"data": card.encode(), "headers": {"Content-Type": "text/vcard"}}),
        ("DELETE", own, {}),
        ("DELETE", f"/dav/{ALICE}/calendar/", {}),
        ("MKCOL", f"/dav/{ALICE}/bobs-book/", {}),
    ]
    for method, path, kwargs in attempts:
        r = env.request(method, path, user=BOB, **kwargs)
        assert r.status_code in (403, 404), f"bob {method} {path}: {r.status_code} {r.text[:300]}"

    # Bob's own space works, and what Alice stored is untouched.
    assert env.request("PROPFIND", f"/dav/{BOB}/", user=BOB, headers={"Depth": "1"}).status_code == 207
    still = env.request("GET", own, user=ALICE)
    assert still.status_code == 200 and ALICE in still.text and BOB not in still.text
    assert env.request("PROPFIND", f"/dav/{ALICE}/calendar/", user=ALICE,
                       headers={"Depth": "0"}).status_code == 207


@pytest.mark.parametrize(("user", "password"), [
    (ALICE, "not-alices-password"),
    (BOB, None),                       # Alice's password for Bob
    (f"nobody@{DOMAIN}", "some-password-1234"),
])
def test_wrong_credentials_are_401(env: Env, user: str, password: str | None) -> None:
    password = password or env.passwords[ALICE]
    r = env.request("PROPFIND", f"/dav/{user}/", user=user, password=password, headers={"Depth": "0"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")


def test_no_credentials_is_401_and_a_good_login_is_case_insensitive(env: Env) -> None:
    r = env.request("PROPFIND", "/dav/", headers={"Depth": "0"})
    assert r.status_code == 401
    r = env.request("PROPFIND", f"/dav/{ALICE}/", user=ALICE.upper(), password=env.passwords[ALICE],
                    headers={"Depth": "0"})
    assert r.status_code == 207, r.text


@pytest.mark.parametrize("path", ["/.well-known/caldav", "/.well-known/carddav", "/dav"])
def test_discovery_redirects_to_the_dav_root(env: Env, path: str) -> None:
    r = env.request("GET", path)
    assert r.status_code == 301
    assert r.headers["Location"] == f"https://{HOST}:{env.https_port}/dav/"
    # And there, a client finds its principal under /dav/ (X-Script-Name).
    r = env.request("PROPFIND", "/dav/", user=ALICE, headers={"Depth": "0"},
                    data='<propfind xmlns="DAV:"><prop><current-user-principal/></prop></propfind>')
    assert r.status_code == 207
    href = ET.fromstring(r.content).findtext(".//{DAV:}current-user-principal/{DAV:}href")
    assert href is not None and unquote(href) == f"/dav/{ALICE}/", r.text


def test_the_portal_is_still_at_the_root_of_the_mail_host(env: Env) -> None:
    r = env.request("GET", "/")
    assert r.status_code == 200 and r.text == PORTAL_ANSWER
    assert r.headers.get("X-Frame-Options") == "DENY"


# -- MTA-STS, autoconfig, autodiscover ---------------------------------------------------------

def test_mta_sts_policy(env: Env) -> None:
    r = env.request("GET", "/.well-known/mta-sts.txt", host=MTA_STS)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == "text/plain"
    assert r.text == f"version: STSv1\r\nmode: enforce\r\nmx: {HOST}\r\nmax_age: 604800\r\n"
    assert env.request("GET", "/", host=MTA_STS).status_code == 404
    assert env.request("GET", "/dav/", host=MTA_STS).status_code == 404
    # Only that name serves it: on the mail host the path is the portal's.
    assert env.request("GET", "/.well-known/mta-sts.txt").text == PORTAL_ANSWER


def _servers(config: ET.Element, tag: str) -> list[tuple[str, str, int, str]]:
    return [(s.get("type") or "", s.findtext("hostname") or "", int(s.findtext("port") or 0),
             s.findtext("socketType") or "") for s in config.iter(tag)]


@pytest.mark.parametrize(("host", "path"), [
    (AUTOCONFIG, f"/mail/config-v1.1.xml?emailaddress={ALICE}"),
    (HOST, "/.well-known/autoconfig/mail/config-v1.1.xml"),
])
def test_thunderbird_autoconfig(env: Env, host: str, path: str) -> None:
    r = env.request("GET", path, host=host)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == "application/xml"
    config = ET.fromstring(r.content)
    port = env.stack.port
    assert _servers(config, "incomingServer") == [("imap", HOST, port("imaps"), "SSL"),
                                                  ("pop3", HOST, port("pop3s"), "SSL")]
    assert _servers(config, "outgoingServer") == [("smtp", HOST, port("submissions"), "SSL"),
                                                  ("smtp", HOST, port("submission"), "STARTTLS")]
    assert config.findtext("emailProvider/domain") == DOMAIN
    assert config.findtext("calendar/serverURL") == f"https://{HOST}/dav/"


@pytest.mark.parametrize(("host", "path"), [
    (AUTODISCOVER, "/autodiscover/autodiscover.xml"),
    (AUTODISCOVER, "/Autodiscover/Autodiscover.xml"),
    (HOST, "/autodiscover/autodiscover.xml"),
])
def test_outlook_autodiscover_answers_a_post(env: Env, host: str, path: str) -> None:
    request = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
        f"<Request><EMailAddress>{ALICE}</EMailAddress><AcceptableResponseSchema>{AUTODISCOVER_OUTLOOK_NS}"
        "</AcceptableResponseSchema></Request></Autodiscover>")
    r = env.request("POST", path, host=host, data=request.encode(),
                    headers={"Content-Type": "text/xml; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].split(";")[0] == "application/xml"
    doc = ET.fromstring(r.content)
    assert doc.tag == f"{{{AUTODISCOVER_RESPONSE_NS}}}Autodiscover"
    ns = {"o": AUTODISCOVER_OUTLOOK_NS}
    protocols = {p.findtext("o:Type", namespaces=ns): (p.findtext("o:Server", namespaces=ns),
                                                       int(p.findtext("o:Port", namespaces=ns) or 0))
                 for p in doc.iterfind("o:Response/o:Account/o:Protocol", ns)}
    port = env.stack.port
    assert protocols == {"IMAP": (HOST, port("imaps")), "POP3": (HOST, port("pop3s")),
                         "SMTP": (HOST, port("submissions"))}


def test_unknown_paths_on_the_client_config_hosts_are_404(env: Env) -> None:
    for host in (AUTOCONFIG, AUTODISCOVER):
        assert env.request("GET", "/", host=host).status_code == 404
        assert env.request("GET", "/dav/", host=host).status_code == 404
        assert env.request("GET", "/.well-known/mta-sts.txt", host=host).status_code == 404


def test_tls_audit_of_the_https_front(env: Env, tmp_path: Path) -> None:
    """443 (nginx: portal, DAV, MTA-STS, autoconfig): nothing below TLS 1.2, no weak cipher."""
    problems = tls_problems(f"127.0.0.1:{env.https_port}", None, tmp_path / "https.json")
    assert not problems, "\n".join(problems)
