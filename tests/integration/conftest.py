"""Integration tier: the appliance's nginx front config as shipped, served by a
real nginx on loopback, proxying to the real portal (gunicorn on a unix socket,
with a real agent behind it). State, certificate and token come from a real
`python -m portal.agent.firstboot` run in a temporary state dir."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port, launch_agent, launch_gunicorn, retry, stop_process

NGINX = "/usr/sbin/nginx"
SHIPPED_CONF = REPO / "image" / "extra" / "etc" / "nginx" / "conf.d" / "mailstead.conf"
TIMEOUT = 5  # seconds, for every request the tests make


def _sub(text: str, pattern: str, repl: str, count: int) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert n == count, (f"{SHIPPED_CONF.name}: expected {count} match(es) of {pattern!r}, found {n}; "
                        "the shipped config changed, update localize_nginx_conf()")
    return new


def localize_nginx_conf(conf: str, *, http_port: int, https_port: int, tls_dir: Path,
                        acme_dir: Path, web_sock: Path, nginx_dir: Path, stack_conf: Path | None = None) -> str:
    """Rewrite ONLY what is machine-specific in the shipped config, so that the rest
    is tested exactly as shipped: listen addresses (loopback, free ports, no [::]),
    the certificate/key paths, the ACME root, the portal's unix socket and the
    folder of the agent's includes (its ctx.nginx_dir, /var/lib/mailstead/nginx). The
    agent's server blocks come from `stack_conf` (a copy localized by the test), or
    from nowhere."""
    conf = _sub(conf, r"^(\s*listen\s+)80(\s)", rf"\g<1>127.0.0.1:{http_port}\2", 1)
    conf = _sub(conf, r"^(\s*listen\s+)443(\s)", rf"\g<1>127.0.0.1:{https_port}\2", 1)
    conf = _sub(conf, r"^\s*listen\s+\[::\]:\d+[^;]*;\n", "", 2)
    conf = _sub(conf, r"/var/lib/mailstead/tls/", f"{tls_dir}/", 2)
    conf = _sub(conf, r"/var/lib/mailstead-acme/", f"{acme_dir}/", 1)
    conf = _sub(conf, r"unix:/run/mailstead/web\.sock", f"unix:{web_sock}", 1)
    conf = _sub(conf, r"^include /var/lib/mailstead/nginx/mailstead-stack\*\.conf;$",
                f"include {stack_conf};" if stack_conf else "", 1)
    conf = _sub(conf, r"(\binclude\s+)/var/lib/mailstead/nginx/", rf"\g<1>{nginx_dir}/", 1)
    return conf


def localize_stack_conf(conf: str, https_port: int) -> str:
    """The agent's generated include (portal/stack/web.py): only the listen lines
    change: loopback and a free port, no [::]."""
    conf, n = re.subn(r"^(\s*listen\s+)443(\s)", rf"\g<1>127.0.0.1:{https_port}\2", conf, flags=re.MULTILINE)
    assert n == 3, f"expected 3 server blocks on 443, found {n}"
    conf, n = re.subn(r"^\s*listen\s+\[::\]:443[^;]*;\n", "", conf, flags=re.MULTILINE)
    assert n == 3, f"expected 3 [::]:443 listeners, found {n}"
    return conf


def main_nginx_conf(tmp: Path, site: Path) -> str:
    """The smallest nginx.conf around the site file, everything it writes in `tmp`."""
    return f"""\
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    # As Debian's stock nginx.conf: the shipped server block must override these.
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {site};
}}
"""


def start_nginx(prefix: Path, site: Path, *shown: Path) -> subprocess.Popen[bytes]:
    """Check (`nginx -t`) and start nginx in the foreground under `prefix` with
    `site` as its server config; a refusal shows nginx's error and `shown` files."""
    main = prefix / "nginx.conf"
    main.write_text(main_nginx_conf(prefix, site))
    test = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(main)],
                          capture_output=True, text=True, timeout=30)
    texts = "\n".join(p.read_text() for p in (site, *shown))
    assert test.returncode == 0, f"nginx -t refused the config:\n{test.stderr}\n{texts}"
    with open(prefix / "nginx.out", "wb") as out:
        return subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(main), "-g", "daemon off;"],
                                stdout=out, stderr=subprocess.STDOUT)


@dataclass
class Portal:
    """gunicorn serving portal.web.wsgi:app on a unix socket, as mailstead-web does."""

    sock: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.proc = launch_gunicorn("--bind", f"unix:{self.sock}", env=self.env, log=self.log)
        retry(self._healthy, 30, f"gunicorn on {self.sock}")

    def stop(self) -> None:
        stop_process(self.proc)

    def _healthy(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {self.log.read_text(errors='replace')[-3000:]}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(self.sock))
            s.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            status = s.recv(64).split(b"\r\n", 1)[0]
        assert b" 200 " in status, status


@dataclass
class Front:
    http_port: int
    https_port: int
    state_dir: Path
    acme_dir: Path
    portal: Portal
    error_log: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def cert(self) -> Path:
        return self.state_dir / "tls" / "bootstrap.crt"

    @property
    def token(self) -> str:
        return (self.state_dir / "setup-token").read_text().strip()

    def session(self) -> requests.Session:
        """A client that trusts the bootstrap certificate and ignores proxy settings."""
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.cert)
        return s


@pytest.fixture(scope="session")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    assert Path(NGINX).exists(), f"{NGINX} is missing: apt-get install -y --no-install-recommends nginx-light"
    root = tmp_path_factory.mktemp("front")
    state, run, acme, ngx = root / "state", root / "run", root / "acme", root / "nginx"
    for d in (state, run, acme, ngx):
        d.mkdir()

    env = {**os.environ, "MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_RUN_DIR": str(run),
           "MAILSTEAD_ISSUE_PATH": str(root / "issue"), "MAILSTEAD_AGENT_SOCKET": str(run / "agent.sock")}
    subprocess.run([sys.executable, "-m", "portal.agent.firstboot"], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=60)

    agent = launch_agent(run, env={"MAILSTEAD_STATE_DIR": str(state)})
    portal = Portal(sock=run / "web.sock", env={**env, "MAILSTEAD_WEB_DIR": str(root / "web")},
                    log=root / "gunicorn.log")
    nginx: subprocess.Popen[bytes] | None = None
    try:
        portal.start()
        http_port, https_port = free_port(), free_port()
        site = ngx / "mailstead.conf"
        site.write_text(localize_nginx_conf(
            SHIPPED_CONF.read_text(), http_port=http_port, https_port=https_port,
            tls_dir=state / "tls", acme_dir=acme, web_sock=portal.sock, nginx_dir=ngx / "conf.d"))
        nginx = start_nginx(ngx, site)
        front = Front(http_port, https_port, state, acme, portal, ngx / "error.log")

        def listening() -> None:
            assert nginx is not None
            if nginx.poll() is not None:
                raise AssertionError(f"nginx exited: {front.error_log.read_text(errors='replace')}")
            for port in (http_port, https_port):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()

        retry(listening, 15, "nginx on its loopback ports")
        yield front
    finally:
        stop_process(nginx)
        portal.stop()
        agent.stop()
        for log in (root / "gunicorn.log", ngx / "error.log"):
            if log.exists():
                print(f"--- {log}:\n{log.read_text(errors='replace')[-3000:]}")
