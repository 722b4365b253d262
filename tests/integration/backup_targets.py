"""Real backup targets on loopback for the tests: a moto S3 server and an sshd
serving SFTP with a key made by the test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, retry, stop_process


def _listening(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@dataclass
class Moto:
    """moto's S3 server (in memory). With auth on, only the IAM key made at start is accepted."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    access_key_id: str = ""
    secret_access_key: str = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Moto:
        self.port = self.port or free_port()
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "AWS_DEFAULT_REGION": "us-east-1"}
        log = open(self.workdir / f"moto-{self.port}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        retry(lambda: _listening(self.port), 30, f"moto on port {self.port}")
        if not self.access_key_id:
            self._make_key()
        return self

    def _make_key(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="mailstead")
        iam.put_user_policy(UserName="mailstead", PolicyName="s3", PolicyDocument=(
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'))
        key = iam.create_access_key(UserName="mailstead")["AccessKey"]
        self.access_key_id, self.secret_access_key = key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@dataclass
class Sshd:
    """OpenSSH's sshd on 127.0.0.1:<port> for the current user (root here), key-only, sftp subsystem."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host_key = self.workdir / "host_ed25519"
        self.client_key = self.workdir / "client_ed25519"
        self.authorized = self.workdir / "authorized_keys"
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(f"{self.client_key}.pub", self.authorized)
        os.chmod(self.authorized, 0o600)
        self.user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name

    def start(self) -> Sshd:
        if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
            raise RuntimeError("sshd is not installed: apt-get install --no-install-recommends openssh-server")
        self.port = self.port or free_port()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized}", "StrictModes no", "UsePAM no",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password", f"PidFile {self.workdir}/sshd.pid",
            "Subsystem sftp internal-sftp", "LogLevel VERBOSE", ""]))
        log = open(self.workdir / "sshd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        retry(lambda: _listening(self.port), 15, f"sshd on port {self.port}")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
