"""Backup targets: validation (naming the field), secrets on disk, restic's environment.

Everything secret lives under <state>/secrets (0700), each file 0600:
    backup.json        the target and its credentials (S3 keys)
    backup-password    the restic repository password (generated at configuration)
    backup-ssh/        SFTP: private key, known_hosts, ssh_config
The recovery sheet (`recovery_sheet`) is the only place the password is shown.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets as pysecrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from portal.backup import BackupError

KINDS = ("local", "sftp", "s3")
# What the agent's sandbox keeps read-only (mailstead-agent.service: ProtectSystem=full,
# ProtectHome=read-only) or is no place for a backup: a local target must be elsewhere.
READ_ONLY_ROOTS = ("/usr", "/boot", "/efi", "/etc", "/home", "/root", "/run/user", "/proc", "/sys", "/dev")
_HOST_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,31}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SSH_ALIAS = "mailstead-backup"


@dataclass(frozen=True)
class Target:
    kind: str
    path: str = ""              # local: folder; sftp: folder on the server; s3: prefix in the bucket
    host: str = ""              # sftp
    port: int = 0               # sftp (default 22)
    user: str = ""              # sftp
    endpoint: str = ""          # s3: http(s)://host[:port]
    bucket: str = ""            # s3
    region: str = ""            # s3 (optional)
    access_key_id: str = ""     # s3 (secret)
    secret_access_key: str = ""  # s3 (secret)

    def public(self) -> dict[str, object]:
        """The target without credentials (safe to show and log)."""
        d = {k: v for k, v in asdict(self).items() if v not in ("", 0)}
        d.pop("secret_access_key", None)
        if "access_key_id" in d:
            d["access_key_id"] = d["access_key_id"][:4] + "…"
        d["repository"] = self.repository()
        return d

    def repository(self) -> str:
        """restic's repository string (never holds a credential)."""
        if self.kind == "local":
            return self.path
        if self.kind == "sftp":
            return f"sftp:{SSH_ALIAS}:{self.path}"
        prefix = self.path.strip("/")
        return f"s3:{self.endpoint.rstrip('/')}/{self.bucket}" + (f"/{prefix}" if prefix else "")


def validate(kind: str, **fields: Any) -> Target:
    """A checked Target, or BackupError (code "invalid") naming the first bad field and the fix."""
    try:
        return _validate(kind, **fields)
    except BackupError as err:
        err.code = "invalid"
        raise


def _validate(kind: str, *, path: str = "", host: str = "", port: int = 0, user: str = "",
             endpoint: str = "", bucket: str = "", region: str = "", access_key_id: str = "",
             secret_access_key: str = "") -> Target:
    """A checked Target, or BackupError naming the first bad field and the fix."""
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise BackupError(f"target: '{kind[:20]}' is not a backup target; use one of {', '.join(KINDS)}", "target")
    path = path.strip()
    if kind == "local":
        if not path:
            raise BackupError("path: give the folder (or mounted disk) to keep backups in, e.g. /mnt/backup/mailstead", "path")
        if not path.startswith("/"):
            raise BackupError("path: must be an absolute folder, e.g. /mnt/backup/mailstead", "path")
        if ".." in Path(path).parts:
            raise BackupError("path: must not contain '..'", "path")
        path = os.path.normpath(path)
        if path == "/" or any(path == r or path.startswith(r + "/") for r in READ_ONLY_ROOTS):
            raise BackupError(f"path: the agent cannot write {path[:100]} (the system and home folders are "
                              "read-only to it); use a folder on a disk mounted under /mnt, /media or /srv, "
                              "e.g. /mnt/backup/mailstead", "path")
        return Target("local", path=path)
    if kind == "sftp":
        host = host.strip()
        if not host:
            raise BackupError("host: give the SFTP server's name or address, e.g. backup.example.net", "host")
        if not _is_host(host):
            raise BackupError(f"host: '{host[:64]}' is not a host name or IP address", "host")
        port = port or 22
        if not 1 <= port <= 65535:
            raise BackupError("port: must be a port number from 1 to 65535 (SFTP is usually 22)", "port")
        user = user.strip()
        if not user:
            raise BackupError("user: give the account on the SFTP server", "user")
        if not _USER_RE.match(user):
            raise BackupError("user: letters, digits, '.', '_' and '-' only", "user")
        if not path:
            raise BackupError("path: give the folder on the SFTP server, e.g. /srv/backup/mailstead", "path")
        if any(c in path for c in "\n\r\t ;'\"`$\\"):
            raise BackupError("path: spaces, quotes and shell characters are not allowed", "path")
        return Target("sftp", path=path, host=host, port=port, user=user)
    # s3
    endpoint = endpoint.strip()
    if not endpoint:
        raise BackupError("endpoint: give the S3 service URL, e.g. https://s3.eu-central-1.amazonaws.com", "endpoint")
    parts = urlsplit(endpoint)
    try:
        parts.port
    except ValueError:
        raise BackupError("endpoint: the port is not a number from 1 to 65535", "endpoint") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not _is_host(parts.hostname):
        raise BackupError("endpoint: must be an http:// or https:// URL with a host, e.g. https://s3.example.com", "endpoint")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise BackupError("endpoint: only scheme, host and port (no user, path or query); "
                          "put the bucket in 'bucket' and keys in their own fields", "endpoint")
    bucket = bucket.strip()
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise BackupError("bucket: 3 to 63 lower-case letters, digits, '.' and '-', e.g. mailstead-backup", "bucket")
    if path and (not re.match(r"^[A-Za-z0-9._/-]+$", path) or ".." in path):
        raise BackupError("path: the prefix inside the bucket may hold letters, digits, '.', '_', '-' and '/'", "path")
    if not access_key_id.strip():
        raise BackupError("access_key_id: give the S3 access key ID", "access_key_id")
    if not secret_access_key.strip():
        raise BackupError("secret_access_key: give the S3 secret access key", "secret_access_key")
    if region and not re.match(r"^[a-z0-9-]{1,40}$", region.strip()):
        raise BackupError("region: e.g. us-east-1 (lower-case letters, digits and '-')", "region")
    return Target("s3", path=path.strip("/"), endpoint=f"{parts.scheme}://{parts.netloc}", bucket=bucket,
                  region=region.strip(), access_key_id=access_key_id.strip(),
                  secret_access_key=secret_access_key.strip())


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOST_RE.match(host))


# -- files ------------------------------------------------------------------------

@dataclass(frozen=True)
class Paths:
    secrets: Path

    @property
    def config(self) -> Path:
        return self.secrets / "backup.json"

    @property
    def password(self) -> Path:
        return self.secrets / "backup-password"

    @property
    def ssh(self) -> Path:
        return self.secrets / "backup-ssh"

    @property
    def ssh_key(self) -> Path:
        return self.ssh / "id_ed25519"

    @property
    def ssh_config(self) -> Path:
        return self.ssh / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.ssh / "known_hosts"


# Files under secrets/ that belong to the backup itself: not restored over a new machine's.
OWN_SECRETS = ("backup.json", "backup-password", "backup-ssh", ".backup-password.new")


def write_secret(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` mode 0600 (made 0600 before any byte is written), atomically,
    through the safe-write helper (no symlink followed, no fixed temporary name)."""
    from portal.core import safefs

    safefs.ensure_dir(path.parent, 0o700)
    safefs.write_bytes(path, data.encode() if isinstance(data, str) else data, 0o600)


def new_password() -> str:
    """32 random characters in groups of 4 (easy to type from a printed sheet)."""
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i
    raw = "".join(pysecrets.choice(alphabet) for _ in range(32))
    return "-".join(raw[i:i + 4] for i in range(0, 32, 4))


def save_target(paths: Paths, target: Target, configured_at: str) -> None:
    write_secret(paths.config, json.dumps({"target": asdict(target), "configured_at": configured_at},
                                          indent=2, sort_keys=True) + "\n")


def load_target(paths: Paths) -> Target:
    try:
        data = json.loads(paths.config.read_text())
        target = Target(**data["target"])
    except FileNotFoundError:
        raise BackupError("target: backups are not configured yet; choose a target first "
                          "(dashboard Backups, or `mailstead backup configure`)", "target", "not_configured") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise BackupError(f"target: {paths.config} is unreadable; configure the backup target again",
                          "target", "not_configured") from None
    if not paths.password.exists():
        raise BackupError(f"password: {paths.password} is missing; configure the target again with the "
                          "password from the recovery sheet", "password", "not_configured")
    return target


def write_ssh_files(paths: Paths, target: Target, key: str | None) -> str:
    """The SFTP key (given, kept, or generated), known_hosts and an ssh_config for
    restic's `sftp.command`. Returns the public key to put in authorized_keys."""
    import subprocess

    from portal.core import safefs

    safefs.ensure_dir(paths.secrets, 0o700)
    safefs.ensure_dir(paths.ssh, 0o700)
    if key:
        text = key.strip() + "\n"
        if "PRIVATE KEY-----" not in text:
            raise BackupError("key: paste the whole private key, from -----BEGIN to -----END lines", "key")
        write_secret(paths.ssh_key, text)
    elif not paths.ssh_key.exists():
        safefs.remove(paths.ssh_key)
        safefs.remove(paths.ssh_key.with_name(paths.ssh_key.name + ".pub"))
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mailstead-backup",
                        "-f", str(paths.ssh_key)], check=True, capture_output=True, timeout=30)
    os.chmod(paths.ssh_key, 0o600)
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(paths.ssh_key)], capture_output=True, text=True,
                         timeout=30, check=False)
    if pub.returncode != 0:
        raise BackupError("key: not a usable SSH private key (or it has a passphrase; give one without)", "key")
    if not paths.known_hosts.exists():
        write_secret(paths.known_hosts, "")
    host = f"[{target.host}]:{target.port}" if target.port != 22 else target.host
    write_secret(paths.ssh_config, "\n".join([
        f"Host {SSH_ALIAS}",
        f"  HostName {target.host}",
        f"  Port {target.port}",
        f"  User {target.user}",
        f"  IdentityFile {paths.ssh_key}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {paths.known_hosts}",
        f"  HostKeyAlias {host}",
        "  StrictHostKeyChecking accept-new",  # first contact pins the key; a change is refused
        "  BatchMode yes",
        "  ConnectTimeout 15",
        "  ServerAliveInterval 15",
        "  ServerAliveCountMax 4",
        "",
    ]))
    return pub.stdout.strip()


def sftp_preflight(paths: Paths, target: Target, timeout: float = 30) -> None:
    """Log in once with sftp (an empty batch) before restic does: ssh's own answer
    says reliably whether the host is unreachable, the host key changed or the key
    is refused (restic relays ssh's messages only partly when it gives up)."""
    import subprocess

    try:
        proc = subprocess.run(["sftp", "-F", str(paths.ssh_config), "-b", "-", SSH_ALIAS], input="",
                              capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise BackupError("sftp: the OpenSSH client is not installed; install openssh-client",
                          "target", "restic") from None
    except subprocess.TimeoutExpired:
        raise BackupError(f"target: the SFTP server {target.host} port {target.port} did not answer within "
                          f"{timeout:g} s; is it up and reachable from this appliance?", "target",
                          "unreachable") from None
    if proc.returncode == 0:
        return
    low = proc.stderr.lower()
    if "host key verification failed" in low or "remote host identification has changed" in low:
        raise BackupError(f"host: the SFTP server {target.host} presents a different host key than the one "
                          "recorded at configuration; if the server was rebuilt, configure the target again",
                          "host", "host_key")
    if "permission denied" in low:
        raise BackupError(f"key: the SFTP server {target.host} refused user {target.user} with the appliance's "
                          "key; add the public key shown at configuration to the user's authorized_keys",
                          "key", "bad_credentials")
    detail = " ".join(proc.stderr.split())[-200:] or f"sftp exited {proc.returncode}"
    raise BackupError(f"target: cannot reach the SFTP server {target.host} port {target.port} ({detail}); "
                      "is the server up and reachable from this appliance?", "target", "unreachable")


def restic_env(paths: Paths, target: Target, cache_dir: Path, password_file: Path | None = None) -> dict[str, str]:
    """restic's environment: nothing inherited but PATH (no stray RESTIC_* or AWS_*)."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "HOME": str(paths.secrets), "RESTIC_REPOSITORY": target.repository(),
           "RESTIC_PASSWORD_FILE": str(password_file or paths.password), "RESTIC_CACHE_DIR": str(cache_dir),
           "RESTIC_PROGRESS_FPS": "0.5"}
    if target.kind == "s3":
        env["AWS_ACCESS_KEY_ID"] = target.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = target.secret_access_key
        if target.region:
            env["AWS_DEFAULT_REGION"] = target.region
    return env


def restic_options(paths: Paths, target: Target) -> list[str]:
    if target.kind == "sftp":
        return ["-o", f"sftp.command=ssh -F {paths.ssh_config} {SSH_ALIAS} -s sftp"]
    return []


def recovery_sheet(target: Target, password: str, version: str, hostname: str) -> str:
    """The printable sheet shown once at configuration: everything needed to
    restore onto a freshly flashed appliance."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = {"local": f"folder {target.path} on this machine (or the disk mounted there)",
             "sftp": f"SFTP server {target.host} port {target.port}, user {target.user}, folder {target.path}",
             "s3": f"S3 store {target.endpoint}, bucket {target.bucket}" + (f", prefix {target.path}" if target.path else "")}[target.kind]
    lines = [
        "MAILSTEAD BACKUP RECOVERY SHEET — keep it printed and safe; it is shown only once",
        "",
        f"Appliance:   {hostname or '(not set up yet)'}, Mailstead {version}",
        f"Date:        {now}",
        f"Target:      {where}",
        f"Repository:  {target.repository()}",
        f"Password:    {password}",
    ]
    if target.kind == "s3":
        lines.append(f"Access key:  {target.access_key_id} (the secret key is not printed: keep it with the S3 account)")
    if target.kind == "sftp":
        lines.append("SSH key:     the appliance's key (in secrets/backup-ssh); on a new appliance, add its new key "
                     "to the server's authorized_keys")
    lines += [
        "",
        "Without this password the backups cannot be read by anyone, including you.",
        "",
        "To restore onto a new appliance:",
        "  1. Flash and boot Mailstead (the same version or newer).",
        "  2. In the setup wizard choose 'Restore from backup' (or run `mailstead restore`),",
        "     enter the target above and this password.",
        "  3. Mail, accounts, keys, certificates and settings come back; update DNS if the IP address changed.",
        "",
        "To read the backups by hand: restic -r <repository> snapshots  (restic asks for the password).",
    ]
    return "\n".join(lines) + "\n"
