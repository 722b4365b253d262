"""What the host's nginx serves for the mail stack, built from settings.

nginx runs on the appliance host (image/extra/etc/nginx/conf.d/mailstead.conf
holds the portal's default server). This module adds one include,
/var/lib/mailstead/nginx/mailstead-stack.conf (on /var, which image updates keep), with a server block per name:

- `<hostname>`: CalDAV/CardDAV at /dav/ (radicale on 127.0.0.1:<ports.dav>),
  /.well-known/caldav and /.well-known/carddav redirecting there (RFC 6764),
  autoconfig and autodiscover as below, and the portal at / as before;
- `mta-sts.<domain>`: the MTA-STS policy at /.well-known/mta-sts.txt (RFC 8461);
- `autoconfig.<domain>`, `autodiscover.<domain>`: Thunderbird's
  /mail/config-v1.1.xml and Outlook's POST /autodiscover/autodiscover.xml.

Port 80 is left to mailstead.conf's default server, which answers ACME
challenges for every name and redirects the rest to HTTPS: to the mail host,
which this module writes into the one-line REDIRECT_NAME file that
mailstead.conf includes (before the first deploy: to the address the request
came in on). Never to the client's Host header.

Once the certificate served is a CA's (tls/live, see portal/certs/store.py),
every HTTPS answer of these servers carries Strict-Transport-Security; never
with the self-signed bootstrap certificate, which browsers would then refuse
without the click-through the owner needs. The certificate's installation
rewrites these files and reloads nginx (portal/certs/agentops.py, reloader),
so the header follows the certificate.

The policy and the two XML files are static files in WWW_DIR (readable by
nginx's workers, unlike /var/lib/mailstead). Everything here is a pure
function of settings except `write_web_files`; reloading nginx is the caller's.
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from encodings import idna
from pathlib import Path

from portal.core import safefs
from portal.core.errors import UnsafePathError
from portal.stack.accounts import check_domain
from portal.stack.settings import DEFAULT_PORTS, SettingsError, StackSettings

NGINX_DIR = Path("/var/lib/mailstead/nginx")
NGINX_CONF_NAME = "mailstead-stack.conf"
# Included by mailstead.conf's port-80 server (not *.conf: it is no http-level file).
REDIRECT_NAME = "mailstead-stack-redirect.inc"
NGINX_FILES = (NGINX_CONF_NAME, REDIRECT_NAME)  # written to nginx_dir; the rest to www_dir
WWW_DIR = Path("/var/lib/mailstead-www")
WEB_SOCK = Path("/run/mailstead/web.sock")  # the portal (gunicorn), as in mailstead.conf

MTA_STS_FILE = "mta-sts.txt"
AUTOCONFIG_FILE = "config-v1.1.xml"
AUTODISCOVER_FILE = "autodiscover.xml"

DAV_PATH = "/dav/"
# nginx's client_max_body_size for DAV; radicale's max_content_length is the same
# 100 MiB (recipes/radicale/templates/config.j2). Big enough for vCards with photos
# and whole-calendar imports.
DAV_MAX_BODY_MB = 100

MTA_STS_MODES = ("enforce", "testing", "none")
DEFAULT_MTA_STS_MODE = "enforce"
MTA_STS_MAX_AGE = 604800  # one week, in seconds

# As mailstead.conf's TLS server (tests/unit/test_web.py checks that they agree).
TLS_PROTOCOLS = "TLSv1.2 TLSv1.3"
TLS_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
               "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")

AUTODISCOVER_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"

# HSTS: a year, the usual value; not includeSubDomains (the owner's other names are
# not this appliance's to decide), no preload.
HSTS_MAX_AGE = 31536000

# What a path may hold to be written into nginx's config unquoted and unescaped
# (no spaces, quotes, semicolons, braces or `$`, which nginx would expand).
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/@+-]*")


# -- names and values from settings ---------------------------------------------------

def _ascii(name: str, field: str) -> str:
    try:
        return check_domain(name, field)
    except ValueError as err:
        raise SettingsError(field, getattr(err, "message", str(err))) from None


def _names(settings: StackSettings) -> tuple[str, str]:
    """(domain, hostname) in ASCII: every builder checks both, so that settings with
    a bad name never yield any file."""
    return _ascii(settings.domain, "domain"), _ascii(settings.hostname, "hostname")


def _unicode(ascii_name: str) -> str:
    """The name as people read it (punycode labels decoded), for display only."""
    return ".".join(idna.ToUnicode(label) if label.startswith("xn--") else label
                    for label in ascii_name.split("."))


def _port(settings: StackSettings, name: str) -> int:
    return {**DEFAULT_PORTS, **settings.ports}[name]


def mta_sts_mode(settings: StackSettings) -> str:
    """The MTA-STS mode: settings.mta_sts_mode when settings carry one, else enforce."""
    mode = getattr(settings, "mta_sts_mode", None) or DEFAULT_MTA_STS_MODE
    if mode not in MTA_STS_MODES:
        raise SettingsError("mta_sts_mode", f"must be one of {', '.join(MTA_STS_MODES)}")
    return mode


def _path(path: Path | str, field: str) -> str:
    text = str(path)
    if not SAFE_PATH.fullmatch(text) or "/../" in text + "/":
        raise SettingsError(field, f"{text[:80]!r} cannot go into nginx's configuration; use an absolute "
                                   f"path of letters, digits and . _ - + @ only")
    return text


def serves_ca_certificate(settings: StackSettings) -> bool:
    """Whether the certificate served is the CA's one installed in tls/live (its chain
    checked by portal/certs/store.py), rather than the bootstrap one or files named
    in settings (which may be self-signed)."""
    return not settings.tls_cert and settings.cert_path == settings.tls_dir / "live" / "fullchain.pem"


def _hsts(settings: StackSettings) -> str:
    """The Strict-Transport-Security line for a server or location, or nothing."""
    if not serves_ca_certificate(settings):
        return ""
    return f'add_header Strict-Transport-Security "max-age={HSTS_MAX_AGE}" always;'


def dav_url(settings: StackSettings) -> str:
    """Where CalDAV/CardDAV clients point: https://<hostname>/dav/."""
    return f"https://{_names(settings)[1]}{DAV_PATH}"


# -- the static files ------------------------------------------------------------------

def mta_sts_policy(settings: StackSettings) -> str:
    """The MTA-STS policy file (RFC 8461, section 3.2): CRLF-terminated key: value lines."""
    _domain, host = _names(settings)
    lines = ["version: STSv1",
             f"mode: {mta_sts_mode(settings)}",
             f"mx: {host}",
             f"max_age: {MTA_STS_MAX_AGE}"]
    return "".join(line + "\r\n" for line in lines)


def mta_sts_policy_id(settings: StackSettings) -> str:
    """An id for the `_mta-sts.<domain>` TXT record (v=STSv1; id=...): it changes
    whenever the policy does, which is how senders learn to fetch it again."""
    return hashlib.sha256(mta_sts_policy(settings).encode()).hexdigest()[:20]


def _xml(root: ET.Element) -> str:
    """The document, indented, with its declaration (ElementTree escapes every value)."""
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = str(text)
    return element


def autoconfig_xml(settings: StackSettings, display_name: str | None = None) -> str:
    """Thunderbird's autoconfig file (clientConfig 1.1): IMAP 993 and POP3 995 over
    TLS, submission on 465 (TLS) and 587 (STARTTLS), and the CalDAV/CardDAV URL.
    Ports are the published ones (settings.ports)."""
    domain, host = _names(settings)
    root = ET.Element("clientConfig", {"version": "1.1"})
    provider = _sub(root, "emailProvider", id=domain)
    _sub(provider, "domain", domain)
    _sub(provider, "displayName", display_name or _unicode(domain))
    _sub(provider, "displayShortName", display_name or _unicode(domain))
    servers = (("incomingServer", "imap", "imaps", "SSL"),
               ("incomingServer", "pop3", "pop3s", "SSL"),
               ("outgoingServer", "smtp", "submissions", "SSL"),
               ("outgoingServer", "smtp", "submission", "STARTTLS"))
    for tag, kind, port_name, socket_type in servers:
        server = _sub(provider, tag, type=kind)
        _sub(server, "hostname", host)
        _sub(server, "port", _port(settings, port_name))
        _sub(server, "socketType", socket_type)
        _sub(server, "authentication", "password-cleartext")
        _sub(server, "username", "%EMAILADDRESS%")
    for tag, kind in (("addressBook", "carddav"), ("calendar", "caldav")):
        dav = _sub(root, tag, type=kind)
        _sub(dav, "username", "%EMAILADDRESS%")
        _sub(dav, "authentication", "http-basic")
        _sub(dav, "serverURL", dav_url(settings))
    return _xml(root)


def autodiscover_xml(settings: StackSettings) -> str:
    """Outlook's POX autodiscover answer (same for every address: it is a static
    file): IMAP 993, POP3 995 and SMTP 465, all over TLS; the login is the address."""
    _domain, host = _names(settings)
    root = ET.Element("Autodiscover", {"xmlns": AUTODISCOVER_RESPONSE_NS})
    response = _sub(root, "Response", xmlns=AUTODISCOVER_OUTLOOK_NS)
    account = _sub(response, "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    for kind, port_name in (("IMAP", "imaps"), ("POP3", "pop3s"), ("SMTP", "submissions")):
        protocol = _sub(account, "Protocol")
        _sub(protocol, "Type", kind)
        _sub(protocol, "Server", host)
        _sub(protocol, "Port", _port(settings, port_name))
        _sub(protocol, "DomainRequired", "off")
        _sub(protocol, "SPA", "off")
        _sub(protocol, "SSL", "on")
        _sub(protocol, "AuthRequired", "on")
        if kind == "SMTP":
            _sub(protocol, "UsePOPAuth", "on")
            _sub(protocol, "SMTPLast", "off")
    return _xml(root)


# -- the nginx include -----------------------------------------------------------------

def _tls(settings: StackSettings) -> str:
    cert = _path(settings.cert_path, "tls_cert")
    key = _path(settings.key_path, "tls_key")
    return f"""\
    listen 443 ssl http2;
    listen [::]:443 ssl http2;
    server_tokens off;

    ssl_certificate     {cert};
    ssl_certificate_key {key};
    ssl_protocols {TLS_PROTOCOLS};
    ssl_ciphers {TLS_CIPHERS};
    ssl_prefer_server_ciphers off;
    ssl_session_cache shared:mailstead:1m;
    ssl_session_tickets off;

    add_header X-Content-Type-Options nosniff always;
""" + (f"    {hsts}\n" if (hsts := _hsts(settings)) else "")


def _static(location: str, path: str, content_type: str, hsts: str, extra: str = "") -> str:
    # A location with add_header of its own inherits none of the server's: HSTS is repeated.
    if hsts:
        extra = f"\n        {hsts}{extra}"
    return f"""\
    location {location} {{
        alias {path};
        types {{ }}
        default_type "{content_type}";
        add_header Cache-Control "max-age=3600" always;
        add_header X-Content-Type-Options nosniff always;{extra}
    }}
"""


def _client_config(autoconfig: str, autodiscover: str, hsts: str) -> str:
    """Thunderbird's and Outlook's files, as every server block that offers them says."""
    xml = "application/xml; charset=utf-8"
    return (_static("= /mail/config-v1.1.xml", autoconfig, xml, hsts)
            + _static("= /.well-known/autoconfig/mail/config-v1.1.xml", autoconfig, xml, hsts)
            # Outlook POSTs its request (any case of the path). nginx's static
            # handler refuses POST with 405; error_page turns that into an
            # internal GET of the same file, answered 200.
            + _static("~* ^/autodiscover/autodiscover\\.xml$", autodiscover, xml, hsts, """
        client_max_body_size 64k;
        error_page 405 =200 $uri;"""))


def nginx_conf(settings: StackSettings, www_dir: Path = WWW_DIR, web_sock: Path = WEB_SOCK) -> str:
    """The nginx include (http context) for the stack's web side; see the module's doc."""
    domain, host = _names(settings)
    mta_sts_host, autoconfig_host, autodiscover_host = (f"{p}.{domain}" for p in
                                                        ("mta-sts", "autoconfig", "autodiscover"))
    if host in (mta_sts_host, autoconfig_host, autodiscover_host):
        raise SettingsError("hostname", f"{host} is a name the appliance answers for itself; "
                                        f"use another mail host name, such as mail.{domain}")
    www = _path(www_dir, "www_dir").rstrip("/")
    sock = _path(web_sock, "web_sock")
    policy, autoconfig, autodiscover = (f"{www}/{name}" for name in
                                        (MTA_STS_FILE, AUTOCONFIG_FILE, AUTODISCOVER_FILE))
    dav = DAV_PATH.rstrip("/")
    tls = _tls(settings)
    hsts = _hsts(settings)
    client_config = _client_config(autoconfig, autodiscover, hsts)
    return f"""\
# Mailstead mail stack {settings.version}: the web side, rendered from settings
# by the agent (portal/stack/web.py). Do not edit: every deploy rewrites it.
# Port 80 (ACME, redirects) stays with mailstead.conf's default server; it
# redirects to the mail host named in {REDIRECT_NAME}.

# The mail host: CalDAV/CardDAV, client autoconfiguration, and the portal.
server {{
    server_name {host};
{tls}    add_header X-Frame-Options DENY always;

    client_max_body_size 10m;

    # RFC 6764 discovery: clients given just the host name find the DAV root.
    location = /.well-known/caldav {{
        return 301 {DAV_PATH};
    }}
    location = /.well-known/carddav {{
        return 301 {DAV_PATH};
    }}
    location = {dav} {{
        return 301 {DAV_PATH};
    }}

    # radicale (published on 127.0.0.1 only). The URI goes through as the client
    # sent it; radicale strips X-Script-Name from it (as a reverse proxy's
    # prefix: it sees X-Forwarded-*) and writes it in front of every href.
    location {DAV_PATH} {{
        proxy_pass http://127.0.0.1:{_port(settings, "dav")};
        proxy_set_header Host $http_host;
        proxy_set_header X-Script-Name {dav};
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_set_header X-Remote-User "";
        # Large vCards and calendar imports: stream bodies both ways, no 1 MiB cap.
        client_max_body_size {DAV_MAX_BODY_MB}m;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
    }}

{client_config}
    location / {{
        proxy_pass http://unix:{sock};
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_read_timeout 120s;
        # The portal sets these too: keep one copy, nginx's (also on its error pages).
        proxy_hide_header X-Content-Type-Options;
        proxy_hide_header X-Frame-Options;
    }}
}}

# MTA-STS (RFC 8461): senders fetch the policy over HTTPS from this name only.
server {{
    server_name {mta_sts_host};
{tls}
{_static("= /.well-known/mta-sts.txt", policy, "text/plain; charset=utf-8", hsts)}
    location / {{
        return 404;
    }}
}}

# Mail client autoconfiguration: Thunderbird (autoconfig.) and Outlook (autodiscover.).
server {{
    server_name {autoconfig_host} {autodiscover_host};
{tls}
{client_config}
    location / {{
        return 404;
    }}
}}
"""


def redirect_conf(settings: StackSettings) -> str:
    """The port-80 redirect target that mailstead.conf includes: the mail host, fixed
    (a `return` in its `location /`, before its own fallback to the server's address)."""
    _domain, host = _names(settings)
    return f"""\
# Mailstead {settings.version}: where mailstead.conf's port-80 server sends browsers,
# rendered from settings by the agent (portal/stack/web.py). Do not edit.
return 301 https://{host}$request_uri;
"""


# -- writing them ----------------------------------------------------------------------

def web_files(settings: StackSettings, www_dir: Path = WWW_DIR,
              web_sock: Path = WEB_SOCK) -> dict[str, str]:
    """{file name: content}: the includes (NGINX_FILES) and the static files."""
    return {
        NGINX_CONF_NAME: nginx_conf(settings, www_dir, web_sock),
        REDIRECT_NAME: redirect_conf(settings),
        MTA_STS_FILE: mta_sts_policy(settings),
        AUTOCONFIG_FILE: autoconfig_xml(settings),
        AUTODISCOVER_FILE: autodiscover_xml(settings),
    }


def _replace(path: Path, content: str) -> bool:
    """Atomically make `path` hold `content` (mode 0644) through the safe-write helper;
    False if it already did."""
    data = content.encode()
    try:
        if safefs.read_bytes(path, len(data) + 1, owner_uid=os.geteuid()) == data:
            return False
    except (FileNotFoundError, UnsafePathError):
        pass  # missing, a symlink, another user's or too big: replaced (never followed)
    safefs.write_bytes(path, data, 0o644)
    return True


def write_web_files(settings: StackSettings, nginx_dir: Path = NGINX_DIR, www_dir: Path = WWW_DIR,
                    web_sock: Path = WEB_SOCK) -> list[Path]:
    """Put the static files in `www_dir` (made 0755 if missing) and the includes in
    `nginx_dir`, static files first so that the include never points at a missing
    file. Returns the files whose content changed: reload nginx (`nginx -t`,
    then `nginx -s reload`) if the list is not empty."""
    files = web_files(settings, www_dir, web_sock)
    safefs.ensure_dir(www_dir, 0o755)
    changed = [www_dir / name for name, content in files.items()
               if name not in NGINX_FILES and _replace(www_dir / name, content)]
    safefs.ensure_dir(nginx_dir, 0o755)
    changed += [nginx_dir / name for name in NGINX_FILES if _replace(nginx_dir / name, files[name])]
    return changed
