"""rspamd and redis in the real stack: the milter postfix talks to (spam
refused, our users' mail DKIM-signed twice and ARC-sealed, others' mail
not), the controller, redis' password and persistence, and idle memory.

The milter is driven the way postfix drives it (tests/integration's own
milter client, over the stack network from the host), and the controller
through `rspamc` inside the container. The stack's resolver (unbound) is
told to forward to a dead address (loopback, which it never asks), so no
lookup leaves the test, and the tests show that failing DNS costs a scan
seconds, not a hang."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import dkim
import pytest

from portal.stack.deploy import stack_secrets
from portal.stack.dkim import selector_records
from tests.conftest import retry

from .stackharness import DOMAIN, HOSTNAME, Stack, redis_learns, start_stack

ALICE = f"alice@{DOMAIN}"
OUTSIDER = "bob@example.org"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# No DNS server answers in these tests: unbound's only forwarder is loopback,
# which it refuses to ask (see the module docstring).
DEAD_RESOLVER = "127.0.0.1"
SCAN_SECONDS = 25  # a scan with every lookup timing out takes 8-12 s; postfix waits up to 300 s
IDLE_BUDGET_MIB = {"rspamd": 120, "redis": 16}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("rspamd"), "mstest-spam", 21000)
    # Failure injection: the stack's resolver forwards to a DNS server that is not
    # there (loopback), instead of the test session's knot.
    s.settings = replace(s.settings, dns_servers=(DEAD_RESOLVER,))
    try:
        s.deploy()
        yield s
    finally:
        s.down()


# -- the milter protocol, as postfix speaks it (version 6) -----------------------

# Protocol flags the MTA offers: the milter may skip commands (SMFIP_NO*) and
# replies (SMFIP_NR_*). Leading-space header values (0x100000) are not offered.
OFFERED_PROTOCOL = 0xFFFFF
SKIP = {b"C": 0x1, b"H": 0x2, b"M": 0x4, b"R": 0x8, b"B": 0x10, b"L": 0x20, b"N": 0x40, b"T": 0x200}
NO_REPLY = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
            b"N": 0x40000, b"B": 0x80000, b"L": 0x80}


@dataclass
class MilterResult:
    verdict: str  # accept, continue, reject, tempfail, discard, or "reply" (a 'y' SMTP reply)
    reply: str = ""
    inserted: list[tuple[int, str, str]] = field(default_factory=list)   # (index, name, value)
    added: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[int, str, str]] = field(default_factory=list)    # value "" deletes
    quarantined: str | None = None

    def headers(self, name: str) -> list[str]:
        return [v for _i, n, v in self.inserted if n.lower() == name.lower()] + \
               [v for n, v in self.added if n.lower() == name.lower()]

    def apply(self, raw: bytes) -> bytes:
        """The message as postfix would pass it on: inserted headers at their
        index, added ones after the last header (header edits are not needed here)."""
        head, _sep, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        for index, name, value in self.inserted:
            lines.insert(min(index, len(lines)), self._header(name, value))
        lines += [self._header(n, v) for n, v in self.added]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    @staticmethod
    def _header(name: str, value: str) -> bytes:
        return f"{name}: {value}".replace("\r\n", "\n").replace("\n", "\r\n").encode()


class MilterClient:
    def __init__(self, host: str, port: int, timeout: float = SCAN_SECONDS + 5) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.protocol = 0

    def close(self) -> None:
        self.sock.close()

    def _send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"the milter closed the connection ({len(buf)}/{n} bytes read)")
            buf += chunk
        return buf

    def _recv(self) -> tuple[bytes, bytes]:
        (length,) = struct.unpack(">I", self._recv_exact(4))
        data = self._recv_exact(length)
        return data[:1], data[1:]

    def negotiate(self) -> None:
        self._send(b"O", struct.pack(">III", 6, 0x1FF, OFFERED_PROTOCOL))
        cmd, data = self._recv()
        assert cmd == b"O", f"expected the option negotiation reply, got {cmd!r}"
        _version, _actions, self.protocol = struct.unpack(">III", data[:12])

    def macros(self, stage: bytes, values: dict[str, str]) -> None:
        self._send(b"D", stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items()))

    def command(self, cmd: bytes, data: bytes = b"") -> tuple[bytes, bytes] | None:
        """Send one stage; return the milter's reply unless it is to be skipped
        or was negotiated away. Progress notices are skipped."""
        if self.protocol & SKIP.get(cmd, 0):
            return None
        self._send(cmd, data)
        if self.protocol & NO_REPLY.get(cmd, 0):
            return None
        while True:
            reply = self._recv()
            if reply[0] != b"p":
                return reply

    def end_of_message(self) -> MilterResult:
        self._send(b"E")
        result = MilterResult("continue")
        while True:
            cmd, data = self._recv()
            if cmd == b"p":
                continue
            if cmd == b"i":
                (index,) = struct.unpack(">I", data[:4])
                name, value = data[4:].rstrip(b"\0").split(b"\0", 1)
                result.inserted.append((index, name.decode(), value.decode()))
            elif cmd == b"h":
                name, value = data.rstrip(b"\0").split(b"\0", 1)
                result.added.append((name.decode(), value.decode()))
            elif cmd == b"m":
                (index,) = struct.unpack(">I", data[:4])
                name, _, value = data[4:].rstrip(b"\0").partition(b"\0")
                result.changed.append((index, name.decode(), value.decode()))
            elif cmd == b"q":
                result.quarantined = data.rstrip(b"\0").decode()
            elif cmd in (b"+", b"-", b"2", b"e", b"b"):
                continue  # recipient, sender or body changes: not used by this stack
            else:
                verdicts = {b"a": "accept", b"c": "continue", b"r": "reject", b"t": "tempfail", b"d": "discard",
                            b"y": "reply"}
                assert cmd in verdicts, f"unexpected milter reply {cmd!r} {data[:80]!r}"
                result.verdict = verdicts[cmd]
                result.reply = data.rstrip(b"\0").decode() if cmd == b"y" else ""
                return result


def milter_scan(stack: Stack, raw: bytes, *, mail_from: str, rcpt: str, client_ip: str,
                auth: str | None = None) -> MilterResult:
    """One SMTP transaction through rspamd's milter, with the macros postfix sends
    ({auth_authen} after SMTP AUTH)."""
    client = MilterClient(container_ip(stack, "rspamd"), 11332)
    try:
        client.negotiate()
        # postfix's defaults: {daemon_name} is $myhostname; no reverse DNS gives "unknown".
        client.macros(b"C", {"j": HOSTNAME, "{daemon_name}": HOSTNAME, "{client_addr}": client_ip,
                             "{client_name}": "unknown"})
        client.command(b"C", b"unknown\0" + b"4" + struct.pack(">H", 40000) + client_ip.encode() + b"\0")
        client.command(b"H", b"client.example\0")
        mail_macros = {"i": "4AbCdE1", "{mail_addr}": mail_from}
        if auth:
            mail_macros |= {"{auth_type}": "PLAIN", "{auth_authen}": auth}
        client.macros(b"M", mail_macros)
        client.command(b"M", f"<{mail_from}>\0".encode())
        client.macros(b"R", {"{rcpt_addr}": rcpt})
        client.command(b"R", f"<{rcpt}>\0".encode())
        client.command(b"T")
        head, _sep, body = raw.partition(b"\r\n\r\n")
        for line in re.split(rb"\r\n(?![ \t])", head):
            name, _, value = line.partition(b":")
            client.command(b"L", name + b"\0" + value.lstrip(b" ") + b"\0")
        client.command(b"N")
        for i in range(0, len(body), 65535):
            client.command(b"B", body[i:i + 65535])
        client.macros(b"E", {"i": "4AbCdE1"})
        return client.end_of_message()
    finally:
        client.close()


# -- helpers ------------------------------------------------------------------------

def container_ip(stack: Stack, service: str) -> str:
    c = stack.container(service)
    c.reload()
    return c.attrs["NetworkSettings"]["Networks"][stack.settings.project]["IPAddress"]


def message(sender: str, to: str, subject: str, body: str) -> bytes:
    text = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <{abs(hash((subject, time.time())))}@{sender.split('@')[1]}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body)
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def put_file(stack: Stack, service: str, path: str, data: bytes) -> None:
    directory, name = path.rsplit("/", 1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    assert stack.container(service).put_archive(directory, buf.getvalue())


def rspamc(stack: Stack, *args: str, raw: bytes | None = None) -> str:
    """rspamc against the controller, inside the rspamd container."""
    files = []
    if raw is not None:
        put_file(stack, "rspamd", "/tmp/msg.eml", raw)
        files = ["/tmp/msg.eml"]
    return stack.exec("rspamd", "rspamc", "-h", "127.0.0.1:11334", "-t", str(SCAN_SECONDS), *args, *files)


def dnsfunc(stack: Stack):  # noqa: ANN201 - dkimpy's callback type
    records = dict(selector_records(stack.settings.dkim_dir, stack.settings.dkim_selectors, DOMAIN))

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip(".").lower(), "").encode()
    return lookup


def mem_mib(stack: Stack, service: str) -> float:
    """Memory as `docker stats` shows it (usage less inactive page cache)."""
    m = stack.container(service).stats(stream=False)["memory_stats"]
    usage, st = m["usage"], m.get("stats", {})
    inactive = st.get("total_inactive_file", st.get("inactive_file", 0))
    return (usage - inactive if inactive < usage else usage) / 2**20


class RedisClient:
    """Just enough of a redis client (RESP2) to read every key and value as bytes,
    straight to the container (redis-cli's text output is not binary-safe)."""

    def __init__(self, stack: Stack) -> None:
        self.sock = socket.create_connection((container_ip(stack, "redis"), 6379), timeout=10)
        self.file = self.sock.makefile("rb")
        assert self.call("AUTH", stack_secrets(stack.settings.secrets_dir)["redis_password"]) == b"OK"

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def call(self, *args: str | bytes) -> Any:
        parts = [a if isinstance(a, bytes) else a.encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return self._reply()

    def _reply(self) -> Any:
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise AssertionError(f"redis: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if int(rest) < 0 else self.file.read(int(rest) + 2)[:-2]
        if kind == b"*":
            return None if int(rest) < 0 else [self._reply() for _ in range(int(rest))]
        raise AssertionError(f"redis: unexpected reply {line!r}")

    def keys(self, pattern: str = "*") -> list[bytes]:
        found, cursor = [], b"0"
        while True:
            cursor, page = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            found += page
            if cursor == b"0":
                return found

    def dump(self) -> dict[bytes, list[bytes]]:
        """{key: every member, field and value it holds}."""
        read = {b"string": lambda k: [self.call("GET", k)], b"list": lambda k: self.call("LRANGE", k, "0", "-1"),
                b"hash": lambda k: self.call("HGETALL", k), b"set": lambda k: self.call("SMEMBERS", k),
                b"zset": lambda k: self.call("ZRANGE", k, "0", "-1")}
        out = {}
        for key in self.keys():
            kind = self.call("TYPE", key)
            assert kind in read, f"{key!r}: a {kind!r} (not read by this test)"
            out[key] = [v for v in read[kind](key) if v is not None]
        return out


def readable(value: bytes) -> bytes:
    """The value, decompressed if it is zstd (as rspamd stores its history rows)."""
    if value.startswith(b"\x28\xb5\x2f\xfd"):
        out = subprocess.run(["zstd", "-dcq"], input=value, capture_output=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        return out.stdout
    return value


def spam_message(n: int) -> bytes:
    return message("winner@lottery.example", ALICE, f"You have won, round {n}",
                   f"Dear friend {n}, you have won one million dollars in our international lottery. "
                   "Send your bank account details and a processing fee today to claim the prize "
                   "before this exclusive offer expires. Act now, limited time, guaranteed winnings.\n")


# -- tests ---------------------------------------------------------------------------

def test_idle_memory(stack: Stack) -> None:
    time.sleep(5)  # let the start-up settle (maps, hyperscan cache)
    used = {service: mem_mib(stack, service) for service in IDLE_BUDGET_MIB}
    print(f"idle memory (MiB): {used}")
    for service, budget in IDLE_BUDGET_MIB.items():
        assert used[service] <= budget, f"{service} uses {used[service]:.0f} MiB idle (budget {budget} MiB)"


def test_rspamd_starts_on_the_public_suffix_list_the_image_ships(stack: Stack) -> None:
    """The multipatterns rspamd builds as it loads its configuration (the
    public suffix list: 40 MB, minutes to compile under emulation) come
    compiled with the image, and rspamd loads them as they are and compiles
    none itself. It unpacks a cache it loads next to it (`<name>.unser`); one
    it had to compile would be another file, as on this CPU without the
    platform shim."""
    def listing(folder: str, files: str = "*.hsmp*", cat: str = "cat") -> dict[str, str]:
        out = stack.exec("rspamd", "sh", "-c", f'cd {folder} && for f in {files}; do '
                         f'echo "${{f%.gz}} $({cat} <$f | sha256sum | cut -c1-64)"; done', user="_rspamd")
        return dict(line.split(" ") for line in out.splitlines())

    shipped = listing("/usr/lib/mailstead/rspamd-hs-cache", "*.hsmp.gz", "gzip -dc")  # compressed in the image
    assert len(shipped) >= 2 and all(name.endswith(".hsmp") for name in shipped), shipped
    in_volume = listing("/var/lib/rspamd")
    assert {name for name in in_volume if name.endswith(".hsmp")} == set(shipped), in_volume
    for name, digest in shipped.items():
        assert in_volume.get(name) == digest, f"{name} is not in the volume as shipped: {in_volume}"
        assert f"{name}.unser" in in_volume, f"rspamd did not load the shipped {name}: {in_volume}"
    # Every rspamd process has the shim loaded (rspamd's process titles
    # overwrite /proc/<pid>/environ, so its maps are what shows it).
    maps = stack.exec("rspamd", "sh", "-c",
                      'for p in /proc/[0-9]*; do case "$(tr "\\0" " " <$p/cmdline)" in '
                      '"rspamd: "*) echo "$(grep -c hs-generic-platform.so $p/maps) $p";; esac; done',
                      user="_rspamd")
    assert len(maps.splitlines()) == 4 and all(not line.startswith("0 ") for line in maps.splitlines()), maps


def test_rspamd_runs_unprivileged_with_one_worker_each(stack: Stack) -> None:
    ps = stack.exec("rspamd", "sh", "-c",
                    'for p in /proc/[0-9]*; do echo "$(awk \'/^Uid:/{print $2}\' $p/status) '
                    '$(tr "\\0" " " <$p/cmdline)"; done')
    procs = [line.split(" ", 1) for line in ps.splitlines() if "rspamd" in line and "/proc" not in line
             and "entrypoint" not in line]
    titles = sorted(cmd.split("(")[0].strip() for _uid, cmd in procs)
    assert titles == ["rspamd: controller process", "rspamd: hs_helper process", "rspamd: main process",
                      "rspamd: rspamd_proxy process"], ps
    uid = stack.exec("rspamd", "id", "-u", "_rspamd").strip()
    assert {u for u, _cmd in procs} == {uid}, f"rspamd processes not all running as _rspamd ({uid}):\n{ps}"


def test_gtube_is_rejected_by_the_milter(stack: Stack) -> None:
    raw = message(OUTSIDER, ALICE, "gtube", f"Test spam.\n\n{GTUBE}\n")
    start = time.monotonic()
    result = milter_scan(stack, raw, mail_from=OUTSIDER, rcpt=ALICE, client_ip="203.0.113.25")
    assert time.monotonic() - start < SCAN_SECONDS
    assert result.verdict == "reply" and re.match(r"5\d\d 5\.7\.1 ", result.reply), result  # 554 5.7.1 Gtube pattern
    assert not result.headers("DKIM-Signature")


def test_gtube_scores_reject_on_the_controller(stack: Stack) -> None:
    out = json.loads(rspamc(stack, "--json", "--ip", "203.0.113.25", "--from", OUTSIDER, "--rcpt", ALICE,
                            raw=message(OUTSIDER, ALICE, "gtube", f"{GTUBE}\n")))
    assert out["action"] == "reject", out
    assert "GTUBE" in out["symbols"]


def test_ordinary_inbound_mail_is_accepted_unsigned_despite_dead_dns(stack: Stack) -> None:
    raw = message(OUTSIDER, ALICE, "hello", "Hi Alice,\n\nlunch on Friday?\n\nBob\n")
    start = time.monotonic()
    result = milter_scan(stack, raw, mail_from=OUTSIDER, rcpt=ALICE, client_ip="203.0.113.25")
    took = time.monotonic() - start
    assert took < SCAN_SECONDS, f"a scan took {took:.1f} s with DNS failing"
    assert result.verdict in ("accept", "continue"), result
    assert not result.headers("DKIM-Signature")
    ar = result.headers("Authentication-Results")
    assert ar and ar[0].startswith(HOSTNAME), result  # authserv-id: the stack's host name


def test_a_spam_flag_the_sender_set_is_removed(stack: Stack) -> None:
    """dovecot files mail with X-Spam: Yes into Junk (recipes/dovecot/templates/sieve):
    only rspamd's own verdict may set it, so the milter deletes the sender's."""
    raw = message(OUTSIDER, ALICE, "not spam, says the sender", "Hi Alice,\n\nsee you.\n")
    raw = b"X-Spam: Yes\r\n" + raw
    result = milter_scan(stack, raw, mail_from=OUTSIDER, rcpt=ALICE, client_ip="203.0.113.25")
    assert result.verdict in ("accept", "continue"), result
    deleted = [(i, n) for i, n, v in result.changed if n.lower() == "x-spam" and v == ""]
    assert deleted, f"the sender's X-Spam header is kept: {result}"
    assert not [v for v in result.headers("X-Spam") if v.strip().lower() == "yes"], result


def test_authenticated_mail_is_dual_signed_and_arc_sealed(stack: Stack) -> None:
    raw = message(f"Alice <{ALICE}>", f"Bob <{OUTSIDER}>", "signed", "Hi Bob,\n\nsigned twice.\n\nAlice\n")
    result = milter_scan(stack, raw, mail_from=ALICE, rcpt=OUTSIDER, client_ip="198.51.100.7", auth=ALICE)
    assert result.verdict in ("accept", "continue"), result
    signatures = result.headers("DKIM-Signature")
    algorithms = sorted(re.search(r"\ba=([\w-]+)", s)[1] for s in signatures)
    assert algorithms == ["ed25519-sha256", "rsa-sha256"], signatures
    selectors = {re.search(r"\bs=([\w-]+)", s)[1] for s in signatures}
    assert selectors == set(stack.settings.dkim_selectors)
    assert all(re.search(rf"\bd={re.escape(DOMAIN)};", s) for s in signatures)
    for name in ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"):
        assert len(result.headers(name)) == 1 and result.headers(name)[0].startswith("i=1;"), (name, result)
    assert not result.headers("X-Spam-Status"), "outgoing mail carries the scanner's verdict"

    signed = result.apply(raw)
    for idx in range(2):
        verifier = dkim.DKIM(signed)
        assert verifier.verify(idx=idx, dnsfunc=dnsfunc(stack)), f"DKIM signature {idx} does not verify:\n{signed!r}"
    cv, results, why = dkim.arc_verify(signed, dnsfunc=dnsfunc(stack))
    assert cv == dkim.CV_Pass, (cv, results, why)


def test_authenticated_mail_is_signed_via_the_controller_too(stack: Stack) -> None:
    out = json.loads(rspamc(stack, "--json", "--ip", "198.51.100.7", "--user", ALICE, "--from", ALICE,
                            "--rcpt", OUTSIDER, raw=message(ALICE, OUTSIDER, "signed", "Hello.\n")))
    signatures = out["dkim-signature"] if isinstance(out["dkim-signature"], list) else [out["dkim-signature"]]
    assert len(signatures) == 2, out
    assert {"ARC-Seal", "ARC-Message-Signature"} <= set(out["milter"]["add_headers"])


@pytest.mark.parametrize("case", ["unauthenticated", "other user's domain"])
def test_no_signature_for_mail_not_from_our_users(stack: Stack, case: str) -> None:
    """Our key never signs a forged From: of our domain, nor an authenticated
    user's mail for another domain."""
    if case == "unauthenticated":
        raw, auth, sender = message(ALICE, OUTSIDER, "forged", "Pay this invoice.\n"), None, ALICE
    else:
        raw, auth, sender = message("carol@other.test", OUTSIDER, "other", "Hello.\n"), ALICE, "carol@other.test"
    result = milter_scan(stack, raw, mail_from=sender, rcpt=OUTSIDER, client_ip="203.0.113.25", auth=auth)
    assert result.verdict in ("accept", "continue", "reply"), result
    assert not result.headers("DKIM-Signature"), result


def test_controller_and_milter_exposure(stack: Stack) -> None:
    rspamd, redis = stack.container("rspamd"), stack.container("redis")
    for c in (rspamd, redis):
        c.reload()
        assert not any(c.attrs["NetworkSettings"]["Ports"].values()), c.attrs["NetworkSettings"]["Ports"]
        assert not c.attrs["HostConfig"]["PortBindings"]
    # The milter and the controller are on the stack network (the controller for dovecot's
    # Junk training); the controller does nothing for any other client (here the host,
    # through the stack network's gateway): no statistics, no learning.
    socket.create_connection((container_ip(stack, "rspamd"), 11332), timeout=3).close()
    before = redis_learns(stack)
    base = f"http://{container_ip(stack, 'rspamd')}:11334"
    for request in (urllib.request.Request(f"{base}/stat"),
                    urllib.request.Request(f"{base}/learnspam", data=spam_message(99), method="POST")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (401, 403), (request.full_url, refused.value.code)  # refused
    assert redis_learns(stack) == before


def test_redis_refuses_unauthenticated_clients(stack: Stack) -> None:
    with socket.create_connection((container_ip(stack, "redis"), 6379), timeout=5) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(200).startswith(b"-NOAUTH"), "redis answered without a password"
    with socket.create_connection((container_ip(stack, "redis"), 6379), timeout=5) as s:
        s.sendall(b"AUTH wrong-password\r\n")
        assert s.recv(200).startswith(b"-WRONGPASS")


def test_learned_spam_survives_a_redis_restart(stack: Stack) -> None:
    before = redis_learns(stack)
    out = rspamc(stack, "learn_spam", raw=spam_message(1))
    assert "success = true" in out, out
    assert redis_learns(stack) == before + 1

    stack.container("redis").restart(timeout=20)  # SIGTERM: redis saves, then starts from its volume

    def healthy() -> None:
        c = stack.container("redis")
        c.reload()
        assert c.attrs["State"]["Health"]["Status"] == "healthy", c.attrs["State"]["Health"]["Status"]
    retry(healthy, 60, "redis healthy after its restart")
    assert redis_learns(stack) == before + 1
    # rspamd reconnects by itself and keeps learning.
    def learn_again() -> None:
        out = rspamc(stack, "learn_spam", raw=spam_message(2))
        assert "success = true" in out, out
    retry(learn_again, 30, "rspamd to learn again after redis restarted")
    assert redis_learns(stack) == before + 2


# -- what redis keeps (it is backed up) ---------------------------------------------

def test_redis_keeps_no_subject_or_address_of_scanned_mail(stack: Stack) -> None:
    """rspamd's scan history (history_redis) kept every message's subject, senders
    and recipients in redis, zstd-compressed; it is off, and nothing else keeps them."""
    marker = uuid.uuid4().hex
    subject, sender, rcpt = f"Quarterly numbers {marker}", f"history-{marker}@example.org", f"rcpt-{marker}@{DOMAIN}"
    raw = message(sender, rcpt, subject, "Hi,\n\nthe figures are attached.\n")
    outgoing = message(ALICE, f"friend-{marker}@example.org", f"Re: {subject}", "Thanks!\n")
    result = milter_scan(stack, raw, mail_from=sender, rcpt=rcpt, client_ip="203.0.113.25")
    assert result.verdict in ("accept", "continue"), result
    assert result.headers("Authentication-Results"), result  # scanned, not skipped
    result = milter_scan(stack, outgoing, mail_from=ALICE, rcpt=f"friend-{marker}@example.org",
                         client_ip="198.51.100.7", auth=ALICE)
    assert result.headers("DKIM-Signature"), result
    time.sleep(2)  # rspamd writes what it keeps after the reply

    redis = RedisClient(stack)
    try:
        kept = redis.dump()
    finally:
        redis.close()
    assert kept, "redis is empty: the scans stored nothing at all (is rspamd using it?)"
    assert not [k for k in kept if k.startswith(b"rs_history")], sorted(kept)[:20]
    for key, values in kept.items():
        for value in [key, *values]:
            assert marker.encode() not in readable(value), f"{key!r} holds {readable(value)[:300]!r}"


def test_history_of_earlier_versions_is_deleted_when_rspamd_starts(stack: Stack) -> None:
    redis = RedisClient(stack)
    try:
        old = [f"rs_history{HOSTNAME}_zst".encode(), b"rs_historyold-name.example.test"]
        for key in old:
            assert redis.call("RPUSH", key, b"subject: Payslip March") >= 1
        assert redis.call("SET", b"unrelated-key", b"kept") == b"OK"
    finally:
        redis.close()

    stack.container("rspamd").restart(timeout=20)

    def purged() -> None:
        r = RedisClient(stack)
        try:
            assert r.keys("rs_history*") == [], r.keys("rs_history*")
            assert r.call("GET", b"unrelated-key") == b"kept"
        finally:
            r.close()
    retry(purged, 120, "rspamd to delete the old scan history")
    r = RedisClient(stack)
    try:
        r.call("DEL", b"unrelated-key")
    finally:
        r.close()
