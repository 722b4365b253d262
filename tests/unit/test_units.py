"""The appliance's systemd units keep their sandboxes (issue 14).

Read from image/extra as systemd reads them (a key may repeat; an empty
assignment resets a list), so that dropping PrivateNetwork= from the portal or
widening the agent's capabilities fails here, in a second, rather than in the
booted image. The VM tier measures the same units with `systemd-analyze
security` in the booted image (tests/vm/checks.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import PurePosixPath

import pytest

from tests.conftest import REPO

UNITS = REPO / "image" / "extra" / "usr" / "lib" / "systemd" / "system"
TMPFILES = REPO / "image" / "extra" / "usr" / "lib" / "tmpfiles.d" / "mailstead.conf"
SYSUSERS = REPO / "image" / "extra" / "usr" / "lib" / "sysusers.d" / "mailstead.conf"

# systemd-analyze security's exposure (0 safest, 10 worst) each unit must stay at or below.
TARGETS = {"mailstead-web.service": 2.5, "mailstead-agent.service": 6.0, "mailstead-update-boot.service": 2.0,
           "mailstead-update-verify.service": 3.0, "mailstead-update-deadline.service": 3.0, "mailstead-update@.service": 7.0,
           "mailstead-firstboot.service": 6.0, "mailstead-images.service": 6.0}

# Settings whose later assignments add to the earlier ones (an empty one resets them).
LISTS = {"Environment", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "SystemCallFilter",
         "RestrictAddressFamilies", "CapabilityBoundingSet", "AmbientCapabilities", "StateDirectory",
         "DeviceAllow", "IPAddressDeny", "IPAddressAllow"}

# What ProtectSystem= makes read-only (systemd.exec(5)); strict: everything but the API file systems.
READ_ONLY = {"full": ("/usr", "/boot", "/efi", "/etc"), "yes": ("/usr", "/boot", "/efi")}
HOMES = ("/home", "/root", "/run/user")


def service(name: str) -> dict[str, list[str]]:
    """The [Service] section: each key's effective values, in order."""
    section, out = "", {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not a Key=value line: {raw!r}"
        key, value = key.strip(), value.strip()
        if key in LISTS:
            out[key] = [] if not value else out.get(key, []) + value.split()
        else:
            out[key] = [value]
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    return values[-1] if values else ""


def env(unit: dict[str, list[str]]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in unit.get("Environment", []))


def under(path: str, roots: list[str] | tuple[str, ...]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(r) or PurePosixPath(r) in p.parents for r in roots)


def writable(unit: dict[str, list[str]], path: str) -> bool:
    """Whether the unit's sandbox lets it write `path` (file permissions aside)."""
    rw = [p.lstrip("-") for p in unit.get("ReadWritePaths", [])]
    rw += ["/var/lib/" + d for d in unit.get("StateDirectory", [])]
    hidden = [p.lstrip("-") for p in unit.get("InaccessiblePaths", [])]
    if under(path, hidden):
        return False
    if under(path, rw):
        return True
    if under(path, HOMES) and one(unit, "ProtectHome") in ("yes", "read-only", "tmpfs"):
        return False
    mode = one(unit, "ProtectSystem")
    if mode == "strict":
        return under(path, ("/dev", "/proc", "/sys"))
    return not under(path, READ_ONLY.get(mode, ()))


WEB = "mailstead-web.service"
AGENT = "mailstead-agent.service"
FIRSTBOOT = "mailstead-firstboot.service"
IMAGES = "mailstead-images.service"
ROOT_UNITS = (AGENT, FIRSTBOOT, IMAGES)

# Settings every one of our four services carries (issue 14).
COMMON = {
    "NoNewPrivileges": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "DevicePolicy": "closed",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
    "LockPersonality": "yes", "RestrictRealtime": "yes", "RestrictNamespaces": "yes",
    "SystemCallArchitectures": "native", "UMask": "0077",
}


@pytest.mark.parametrize("name", [WEB, *ROOT_UNITS])
@pytest.mark.parametrize(("key", "value"), sorted(COMMON.items()))
def test_every_unit_has_the_common_sandbox(name: str, key: str, value: str) -> None:
    assert one(service(name), key) == value, f"{name}: {key}= must be {value}"


@pytest.mark.parametrize("name", [WEB, *ROOT_UNITS])
def test_every_unit_filters_system_calls(name: str) -> None:
    unit = service(name)
    assert unit.get("SystemCallFilter", [])[:1] == ["@system-service"], \
        f"{name}: SystemCallFilter= must start from the @system-service allow list"
    assert one(unit, "SystemCallErrorNumber") == "EPERM"
    assert one(unit, "AmbientCapabilities") == ""


def test_web_reaches_nothing_but_unix_sockets() -> None:
    web = service(WEB)
    assert one(web, "PrivateNetwork") == "yes", "the portal talks only to nginx and the agent, over unix sockets"
    assert web["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert web["IPAddressDeny"] == ["any"]
    assert env(web)["MAILSTEAD_AGENT_SOCKET"] == "/run/mailstead/agent.sock"


def test_web_has_no_privilege_at_all() -> None:
    web = service(WEB)
    assert (one(web, "User"), one(web, "Group")) == ("mailstead", "mailstead")
    assert "CapabilityBoundingSet" in web and web["CapabilityBoundingSet"] == [], "no capabilities"
    for key in ("RestrictSUIDSGID", "PrivateUsers", "MemoryDenyWriteExecute", "RemoveIPC"):
        assert one(web, key) == "yes", f"{WEB}: {key}=yes"
    assert (one(web, "ProtectProc"), one(web, "ProcSubset")) == ("invisible", "pid")
    assert {"~@privileged", "@resources"} <= set(web["SystemCallFilter"])


def test_web_writes_only_its_own_folder_and_never_sees_the_agents_state() -> None:
    web = service(WEB)
    assert one(web, "ProtectSystem") == "strict" and one(web, "ProtectHome") == "yes"
    assert web.get("ReadWritePaths", []) == [], "the portal writes only its StateDirectory"
    assert web["StateDirectory"] == ["mailstead-web"] and one(web, "StateDirectoryMode") == "0700"
    assert env(web)["MAILSTEAD_WEB_DIR"] == "/var/lib/mailstead-web"
    assert "/var/lib/mailstead" in web["InaccessiblePaths"]
    assert writable(web, "/var/lib/mailstead-web/secret_key")
    for path in ("/var/lib/mailstead", "/var/lib/mailstead/state.db", "/var/lib/mailstead/nginx",
                 "/usr/lib/mailstead/venv", "/var/lib/mailstead-www", "/run/mailstead"):
        assert not writable(web, path), f"the portal's sandbox lets it write {path}"


# What the agent writes (portal/agent/ops.py Context, the backup, certs and stack
# modules), and local backup folders where an owner mounts a disk.
AGENT_WRITES = ("/var/lib/mailstead/state.db", "/var/lib/mailstead/secrets", "/var/lib/mailstead-acme",
                "/var/lib/mailstead-www", "/var/lib/mailstead/nginx/mailstead-stack.conf", "/mnt/backup/mailstead",
                "/media/usb-disk/mailstead", "/srv/backup/mailstead", "/var/backups/mailstead")
AGENT_READ_ONLY = ("/usr/lib/mailstead/venv/bin/mailstead-agent", "/usr/lib/mailstead/images", "/etc/passwd",
                   "/etc/nginx/nginx.conf", "/etc/nginx/conf.d/x.conf", "/boot", "/root/.ssh/authorized_keys", "/home/owner")


def test_agent_writes_its_folders_and_any_backup_disk_but_not_the_system() -> None:
    agent = service(AGENT)
    assert one(agent, "ProtectSystem") in ("full", "strict")
    for path in AGENT_WRITES:
        assert writable(agent, path), f"the agent's sandbox keeps it from writing {path}"
    for path in AGENT_READ_ONLY:
        assert not writable(agent, path), f"the agent's sandbox lets it write {path}"


def test_local_backup_targets_are_refused_exactly_where_the_agent_cannot_write() -> None:
    from portal.backup import BackupError
    from portal.backup import config as backup_config

    agent = service(AGENT)
    for root in backup_config.READ_ONLY_ROOTS:
        path = root + "/backup/mailstead"
        with pytest.raises(BackupError):
            backup_config.validate("local", path=path)
        if not under(path, ("/proc", "/sys", "/dev")):  # API file systems: no place for a backup
            assert not writable(agent, path), f"{root} is refused as a backup folder but the agent may write it"
    for path in AGENT_WRITES:
        if under(path, ("/mnt", "/media", "/srv", "/var/backups")):
            assert backup_config.validate("local", path=path).path == path


def test_agent_keeps_only_the_capabilities_it_uses() -> None:
    agent = service(AGENT)
    assert one(agent, "User") in ("", "root")
    # chown/chmod of what it writes, tar -p of the volumes' files (owned by the containers'
    # users), and `nginx -t`, which binds 80 and 443 to test them when nginx is not running.
    assert set(agent["CapabilityBoundingSet"]) == {"CAP_CHOWN", "CAP_FOWNER", "CAP_FSETID", "CAP_DAC_OVERRIDE",
                                                   "CAP_DAC_READ_SEARCH", "CAP_NET_BIND_SERVICE"}
    assert agent["RestrictAddressFamilies"] == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert one(agent, "ProtectHome") == "read-only"


def test_agent_may_restore_setgid_folders() -> None:
    """The mail volume's folders are setgid (/var/mail is 2775 root:mail in the
    image): the agent unpacks them with their modes for every backup, so
    RestrictSUIDSGID= would fail every backup of the mail."""
    assert one(service(AGENT), "RestrictSUIDSGID") in ("", "no")


def test_firstboot_writes_only_the_state_and_the_console_message() -> None:
    unit = service(FIRSTBOOT)
    assert one(unit, "ProtectSystem") == "strict"
    assert unit["ReadWritePaths"] == ["/var/lib/mailstead", "/etc/issue.d"]
    assert one(unit, "StandardOutput") == "tty", "the token goes to the console only"
    # Its device policy would refuse the console itself (the unit failed with 209/STDOUT).
    assert "/dev/console" in unit["DeviceAllow"]
    # `ip -j addr show` lists the addresses over netlink: the host's network, but no IP socket.
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX", "AF_NETLINK"] and unit["IPAddressDeny"] == ["any"]
    assert set(unit["CapabilityBoundingSet"]) == set()  # every file it touches is root's own
    # /etc/issue.d is not in the image; ReadWritePaths= needs it before the unit starts.
    assert re.search(r"^d /etc/issue\.d\s+0755 root root", TMPFILES.read_text(), re.M)


def test_images_is_a_root_client_without_any_power() -> None:
    unit = service(IMAGES)
    assert unit["CapabilityBoundingSet"] == [] and one(unit, "PrivateNetwork") == "yes"
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert one(unit, "ProtectSystem") == "strict" and unit.get("ReadWritePaths", []) == []
    assert one(unit, "PrivateUsers") == "yes"


def test_images_tries_again_when_the_engine_is_too_busy_to_answer_but_not_forever() -> None:
    unit = service(IMAGES)
    assert one(unit, "Type") == "oneshot" and one(unit, "Restart") == "on-failure"
    assert one(unit, "RestartSec") == "20s"
    limits = dict(line.split("=", 1) for line in (UNITS / IMAGES).read_text().splitlines()
                  if line.startswith("StartLimit"))
    assert limits == {"StartLimitIntervalSec": "15min", "StartLimitBurst": "4"}, limits


def test_tmpfiles_keep_the_agents_state_to_root() -> None:
    lines = {fields[1]: fields for fields in (line.split() for line in TMPFILES.read_text().splitlines())
             if len(fields) >= 5 and not fields[0].startswith("#")}
    assert lines["/var/lib/mailstead"][2:5] == ["0755", "root", "root"]
    assert lines["/var/lib/mailstead/secrets"][2:5] == ["0700", "root", "root"]
    owned = [path for path, f in lines.items() if path.startswith("/var/lib/mailstead/") and "mailstead" in f[3:5]]
    assert owned == [], f"the web user owns {owned} in the agent's state"
    # The portal's folder is its StateDirectory=, which systemd makes mailstead 0700.
    assert "/var/lib/mailstead-web" not in lines


def test_the_web_users_home_is_not_the_agents_state() -> None:
    line = next(line for line in SYSUSERS.read_text().splitlines() if line.startswith("u"))
    assert line.split()[1] == "mailstead"
    assert "/var/lib/mailstead " not in line + " "


def test_systemd_analyze_rates_each_unit_within_its_target(tmp_path) -> None:
    """Offline, as this machine's systemd-analyze reads the files (the booted image
    may rate slightly differently; the VM tier checks there too). A template is
    rated as an instance (mailstead-update@install.service)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/test installs Debian's systemd for the unit tier"
    paths = {}
    for name in TARGETS:
        if "@." in name:
            paths[name.replace("@.", "@install.")] = tmp_path / name.replace("@.", "@install.")
            paths[name.replace("@.", "@install.")].write_text((UNITS / name).read_text())
        else:
            paths[name] = UNITS / name
    names = list(paths)
    out = subprocess.run([analyze, "security", "--offline=true", "--no-pager", *(str(p) for p in paths.values())],
                         capture_output=True, text=True, timeout=60, check=False)
    assert "--offline" not in out.stderr, f"this systemd-analyze (older than 250) cannot rate files: {out.stderr[:200]}"
    scores = dict(re.findall(r"Overall exposure level for (\S+): (\d+\.\d+)", out.stdout))
    assert set(scores) == set(names), out.stdout[-2000:] + out.stderr[-2000:]
    target = {n: TARGETS.get(n, TARGETS.get(n.replace("@install.", "@."))) for n in names}
    over = {n: float(s) for n, s in scores.items() if float(s) > target[n]}
    assert not over, f"exposure above target {[(n, s, target[n]) for n, s in over.items()]}:\n{out.stdout}"


def test_the_rollback_can_rename_between_the_state_and_the_update_folders() -> None:
    """mailstead-update-boot renames /var/lib/mailstead into /var/lib/mailstead-update and
    back: one writable mount for both (a StateDirectory= or a ReadWritePaths= per folder
    would make each its own mount point, and rename(2) fails across them with EXDEV)."""
    svc = service("mailstead-update-boot.service")
    assert "StateDirectory" not in svc and svc["ReadWritePaths"] == ["/var/lib"], svc
    assert svc["ProtectSystem"] == ["strict"]
