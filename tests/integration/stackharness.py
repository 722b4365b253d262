"""Bring the real mail stack up on the host's docker engine, on loopback.

Each user of the harness picks its own compose project name and port base,
so several stacks (e.g. parallel test modules) never collide.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portal.stack import deploy as deploy_mod
from portal.stack.dkim import ensure_keys, selector_records
from portal.stack.images import load_images
from portal.stack.settings import DEFAULT_PORTS, StackSettings

from .knot import Knot, Record, txt_rdata

REPO = Path(__file__).resolve().parents[2]
IMAGES_DIR = Path(os.environ.get("MAILSTEAD_IMAGES_DIR", REPO / "mkosi.output"))
VERSION = "0.1.0"
DOMAIN = "example.test"
HOSTNAME = "mail.example.test"
DKIM_SELECTORS = StackSettings(domain=DOMAIN, hostname=HOSTNAME).dkim_selectors


def ensure_images(client: docker.DockerClient) -> dict[str, str]:
    """Load the mkosi-built image tars (building the image first if they are missing)."""
    if not (IMAGES_DIR / "mailstead-base.tar").exists():
        subprocess.run([str(REPO / "scripts/build-image"), "--profile", "test", "--raw-only"], check=True)
    return load_images(client, IMAGES_DIR, VERSION, lock_path=IMAGES_DIR / ".load.lock")


def make_tls(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for `names` (and 127.0.0.1)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


# -- DNS for the containers -------------------------------------------------------
# One knot per test session on the docker bridge's gateway address, port 53
# (docker's `dns:` takes no port), authoritative for the test domain, with
# the records a real deployment would publish (DKIM keys shared by every
# test stack). Names outside the zone get REFUSED at once, so no lookup ever
# leaves the machine or waits for a timeout.
_dns: Knot | None = None
SHARED_DKIM = Path(tempfile.mkdtemp(prefix="mailstead-test-dkim-"))
atexit.register(shutil.rmtree, SHARED_DKIM, True)


def dns_address() -> str:
    """Where this process's DNS server for the stacks listens. Port 53 (unbound takes
    forwarders without a port), on an address of its own so that the tier's parallel
    workers (pytest-xdist) each run one: 198.18.53.<worker + 1> (RFC 2544's benchmark
    range, used nowhere else) on the host's loopback interface, which the containers
    reach through their network's gateway as they would any address of the host."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    address = f"198.18.53.{int(worker) + 1 if worker.isdigit() else 1}"
    subprocess.run(["ip", "addr", "replace", f"{address}/32", "dev", "lo"], capture_output=True, check=True)
    return address


def zone_records() -> list[Record]:
    ensure_keys(SHARED_DKIM, DKIM_SELECTORS)
    records = [
        Record("@", "MX", f"10 {HOSTNAME}."),
        Record("mail", "A", "127.0.0.1"),
        Record("@", "TXT", txt_rdata("v=spf1 mx -all")),
        Record("_dmarc", "TXT", txt_rdata(f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}")),
    ]
    for name, value in selector_records(SHARED_DKIM, DKIM_SELECTORS, DOMAIN):
        records.append(Record(name.removesuffix(f".{DOMAIN}"), "TXT", txt_rdata(value)))
    return records


def shared_dns() -> Knot:
    """The session's DNS server for the stacks (started on first use)."""
    global _dns
    if _dns is None:
        workdir = Path(tempfile.mkdtemp(prefix="mailstead-test-knot-"))
        atexit.register(shutil.rmtree, workdir, True)
        _dns = Knot(workdir, DOMAIN, zone_records(), address=dns_address(), port=53).start()
        atexit.register(_dns.stop)
    return _dns


def make_settings(state_dir: Path, project: str, port_base: int) -> StackSettings:
    """Settings for a stack published on 127.0.0.1 at port_base + the standard port % 1000,
    on a network of its own (172.31.<port_base // 1000>.0/24), so one left running by an
    interrupted run never blocks another."""
    cert, key = make_tls(state_dir / "tls", [HOSTNAME, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}", f"autodiscover.{DOMAIN}"])
    ports = {name: port_base + port % 1000 for name, port in DEFAULT_PORTS.items()}
    return StackSettings(domain=DOMAIN, hostname=HOSTNAME, state_dir=state_dir, version=VERSION,
                         publish_addresses=("127.0.0.1",), ports=ports, tls_cert=cert, tls_key=key,
                         project=project, dns_servers=(shared_dns().address,),
                         subnet=f"172.31.{port_base // 1000 % 256}.0/24")


@dataclass
class Stack:
    client: docker.DockerClient
    settings: StackSettings

    def deploy(self, **changes: Any) -> deploy_mod.DeployResult:
        if changes:
            self.settings = replace(self.settings, **changes)
        return deploy_mod.deploy(self.client, self.settings, timeout=180)

    def port(self, name: str) -> int:
        return self.settings.ports[name]

    def container(self, service: str) -> Any:
        return self.client.containers.get(f"{self.settings.project}-{service}")

    def exec(self, service: str, *cmd: str, user: str = "root", environment: dict[str, str] | None = None) -> str:
        """Run cmd in the service's container; raise with its output if it fails."""
        code, out = self.container(service).exec_run(list(cmd), user=user, environment=environment)
        text = out.decode(errors="replace")
        if code != 0:
            raise AssertionError(f"{' '.join(cmd)} in {service} exited {code}: {text}")
        return text

    def down(self) -> None:
        deploy_mod.down(self.settings, volumes=True)


def start_stack(state_dir: Path, project: str, port_base: int) -> Stack:
    client = docker.from_env(timeout=120)
    ids = ensure_images(client)
    settings = make_settings(state_dir, project, port_base).with_images(ids)
    shutil.copytree(SHARED_DKIM, settings.dkim_dir, dirs_exist_ok=True)  # the keys the test DNS publishes
    # Leftovers of an interrupted earlier run of the same project.
    subprocess.run(["docker", "compose", "-p", project, "down", "--volumes", "--remove-orphans"],
                   capture_output=True, check=False)
    return Stack(client, settings)


def redis_learns(stack: Stack, which: str = "learns_spam") -> int:
    """How many messages Bayes learned, as stored in redis (at once; rspamd's own
    statistics read it from there every so often)."""
    password = deploy_mod.stack_secrets(stack.settings.secrets_dir)["redis_password"]
    out = stack.exec("redis", "redis-cli", "--no-auth-warning", "HGET", "RS", which,
                     user="redis", environment={"REDISCLI_AUTH": password})
    return int(out.strip() or 0)
