#!/usr/bin/env python3
"""Mail stack figures, printed as JSON (progress on stderr).

    PYTHONPATH=. bench/stack.py [--messages 400] [--senders 1,8] [--idle-seconds 30] [--no-bare]

Run as root on a host with docker and the loaded mailstead-* images
(`docker images | grep mailstead`); nothing is built. One run measures:

- images_mb: the size of every mailstead-<service> image and of the base
  (10^6 bytes, as `docker images` shows; the services share the base layer);
- seconds_to_healthy / deploy_seconds: a first deploy (fresh state folder,
  fresh volumes) with portal.stack.deploy: `compose up` to every service
  healthy, and the whole deploy call; healthy_after_seconds per service;
- idle_rss_mb: after a short warm-up and --idle-seconds of nothing, the RSS
  of every container (cgroup v1 total_rss, v2 anon; MiB) and their total;
  idle_usage_mb the cgroups' whole usage (page cache included);
- throughput_msgs_per_s: N messages injected on port 25 (the MX path:
  postscreen, the rspamd milter, LMTP to dovecot, mail_crypt) over STARTTLS
  by 1 and by 8 concurrent senders (one persistent connection each) into
  one mailbox; the clock runs from the moment every sender is connected
  until IMAPS `STATUS INBOX (MESSAGES)` (polled every 50 ms) shows them all;
- the same throughput with the same images' files, the same rendered
  configs, volumes and entry points run bare on the host: each service
  chrooted into an export of its image, all in one network namespace, with
  no container runtime; ratio = containerised / bare (bare_quickack: the bare
  runs again without delayed ACKs on the namespace's loopback, see
  bare.notes; --no-quickack skips them);
- a run whose mail does not all arrive (e.g. postfix deferred some) ends
  10 s after the last arrival; its rate is that of what arrived, flagged
  all_delivered: false, and the next run first flushes postfix's queue;
- where the time goes: CPU seconds per message of every service (cgroup
  cpuacct), of docker-proxy and of the client; rspamd's per-message scan time
  (its task log); postfix's delays=a/b/c/d per delivered message.

The client sending the mail (`--client`, run as a child process in both
cases) also takes the machine's CPUs: the figures are for a client and a
server sharing one host. Other sessions' containers running at the same time
are listed under machine.

The bare run differs from compose only where it must: no docker network
(services find each other through /etc/hosts in one network namespace, a
knot with the test zone answers DNS there, as the harness's does through
the stack's unbound), no unbound, no cap_drop/no-new-privileges, host /dev, and the client
connects from a non-loopback address of that namespace (10.254.0.2 to
10.254.0.1), because a loopback client would be in postfix's mynetworks
and rspamd's local_addrs and skip postscreen and the SPF/DMARC checks that
the containers' clients (behind docker-proxy) go through.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJECT = "msbench"
PORT_BASE = 27000
DOMAIN = "example.test"          # the harness's test domain (tests/integration/stackharness.py)
HOSTNAME = f"mail.{DOMAIN}"
USER = f"bench@{DOMAIN}"
PASSWORD_ENV = "MAILSTEAD_BENCH_PASSWORD"
SENDER_DOMAIN = "sender.example.net"   # outside the test zone: knot answers REFUSED at once
MAIL_SERVICES = ("redis", "rspamd", "dovecot", "postfix")  # the bare stack starts them in this order
BARE_SERVER, BARE_CLIENT = "10.254.0.1", "10.254.0.2"
TARGETS = {"throughput_msgs_per_s": 100, "ratio": 0.9, "seconds_to_healthy": 30,
           "idle_rss_mb": 350, "image_mb": 150}

BARE_NOTES = (
    "bare = the same image files (docker export of a container of each image ID), the same rendered "
    "config folders, TLS files, accounts.db, DKIM keys and volume contents (mail, rspamd, redis; copied "
    "after the container stack was stopped), each started by its own entrypoint.sh under tini -s in a "
    "chroot, all in one network namespace; radicale is left out (not on the mail path)",
    "no docker: no bridge network and no docker-proxy (services reach each other on the namespace's "
    "loopback through /etc/hosts), no cap_drop / no-new-privileges, host /dev, fresh proc and sysfs, "
    "tmpfs /tmp and /var/cache/dovecot-index for dovecot as in compose",
    "DNS: bare rspamd asks a knot with the harness's test zone on the namespace's 127.0.0.1:53 "
    "(resolv.conf); in compose rspamd asks the stack's unbound (cached), which forwards to the "
    "harness's knot, and unbound's CPU counts in the containers' figures",
    f"the bare client sends from {BARE_CLIENT} to {BARE_SERVER} (both on the namespace's lo), not from "
    "127.0.0.1: a loopback client is in postfix's mynetworks and rspamd's local_addrs, so it would skip "
    "postscreen and SPF/DMARC; the containers see their clients as the docker gateway (docker-proxy)",
    "bare_quickack: the bare runs repeated with `quickack 1` on the namespace's 127.0.0.1 route (no "
    "delayed ACKs between the services). On loopback, postfix's cleanup -> rspamd milter connection "
    "stalls ~40 ms per message (Nagle + delayed ACK: cleanup's next packet waits for the ACK of its "
    "last one, which rspamd does not answer); over the containers' bridge it does not. A diagnostic, "
    "not a service setting",
)

T0 = time.monotonic()


def say(*parts: object) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s]", *parts, file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:300]} exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-800:]}")
    return r


def rounded(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def summary(values: list[float], scale: float = 1.0, nd: int = 1) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(x * scale for x in values)
    return {"n": len(v), "mean": round(statistics.fmean(v), nd), "p50": round(v[len(v) // 2], nd),
            "p95": round(v[min(len(v) - 1, int(len(v) * 0.95))], nd), "max": round(v[-1], nd)}


# =============================================================================
# The client: N messages over port 25, IMAP STATUS until they are all there.
# Run as a child process (in the bare case, inside the network namespace).
# =============================================================================

WORDS = ("the meeting notes attached below cover budget planning for next quarter and "
         "include several action items regarding supplier contracts travel schedules "
         "hiring plans office move timeline customer feedback survey results product "
         "roadmap review security training reminder invoice payment terms holiday "
         "calendar project status weekly summary garden club newsletter recipe photos").split()


def make_messages(tag: str, sender: int, count: int) -> list[tuple[str, bytes]]:
    """`count` distinct, plausible ~2.5 KB plain-text messages (built before the clock starts)."""
    rng = random.Random(f"{tag}-{sender}")
    out = []
    for i in range(count):
        frm = f"bench{sender}@{SENDER_DOMAIN}"
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(28)]
        body = "\r\n".join(lines)
        msg = (f"From: Bench Sender {sender} <{frm}>\r\n"
               f"To: <{USER}>\r\n"
               f"Subject: {tag} {sender}-{i} {' '.join(rng.choice(WORDS) for _ in range(4))}\r\n"
               f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
               f"Message-ID: <{tag}.{sender}.{i}.{rng.getrandbits(48):x}@{SENDER_DOMAIN}>\r\n"
               "MIME-Version: 1.0\r\n"
               "Content-Type: text/plain; charset=utf-8\r\n"
               "Content-Transfer-Encoding: 7bit\r\n"
               f"\r\nHello,\r\n\r\n{body}\r\n\r\nRegards,\r\nBench {sender}\r\n")
        out.append((frm, msg.encode()))
    return out


STATUS_RE = re.compile(rb"MESSAGES (\d+)")


def imap_messages(imap: imaplib.IMAP4) -> int:
    typ, data = imap.status("INBOX", "(MESSAGES)")
    m = STATUS_RE.search(data[0] if data and data[0] else b"")
    if typ != "OK" or not m:
        raise RuntimeError(f"unexpected STATUS answer {typ} {data!r}")
    return int(m.group(1))


def client_main(args: argparse.Namespace) -> int:
    password = os.environ[PASSWORD_ENV]
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.check_hostname = False  # the certificate names the mail host; we connect to an address
    source = (args.source, 0) if args.source else None
    k, n = args.senders, args.messages

    t = time.perf_counter()
    imap = imaplib.IMAP4_SSL(args.host, args.imap_port, ssl_context=ctx, timeout=60)
    imap.login(args.user, password)  # dovecot verifies the Argon2id hash (64 MiB, t=3): once per run
    login_s = time.perf_counter() - t
    # Start from an empty INBOX, so every run stores into the same state.
    imap.select("INBOX")
    _typ, data = imap.search(None, "ALL")
    cleared = len(data[0].split()) if data and data[0] else 0
    if cleared:
        imap.store("1:*", "+FLAGS.SILENT", r"(\Deleted)")
        imap.expunge()
    imap.close()
    base = imap_messages(imap)

    shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
    batches = [make_messages(args.tag, i, c) for i, c in enumerate(shares)]
    ready = threading.Barrier(k + 1)
    lock = threading.Lock()
    state = {"accepted": 0}
    recs: list[dict[str, Any]] = [{"latencies": [], "rejected": [], "reconnects": 0, "error": None,
                                   "connect_s": None, "last_accept": None} for _ in range(k)]

    def connect() -> smtplib.SMTP:
        s = smtplib.SMTP(args.host, args.smtp_port, local_hostname=f"mx.{SENDER_DOMAIN}",
                         timeout=300, source_address=source)
        s.ehlo()
        if not args.no_starttls:
            s.starttls(context=ctx)
            s.ehlo()
        return s

    def sender(idx: int) -> None:
        rec = recs[idx]
        try:
            t = time.perf_counter()
            s = connect()  # postscreen's greet test: the first connection from an address waits
            rec["connect_s"] = time.perf_counter() - t
        except Exception as err:  # noqa: BLE001 - reported in the JSON
            rec["error"] = f"connect: {err!r}"
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            s.close()
            return
        for frm, data in batches[idx]:
            t = time.perf_counter()
            for attempt in (1, 2):
                try:
                    s.sendmail(frm, [args.user], data)
                    rec["latencies"].append(time.perf_counter() - t)
                    rec["last_accept"] = time.perf_counter()
                    with lock:
                        state["accepted"] += 1
                    break
                except smtplib.SMTPServerDisconnected as err:
                    rec["reconnects"] += 1
                    if attempt == 2:
                        rec["rejected"].append(f"disconnected: {err}")
                    else:
                        s = connect()
                except smtplib.SMTPException as err:
                    rec["rejected"].append(" ".join(str(err).split())[:200])
                    break
        try:
            s.quit()
        except Exception:  # noqa: BLE001
            pass

    threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    result: dict[str, Any] = {"senders": k, "messages": n, "cleared_before": cleared,
                              "starttls": not args.no_starttls, "imap_login_seconds": round(login_s, 3)}
    try:
        ready.wait(timeout=120)
    except threading.BrokenBarrierError:
        result["error"] = "; ".join(r["error"] for r in recs if r["error"]) or "senders did not connect"
        print(json.dumps(result))
        return 1
    start = time.perf_counter()
    deadline = start + args.timeout
    timeline: list[list[float]] = []
    next_sample = start
    delivered = 0
    timed_out = stalled = False
    polls = 0
    last_progress = start  # when `delivered` last grew
    while True:
        now_delivered = imap_messages(imap) - base
        polls += 1
        now = time.perf_counter()
        if now_delivered != delivered:
            delivered, last_progress = now_delivered, now
        with lock:
            accepted = state["accepted"]
        if now >= next_sample:
            timeline.append([round(now - start, 2), accepted, delivered])
            next_sample += 1.0
        senders_done = not any(t.is_alive() for t in threads)
        if senders_done and delivered >= accepted:
            break
        if senders_done and now - max(last_progress, max(r["last_accept"] or start for r in recs)) > args.stall:
            stalled = True  # e.g. deferred by postfix: retried only after minimal_backoff_time
            break
        if now > deadline:
            timed_out = True
            break
        time.sleep(args.poll)
    timeline.append([round(now - start, 2), accepted, delivered])
    # With everything delivered, the clock stops at the poll that saw the last one; if some
    # never arrived, at the last arrival (so the rate is the rate of what did arrive).
    seconds = (now if delivered >= accepted else last_progress) - start
    imap.logout()
    lats = [x for r in recs for x in r["latencies"]]
    last = [r["last_accept"] for r in recs if r["last_accept"]]
    rejected = [x for r in recs for x in r["rejected"]]
    accept_s = (max(last) - start) if last else None
    result.update({
        "accepted": accepted, "delivered": delivered, "rejected": len(rejected), "rejections": rejected[:5],
        "all_delivered": delivered >= n, "undelivered": max(0, accepted - delivered),
        "stalled": stalled, "timed_out": timed_out, "seconds": round(seconds, 3),
        # CPU figures of a stalled run include this much waiting (at idle) for mail that never came
        "waited_after_last_delivery_s": round(now - last_progress, 1) if delivered < accepted else 0.0,
        "msgs_per_s": round(delivered / seconds, 2) if seconds > 0 else None,
        "accept_seconds": rounded(accept_s, 3),
        "accept_msgs_per_s": round(accepted / accept_s, 2) if accept_s else None,
        "smtp_ms_per_message": summary(lats, 1000),
        "connect_seconds_max": rounded(max((r["connect_s"] or 0) for r in recs), 2),
        "reconnects": sum(r["reconnects"] for r in recs),
        "imap_polls": polls,
        "timeline_s_accepted_delivered": timeline,
    })
    print(json.dumps(result))
    return 0 if delivered >= n else 1


def run_client(prefix: list[str], *, host: str, smtp_port: int, imap_port: int, cafile: Path, source: str | None,
               senders: int, messages: int, tag: str, timeout: float, password: str) -> dict[str, Any]:
    """The client as a child process (after `prefix`, e.g. ip netns exec); its JSON + CPU time."""
    cmd = [*prefix, sys.executable, str(Path(__file__).resolve()), "--client",
           "--host", host, "--smtp-port", str(smtp_port), "--imap-port", str(imap_port),
           "--cafile", str(cafile), "--user", USER, "--senders", str(senders),
           "--messages", str(messages), "--tag", tag, "--timeout", str(timeout)]
    if source:
        cmd += ["--source", source]
    env = os.environ | {PASSWORD_ENV: password, "PYTHONPATH": str(ROOT)}
    before = os.times()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout + 300, check=False)
    after = os.times()
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"client failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}") from None
    out["client_cpu_seconds"] = round((after.children_user - before.children_user)
                                      + (after.children_system - before.children_system), 2)
    if r.returncode != 0:
        out["client_exit"] = r.returncode
        out["client_stderr"] = r.stderr.strip()[-800:]
    return out


# =============================================================================
# Measuring: cgroups, /proc, logs
# =============================================================================

CGROUP_V2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pid_cgroup(pid: int, controller: str) -> Path | None:
    """The cgroup folder of `pid` for `controller` (v1) or its unified cgroup (v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hid, ctrls, path = line.split(":", 2)
        if CGROUP_V2 and ctrls == "":
            return Path("/sys/fs/cgroup") / path.lstrip("/")
        if not CGROUP_V2 and controller in ctrls.split(","):
            return Path("/sys/fs/cgroup") / ctrls / path.lstrip("/")
    return None


def cgroup_cpu_seconds(cpu_dir: Path) -> float:
    if CGROUP_V2:
        for line in (cpu_dir / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
        return 0.0
    return int((cpu_dir / "cpuacct.usage").read_text()) / 1e9


def cgroup_memory(mem_dir: Path) -> dict[str, float]:
    """rss (v1 total_rss, v2 anon) and usage, in MiB."""
    stat = dict(line.split() for line in (mem_dir / "memory.stat").read_text().splitlines())
    if CGROUP_V2:
        return {"rss": int(stat["anon"]) / 2**20, "usage": int((mem_dir / "memory.current").read_text()) / 2**20}
    return {"rss": int(stat["total_rss"]) / 2**20,
            "usage": int((mem_dir / "memory.usage_in_bytes").read_text()) / 2**20}


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def pids_matching(*needles: str) -> list[int]:
    """Processes whose command line holds every needle (read-only: for CPU figures)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles):
            found.append(int(p.name))
    return found


def process_key(pid: int) -> str:
    """A process's name for the CPU breakdown: postfix's daemon, dovecot/<service>, rspamd's worker."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
    if not words:
        return "?"
    first = words[0].rsplit("/", 1)[-1] if not words[0].startswith("dovecot/") else words[0]
    if first.endswith(":") and len(words) > 1:  # rspamd: <worker> process
        return f"{first} {words[1]}"
    return first


def cgroup_processes(cpu_dir: Path) -> dict[int, tuple[str, float]]:
    out = {}
    for pid in (int(x) for x in (cpu_dir / "cgroup.procs").read_text().split()):
        try:
            out[pid] = (process_key(pid), proc_cpu_seconds(pid))
        except OSError:
            pass
    return out


def process_breakdown(a: dict[int, tuple[str, float]], b: dict[int, tuple[str, float]],
                      total: float) -> dict[str, float]:
    """CPU seconds by process name between two cgroup_processes() snapshots; what processes
    that exited meanwhile used is only in the cgroup's total: `exited/unattributed`."""
    by: dict[str, float] = {}
    for pid, (key, cpu) in b.items():
        d = cpu - (a[pid][1] if pid in a and a[pid][0] == key else 0.0)
        by[key] = by.get(key, 0.0) + d
    out = {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if round(v, 2) > 0}
    out["exited/unattributed"] = round(total - sum(by.values()), 2)
    return out


def pids_named(name: str) -> list[int]:
    """Processes whose program (argv[0]'s base name) is `name`."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv0 = (p / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            except OSError:
                continue
            if argv0.rsplit("/", 1)[-1] == name:
                found.append(int(p.name))
    return found


class CpuMeter:
    """CPU seconds of named cgroups and processes between two snapshots."""

    def __init__(self, cgroups: dict[str, Path], pids: dict[str, list[int]]) -> None:
        self.cgroups, self.pids = cgroups, pids

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"_procs": {}}
        for name, d in self.cgroups.items():
            try:
                snap[name] = cgroup_cpu_seconds(d)
                snap["_procs"][name] = cgroup_processes(d)
            except OSError:
                pass
        for name, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                try:
                    total += proc_cpu_seconds(pid)
                except OSError:
                    pass
            snap[name] = total
        busy, total = machine_busy()
        snap["_busy"], snap["_total"] = busy, total
        return snap

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = {k: round(b[k] - a[k], 2) for k in a if not k.startswith("_") and k in b}
        total = b["_total"] - a["_total"]
        out["machine_busy_percent"] = round(100 * (b["_busy"] - a["_busy"]) / total, 1) if total else None
        return out

    @staticmethod
    def by_process(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {name: process_breakdown(a["_procs"][name], b["_procs"][name], b[name] - a[name])
                for name in b["_procs"] if name in a["_procs"]}


DELAYS_RE = re.compile(r"delays=([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+),.*status=sent")
RSPAMD_TIME_RE = re.compile(r"time: ([\d.]+)ms(?:, dns req: (\d+))?")
DEFERRED_RE = re.compile(r"status=deferred \((.*)\)")
SYMBOL_RE = re.compile(r"([A-Z][A-Z0-9_]+)\(([-\d.]+)\)")
RSPAMD_ACTION_RE = re.compile(r"\(default: [FT] \(([a-z ]+)\): \[([-\d.]+)/")


def log_findings(postfix_log: str, rspamd_log: str) -> dict[str, Any]:
    """postfix's delays=a/b/c/d of delivered messages and rspamd's scan times, from their logs."""
    delays = [tuple(float(x) for x in m.groups()) for m in DELAYS_RE.finditer(postfix_log)]
    scans, dns, actions, scores = [], [], {}, []
    sample = None
    for line in rspamd_log.splitlines():
        m = RSPAMD_TIME_RE.search(line)
        if not m or "rspamd_task_write_log" not in line:
            continue
        scans.append(float(m.group(1)) / 1000)
        if m.group(2):
            dns.append(float(m.group(2)))
        a = RSPAMD_ACTION_RE.search(line)
        if a:
            actions[a.group(1)] = actions.get(a.group(1), 0) + 1
            scores.append(float(a.group(2)))
        if sample is None:
            sample = sorted({f"{name}({score})" for name, score in SYMBOL_RE.findall(line) if float(score) != 0})
    deferred: dict[str, int] = {}
    for m in DEFERRED_RE.finditer(postfix_log):
        reason = re.sub(r"\b[0-9A-F]{8,}\b|\[[\d.]+\]", "", m.group(1))[:160]
        deferred[reason] = deferred.get(reason, 0) + 1
    return {
        "postfix_deferred": sum(deferred.values()),
        "postfix_deferred_reasons": deferred,
        "postfix_delivered": len(delays),
        "postfix_lmtp_deliveries_on_reused_connection": len(re.findall(r"conn_use=\d+.*status=sent", postfix_log)),
        "postfix_delays_ms": {name: summary([d[i] for d in delays], 1000) for i, name in enumerate(
            ("a_before_qmgr_incl_receive_and_milter", "b_in_qmgr", "c_lmtp_connect", "d_lmtp_transmit"))}
        if delays else None,
        "rspamd_scans": len(scans),
        "rspamd_scan_ms": summary(scans, 1000),
        "rspamd_dns_requests_per_scan": round(statistics.fmean(dns), 1) if dns else None,
        "rspamd_actions": actions,
        "rspamd_score_mean": round(statistics.fmean(scores), 2) if scores else None,
        "rspamd_scored_symbols_first_message": sample,
    }


def dovecot_forks(output: str) -> dict[str, int]:
    """{service: process_total} from `doveadm -f tab service status` (forks since dovecot started)."""
    lines = [line.split("\t") for line in output.strip().splitlines()]
    if not lines or "process_total" not in lines[0]:
        return {}
    i, n = lines[0].index("process_total"), lines[0].index("name")
    return {row[n]: int(row[i]) for row in lines[1:] if len(row) > i and row[i].isdigit()}


def forks_delta(a: dict[str, int], b: dict[str, int], delivered: int | None) -> dict[str, Any]:
    d = {k: b[k] - a.get(k, 0) for k in b if b[k] - a.get(k, 0) > 0}
    if delivered and "lmtp" in d:
        d["lmtp_per_message"] = round(d["lmtp"] / delivered, 2)
    return d


def drain_queue(exec_postfix: Any, timeout: float = 60) -> dict[str, Any]:
    """Before a run: deliver what an earlier run left in postfix's queue (deferred
    mail), so that every run starts with an empty queue. `exec_postfix(cmd)` runs a
    command where postfix runs and returns (exit code, output)."""
    def queued() -> int:
        code, out = exec_postfix(["postqueue", "-j"])
        return len(out.strip().splitlines()) if code == 0 else -1
    before = queued()
    if before > 0:
        exec_postfix(["postqueue", "-f"])
        deadline = time.monotonic() + timeout
        while queued() > 0 and time.monotonic() < deadline:
            time.sleep(1)
    return {"queued_before": before, "queued_after_flush": queued() if before > 0 else before}


def machine_facts(client: Any) -> dict[str, Any]:
    others = [c.name for c in client.containers.list() if not c.name.startswith(f"{PROJECT}-")]
    return {"loadavg": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
            "other_running_containers": len(others),
            "other_projects": sorted({n.rsplit("-", 1)[0] for n in others})}


# =============================================================================
# The containerised stack
# =============================================================================

def image_sizes(client: Any, version: str) -> dict[str, float]:
    from portal.stack.settings import SERVICES

    sizes = {}
    for name in ("base", *SERVICES):
        sizes[name] = round(client.images.get(f"mailstead-{name}:{version}").attrs["Size"] / 1e6, 1)
    return sizes


def use_shared_dns(sh: Any, notes: list[str]) -> bool:
    """The harness's DNS server for the stacks (knot on the docker gateway, port 53).
    Only one can hold that port: if another test session's knot already answers
    for the test zone, use it rather than fail. True if this process started one."""
    from tests.integration.knot import Knot

    gateway = sh.docker_gateway()
    probe = Knot(Path("/nonexistent"), DOMAIN, [], address=gateway, port=53)
    try:
        probe.query(DOMAIN, "SOA")
        existing = pids_matching("knotd")
        sh._dns = probe  # noqa: SLF001 - the harness keeps one server per process; this one is not ours
        notes.append(f"DNS for the containers: another test session's knot on {gateway}:53 (pids {existing}) "
                     "already served the test zone (same records; its DKIM keys differ, which does not matter "
                     "for inbound mail); the harness cannot start a second one on that port")
        return False
    except Exception:  # noqa: BLE001 - nothing answers: start the harness's own
        sh.shared_dns()
        notes.append(f"DNS for the containers: this run's own knot on {gateway}:53 (stopped after the "
                     "container phase; a test session starting meanwhile could not start its own)")
        return True


def container_phase(out: dict[str, Any], stack: Any, args: argparse.Namespace, password: str) -> None:
    from portal.stack import deploy as deploy_mod
    from portal.stack.accounts import Accounts
    from portal.stack.dovecot_keys import DovecotKeys

    client, settings = stack.client, stack.settings
    healthy_at: dict[str, float] = {}
    start = time.monotonic()

    def progress(service: str, state: str) -> None:
        say(f"  {service}: {state}")
        if state == "healthy":
            healthy_at.setdefault(service, round(time.monotonic() - start, 1))

    out["machine"]["at_deploy"] = machine_facts(client)
    say("deploying the container stack (fresh state folder and volumes)")
    result = deploy_mod.deploy(client, settings, timeout=180, progress=progress)
    out["deploy_seconds"] = round(time.monotonic() - start, 1)
    out["seconds_to_healthy"] = round(result.seconds_to_healthy, 1)
    out["healthy_after_seconds"] = healthy_at
    say(f"healthy after {out['seconds_to_healthy']} s (deploy call {out['deploy_seconds']} s)")

    t = time.monotonic()
    Accounts(settings.accounts_db).create_mailbox(USER, password, keys=DovecotKeys(client, settings.project))
    out["mailbox_create_seconds"] = round(time.monotonic() - t, 1)

    from portal.stack.settings import SERVICES
    containers = {svc: stack.container(svc) for svc in SERVICES}
    pids = {svc: c.attrs["State"]["Pid"] for svc, c in containers.items()}
    cpu_groups = {svc: pid_cgroup(pid, "cpuacct") for svc, pid in pids.items()}
    ports = (settings.ports["smtp"], settings.ports["imaps"])
    proxies = [p for port in ports for p in pids_matching("docker-proxy", f"-host-port {port} ")]
    shims = [p for c in containers.values() for p in pids_matching("containerd-shim", c.id)]
    meter = CpuMeter({k: v for k, v in cpu_groups.items() if v},
                     {"docker-proxy": proxies, "containerd-shims": shims,
                      "dockerd (shared with other sessions)": pids_named("dockerd"),
                      "containerd (shared with other sessions)": pids_named("containerd")})

    def forks() -> dict[str, int]:
        code, output = containers["dovecot"].exec_run(["doveadm", "-f", "tab", "service", "status"])
        return dovecot_forks(output.decode(errors="replace")) if code == 0 else {}

    def exec_postfix(cmd: list[str]) -> tuple[int, str]:
        code, output = containers["postfix"].exec_run(cmd)
        return code, output.decode(errors="replace")
    client_kw = dict(host="127.0.0.1", smtp_port=ports[0], imap_port=ports[1], cafile=settings.cert_path,
                     source=None, timeout=args.timeout, password=password)

    say(f"warm-up: {args.warmup} messages")
    warm = run_client([], senders=1, messages=args.warmup, tag="warmup", **client_kw)
    out["warmup"] = {"container": {k: warm.get(k) for k in ("delivered", "seconds", "connect_seconds_max")}}

    say(f"idle for {args.idle_seconds} s")
    a = meter.snapshot()
    time.sleep(args.idle_seconds)
    idle_cpu = CpuMeter.delta(a, meter.snapshot())
    rss, usage = {}, {}
    for svc, c in containers.items():
        mem = c.stats(stream=False, one_shot=True)["memory_stats"]
        stats = mem.get("stats", {})
        rss[svc] = round((stats["total_rss"] if "total_rss" in stats else stats["anon"]) / 2**20, 1)
        usage[svc] = round(mem["usage"] / 2**20, 1)
    rss["total"] = round(sum(rss.values()), 1)
    usage["total"] = round(sum(usage.values()), 1)
    out["idle_rss_mb"], out["idle_usage_mb"] = rss, usage
    out["idle_cpu_percent"] = {k: round(100 * v / args.idle_seconds, 1) for k, v in idle_cpu.items()
                               if k != "machine_busy_percent"}
    out["idle_cpu_percent"]["machine_busy_percent"] = idle_cpu["machine_busy_percent"]
    say(f"idle RSS {rss}")

    for k in args.senders:
        say(f"container throughput: {args.messages} messages, {k} sender(s)")
        facts = machine_facts(client)
        queue = drain_queue(exec_postfix)
        time.sleep(2)  # a gap between the runs' log lines
        since = time.time()
        fa = forks()
        a = meter.snapshot()
        r = run_client([], senders=k, messages=args.messages, tag=f"container-{k}", **client_kw)
        b = meter.snapshot()
        r["dovecot_processes_forked"] = forks_delta(fa, forks(), r.get("delivered"))
        cpu = CpuMeter.delta(a, b)
        time.sleep(1)
        logs = {svc: containers[svc].logs(since=since, until=time.time()).decode(errors="replace")
                for svc in ("postfix", "rspamd")}
        r["machine"] = facts
        r["postfix_queue_before"] = queue
        r["cpu_seconds"] = cpu
        r["cpu_seconds_by_process"] = CpuMeter.by_process(a, b)
        r["cpu_ms_per_message"] = per_message(cpu, r.get("delivered"))
        r["logs"] = log_findings(logs["postfix"], logs["rspamd"])
        out["runs"]["container"][str(k)] = r
        out["throughput_msgs_per_s"]["container"][str(k)] = r.get("msgs_per_s")
        say(f"  {r.get('msgs_per_s')} msg/s ({r.get('delivered')} in {r.get('seconds')} s; accepted at "
            f"{r.get('accept_msgs_per_s')} msg/s); cpu {cpu}")


def per_message(cpu: dict[str, Any], delivered: int | None) -> dict[str, float] | None:
    if not delivered:
        return None
    out = {k: round(1000 * v / delivered, 2) for k, v in cpu.items() if k != "machine_busy_percent"}
    own = sum(v for k, v in out.items() if "shared" not in k)
    shared = sum(v for k, v in out.items() if "shared" in k)
    out["total_stack"] = round(own, 2)
    if shared:
        out["total_incl_docker_daemons"] = round(own + shared, 2)
    return out


# =============================================================================
# The same services bare: chroots of the images' files in one network namespace
# =============================================================================

class Bare:
    """postfix, dovecot, rspamd and redis from exports of their images, each in a
    chroot, all in network namespace `ns`, started by their own entry points."""

    def __init__(self, workdir: Path, settings: Any, client: Any) -> None:
        self.workdir, self.settings, self.client = workdir, settings, client
        self.ns = f"{PROJECT}-bare-{os.getpid()}"
        self.roots = {svc: workdir / svc for svc in MAIL_SERVICES}
        self.mounts: list[tuple[Path, bool]] = []   # (target, recursive)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.cgroups: dict[str, dict[str, Path]] = {}  # service -> controller -> folder
        self.netns = False
        self.notes: list[str] = []
        self.stop_seconds: dict[str, Any] = {}

    # -- preparing -------------------------------------------------------------

    def export(self, image_ids: dict[str, str]) -> None:
        for svc in MAIL_SERVICES:
            root = self.roots[svc]
            root.mkdir(parents=True)
            c = self.client.containers.create(image_ids[svc], command=["/bin/true"], network_mode="none",
                                              name=f"{PROJECT}-export-{svc}-{os.getpid()}")
            try:
                run(["bash", "-o", "pipefail", "-c",
                     'docker export "$1" | tar -x -p --numeric-owner -f - -C "$2"', "export", c.id, str(root)])
            finally:
                c.remove(force=True)

    def copy_volumes(self, volumes: dict[str, Path]) -> None:
        """Named volumes' contents (taken while the container stack is stopped)."""
        where = {"mail": ("dovecot", "var/mail"), "rspamd": ("rspamd", "var/lib/rspamd"),
                 "redis": ("redis", "var/lib/redis")}
        for vol, (svc, rel) in where.items():
            dest = self.roots[svc] / rel
            dest.mkdir(parents=True, exist_ok=True)
            run(["cp", "-a", f"{volumes[vol]}/.", f"{dest}/"])

    def configure(self) -> None:
        s = self.settings
        for svc in MAIL_SERVICES:
            root = self.roots[svc]
            conf = root / "etc/mailstead" / svc
            conf.mkdir(parents=True, exist_ok=True)
            run(["cp", "-a", f"{s.stack_dir / svc}/.", f"{conf}/"])
            if svc in ("postfix", "dovecot"):
                tls = root / "etc/mailstead/tls"
                tls.mkdir(parents=True, exist_ok=True)
                run(["cp", "-a", str(s.cert_path), str(tls / "cert.pem")])
                run(["cp", "-a", str(s.key_path), str(tls / "key.pem")])
                acc = root / "var/lib/mailstead-accounts"
                acc.mkdir(parents=True, exist_ok=True)
                run(["cp", "-a", f"{s.accounts_dir}/.", f"{acc}/"])
            if svc == "rspamd":
                dkim = root / "run/mailstead-dkim"
                dkim.mkdir(parents=True, exist_ok=True)
                run(["cp", "-a", f"{s.dkim_dir}/.", f"{dkim}/"])
                # Bare, there is no unbound: rspamd asks the namespace's knot directly.
                options = conf / "override.d/options.inc"
                text = options.read_text()
                resolver = f'nameserver = ["{s.resolver_address}:53"];'
                if resolver not in text:
                    raise RuntimeError(f"{options} does not name the stack's resolver ({resolver})")
                options.write_text(text.replace(resolver, 'nameserver = ["127.0.0.1:53"];'))
            # What docker writes into every container: hosts (the stack network's
            # names, here all on this namespace's loopback), resolv.conf, hostname.
            (root / "etc/hosts").write_text(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                "127.0.0.1\tpostfix dovecot rspamd redis\n"
                f"{BARE_SERVER}\t{HOSTNAME} {HOSTNAME.split('.')[0]}\n")
            (root / "etc/resolv.conf").write_text("nameserver 127.0.0.1\noptions ndots:0\n")
            (root / "etc/hostname").write_text(HOSTNAME + "\n")

    def mount_all(self) -> None:
        for svc in MAIL_SERVICES:
            root = self.roots[svc]
            for sub in ("proc", "dev", "sys"):
                (root / sub).mkdir(exist_ok=True)
            self._mount(root / "proc", ["-t", "proc", "proc"])
            # slave: unmounting the copies of /dev's submounts must not reach the host's
            self._mount(root / "dev", ["--rbind", "--make-rslave", "/dev"], recursive=True)
            self._mount(root / "sys", ["-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs"])
            if svc == "dovecot":  # compose: tmpfs /tmp and /var/cache/dovecot-index
                for rel in ("tmp", "var/cache/dovecot-index"):
                    (root / rel).mkdir(parents=True, exist_ok=True)
                    self._mount(root / rel, ["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev,noexec", "tmpfs"])

    def _mount(self, target: Path, args: list[str], recursive: bool = False) -> None:
        run(["mount", *args, str(target)])
        self.mounts.append((target, recursive))

    def make_netns(self) -> None:
        run(["ip", "netns", "add", self.ns])
        self.netns = True
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{BARE_SERVER}/32", "dev", "lo"],
                    ["ip", "addr", "add", f"{BARE_CLIENT}/32", "dev", "lo"]):
            run(["ip", "netns", "exec", self.ns, *cmd])

    def make_cgroups(self) -> None:
        controllers = [""] if CGROUP_V2 else ["cpuacct", "memory"]
        for svc in MAIL_SERVICES:
            self.cgroups[svc] = {}
            for ctrl in controllers:
                d = Path("/sys/fs/cgroup") / ctrl / f"{self.ns}-{svc}"
                try:
                    d.mkdir()
                except OSError as err:
                    self.notes.append(f"no cgroup {d} ({err.strerror}): no CPU/memory figures for bare {svc}")
                    continue
                self.cgroups[svc][ctrl or "unified"] = d

    # -- running ---------------------------------------------------------------

    def start_dns(self, records: list[Any]) -> None:
        """knot with the harness's zone on the namespace's 127.0.0.1:53 (in compose,
        the stack's unbound forwards to the harness's knot)."""
        from tests.integration.knot import Knot

        kdir = self.workdir / "knot"
        (kdir / "run").mkdir(parents=True)
        zone = Knot(kdir, DOMAIN, records, address="127.0.0.1", port=53)
        (kdir / f"{DOMAIN}.zone").write_text(zone.zone_text())
        conf = kdir / "knot.conf"
        conf.write_text(
            f"server:\n  rundir: {kdir}/run\n  listen: 127.0.0.1@53\n"
            "log:\n  - target: stderr\n    any: warning\n"
            f"database:\n  storage: {kdir}/db\n"
            f"template:\n  - id: default\n    storage: {kdir}\n    file: \"%s.zone\"\n"
            "    zonefile-sync: -1\n    journal-content: none\n"
            f"zone:\n  - domain: {DOMAIN}\n")
        knotd = shutil.which("knotd") or "/usr/sbin/knotd"
        self._spawn("knot", ["ip", "netns", "exec", self.ns, knotd, "-c", str(conf)], os.environ.copy())
        deadline = time.monotonic() + 20
        while "127.0.0.1:53 " not in run(["ip", "netns", "exec", self.ns, "ss", "-lun"]).stdout:
            if self.procs["knot"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("knotd in the namespace did not start: " + self.log_tail("knot"))
            time.sleep(0.2)

    def userspec(self, svc: str) -> list[str]:
        """compose's `user: redis` (the others start as root)."""
        if svc != "redis":
            return []
        for line in (self.roots[svc] / "etc/passwd").read_text().splitlines():
            f = line.split(":")
            if f[0] == "redis":
                return [f"--userspec={f[2]}:{f[3]}"]
        raise RuntimeError("no redis user in the redis image")

    def start(self, svc: str) -> None:
        root = self.roots[svc]
        join = "".join(f"echo $$ > {d}/cgroup.procs && " for d in self.cgroups.get(svc, {}).values())
        cmd = ["sh", "-c", join + 'exec "$@"', "sh",
               "ip", "netns", "exec", self.ns, "unshare", "--uts", "--",
               "sh", "-c", 'echo "$0" > /proc/sys/kernel/hostname && exec chroot "$@"', HOSTNAME,
               *self.userspec(svc), str(root),
               # as compose's entrypoint; -s: tini is not PID 1 here, so it registers as subreaper
               "/usr/bin/tini", "-s", "--", "/bin/sh", f"/etc/mailstead/{svc}/entrypoint.sh"]
        image_env = self.client.images.get(self.settings.images[svc]).attrs["Config"].get("Env") or []
        env = dict(e.split("=", 1) for e in image_env)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env |= {"HOSTNAME": HOSTNAME, "HOME": "/var/lib/redis" if svc == "redis" else "/root"}
        self._spawn(svc, cmd, env)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as f:
            self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                                env=env, start_new_session=True)

    def health(self, svc: str) -> str | None:
        """None if the service's own healthcheck.sh passes (run as compose runs it), else why not."""
        if self.procs[svc].poll() is not None:
            return f"exited {self.procs[svc].returncode}: {self.log_tail(svc)}"
        r = run(["ip", "netns", "exec", self.ns, "chroot", *self.userspec(svc), str(self.roots[svc]),
                 "/bin/sh", f"/etc/mailstead/{svc}/healthcheck.sh"], check=False, timeout=15)
        return None if r.returncode == 0 else (r.stdout + r.stderr).strip()[-300:] or f"exit {r.returncode}"

    def wait_healthy(self, timeout: float) -> dict[str, float]:
        start = time.monotonic()
        healthy: dict[str, float] = {}
        why: dict[str, str | None] = {}
        while len(healthy) < len(MAIL_SERVICES):
            for svc in MAIL_SERVICES:
                if svc in healthy:
                    continue
                why[svc] = self.health(svc)
                if why[svc] is None:
                    healthy[svc] = round(time.monotonic() - start, 1)
                    say(f"  bare {svc}: healthy")
                elif why[svc].startswith("exited"):
                    raise RuntimeError(f"bare {svc} {why[svc]}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"bare services not healthy after {timeout} s: "
                                   + "; ".join(f"{s}: {w}" for s, w in why.items() if s not in healthy))
            time.sleep(0.5)
        return healthy

    def exec_postfix(self, cmd: list[str]) -> tuple[int, str]:
        r = run(["ip", "netns", "exec", self.ns, "chroot", str(self.roots["postfix"]), *cmd], check=False)
        return r.returncode, r.stdout

    def dovecot_forks(self) -> dict[str, int]:
        r = run(["ip", "netns", "exec", self.ns, "chroot", str(self.roots["dovecot"]),
                 "doveadm", "-f", "tab", "service", "status"], check=False)
        return dovecot_forks(r.stdout) if r.returncode == 0 else {}

    def memory(self) -> dict[str, float]:
        out = {}
        for svc, groups in self.cgroups.items():
            d = groups.get("memory") or groups.get("unified")
            if d:
                out[svc] = round(cgroup_memory(d)["rss"], 1)
        if out:
            out["total"] = round(sum(out.values()), 1)
        return out

    def log_tail(self, name: str, size: int = 1200) -> str:
        try:
            return self.logs[name].read_text(errors="replace")[-size:]
        except (KeyError, OSError):
            return ""

    def log_offsets(self) -> dict[str, int]:
        return {n: p.stat().st_size for n, p in self.logs.items() if p.exists()}

    def log_since(self, name: str, offset: int) -> str:
        with open(self.logs[name], "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    # -- cleaning up (also after a failure half-way) ------------------------------

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        # As `docker stop`: SIGTERM to the entry process (tini, which forwards it), 10 s, then SIGKILL.
        start = time.monotonic()
        for name, p in reversed(list(self.procs.items())):
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        running = dict(self.procs)
        while running and time.monotonic() < start + 10:
            for name, p in list(running.items()):
                if p.poll() is not None:
                    self.stop_seconds[name] = round(time.monotonic() - start, 1)
                    del running[name]
            time.sleep(0.05)
        for name, p in running.items():
            self.stop_seconds[name] = "did not stop within 10 s of SIGTERM; killed"
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Whatever is left of what was started here: in the namespace or in its cgroups.
        left: set[int] = set()
        if self.netns:
            r = run(["ip", "netns", "pids", self.ns], check=False)
            left |= {int(x) for x in r.stdout.split()}
        for groups in self.cgroups.values():
            for d in groups.values():
                try:
                    left |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
                except OSError:
                    pass
        for pid in sorted(left):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        time.sleep(0.5 if left else 0)
        if self.netns:
            r = run(["ip", "netns", "delete", self.ns], check=False)
            if r.returncode:
                problems.append(f"ip netns delete {self.ns}: {r.stderr.strip()}")
        for groups in self.cgroups.values():
            for d in groups.values():
                for _ in range(20):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.25)
                else:
                    problems.append(f"cgroup {d} still busy; left in place")
        for target, recursive in reversed(self.mounts):
            r = run(["umount", *(["-R"] if recursive else []), str(target)], check=False)
            if r.returncode:
                r = run(["umount", "-l", *(["-R"] if recursive else []), str(target)], check=False)
                if r.returncode:
                    problems.append(f"umount {target}: {r.stderr.strip()}")
        mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4].startswith(str(self.workdir) + "/")]
        if mounted:
            problems.append(f"still mounted, so {self.workdir} was NOT deleted: {mounted[:5]}")
        else:
            run(["rm", "-rf", "--one-file-system", str(self.workdir)], check=False)
        return problems


def bare_phase(out: dict[str, Any], stack: Any, bare: Bare, args: argparse.Namespace, password: str,
               records: list[Any]) -> None:
    settings = stack.settings
    info = out["bare"]
    say("bare: namespace, cgroups, mounts")
    bare.make_netns()
    bare.make_cgroups()
    bare.mount_all()
    bare.start_dns(records)
    start = time.monotonic()
    for svc in MAIL_SERVICES:
        bare.start(svc)
    info["healthy_after_seconds"] = bare.wait_healthy(args.bare_timeout)
    info["seconds_to_healthy"] = round(time.monotonic() - start, 1)
    say(f"bare services healthy after {info['seconds_to_healthy']} s")

    prefix = ["ip", "netns", "exec", bare.ns]
    client_kw = dict(host=BARE_SERVER, smtp_port=25, imap_port=993, cafile=settings.cert_path,
                     source=BARE_CLIENT, timeout=args.timeout, password=password)
    warm = run_client(prefix, senders=1, messages=args.warmup, tag="warmup", **client_kw)
    out["warmup"]["bare"] = {k: warm.get(k) for k in ("delivered", "seconds", "connect_seconds_max")}
    info["rss_mb_after_warmup"] = bare.memory()

    cpu_groups = {svc: g.get("cpuacct") or g.get("unified") for svc, g in bare.cgroups.items()}
    meter = CpuMeter({k: v for k, v in cpu_groups.items() if v}, {})
    variants = [("bare", None)]
    if not args.no_quickack:
        variants.append(("bare_quickack", "quickack 1"))
    for mode, route_opt in variants:
        if route_opt:
            # Diagnostic variant: no delayed ACKs on the namespace's 127.0.0.1 (the services'
            # connections to each other), which removes the postfix->rspamd milter stall.
            run(["ip", "netns", "exec", bare.ns, "ip", "route", "replace", "local", "127.0.0.1", "dev", "lo",
                 "table", "local", "proto", "kernel", "scope", "host", "src", "127.0.0.1", *route_opt.split()])
        for k in args.senders:
            bare_run(out, mode, k, stack, bare, meter, prefix, client_kw, args)


def bare_run(out: dict[str, Any], mode: str, k: int, stack: Any, bare: Bare, meter: CpuMeter,
             prefix: list[str], client_kw: dict[str, Any], args: argparse.Namespace) -> None:
    """One throughput run against the bare services (the client inside their namespace)."""
    say(f"{mode} throughput: {args.messages} messages, {k} sender(s)")
    facts = machine_facts(stack.client)
    queue = drain_queue(bare.exec_postfix)
    time.sleep(2)
    offsets = bare.log_offsets()
    fa = bare.dovecot_forks()
    a = meter.snapshot()
    r = run_client(prefix, senders=k, messages=args.messages, tag=f"{mode}-{k}", **client_kw)
    b = meter.snapshot()
    r["dovecot_processes_forked"] = forks_delta(fa, bare.dovecot_forks(), r.get("delivered"))
    cpu = CpuMeter.delta(a, b)
    time.sleep(1)
    r["machine"] = facts
    r["postfix_queue_before"] = queue
    r["cpu_seconds"] = cpu
    r["cpu_seconds_by_process"] = CpuMeter.by_process(a, b)
    r["cpu_ms_per_message"] = per_message(cpu, r.get("delivered"))
    r["logs"] = log_findings(bare.log_since("postfix", offsets["postfix"]),
                             bare.log_since("rspamd", offsets["rspamd"]))
    out["runs"].setdefault(mode, {})[str(k)] = r
    out["throughput_msgs_per_s"].setdefault(mode, {})[str(k)] = r.get("msgs_per_s")
    say(f"  {r.get('msgs_per_s')} msg/s ({r.get('delivered')} in {r.get('seconds')} s; accepted at "
        f"{r.get('accept_msgs_per_s')} msg/s); cpu {cpu}")


# =============================================================================
# main
# =============================================================================

def run_summary(out: dict[str, Any]) -> dict[str, Any]:
    """The figures that say where the time goes, one line per run."""
    summ: dict[str, Any] = {}
    for mode, runs in out["runs"].items():
        for k, r in runs.items():
            logs = r.get("logs") or {}
            delays = logs.get("postfix_delays_ms") or {}
            summ[f"{mode}/{k}"] = {
                "msgs_per_s": r.get("msgs_per_s"), "all_delivered": r.get("all_delivered"),
                "accept_msgs_per_s": r.get("accept_msgs_per_s"),
                "smtp_ms_p50": (r.get("smtp_ms_per_message") or {}).get("p50"),
                "rspamd_scan_ms_mean": (logs.get("rspamd_scan_ms") or {}).get("mean"),
                "postfix_delays_ms_mean_a_b_c_d": [(v or {}).get("mean") for v in delays.values()],
                "lmtp_processes_per_message": (r.get("dovecot_processes_forked") or {}).get("lmtp_per_message"),
                "lmtp_on_reused_connection": logs.get("postfix_lmtp_deliveries_on_reused_connection"),
                "postfix_deferred": logs.get("postfix_deferred"),
                "cpu_ms_per_message": r.get("cpu_ms_per_message"),
                "machine_busy_percent": (r.get("cpu_seconds") or {}).get("machine_busy_percent"),
            }
    return summ


def targets(out: dict[str, Any]) -> dict[str, Any]:
    tp = out["throughput_msgs_per_s"]
    cont = {k: v for k, v in tp["container"].items()}
    ratio = {k: v for k, v in tp["ratio"].items()}
    images = out.get("images_mb") or {}
    services = {k: v for k, v in images.items() if k != "base"}

    def met(values: list[Any], ok: Any) -> bool | None:
        return None if not values or any(v is None for v in values) else all(ok(v) for v in values)

    return {
        "throughput_ge_100_msgs_per_s": {
            "value": cont,
            "met": met(list(cont.values()), lambda v: v >= TARGETS["throughput_msgs_per_s"])
            and all(r.get("all_delivered") for r in out["runs"]["container"].values())},
        "container_vs_bare_ratio_ge_0_9": {"value": ratio, "met": met(list(ratio.values()),
                                                                     lambda v: v >= TARGETS["ratio"])},
        "healthy_le_30_s": {"value": out.get("seconds_to_healthy"),
                            "met": met([out.get("seconds_to_healthy")], lambda v: v <= TARGETS["seconds_to_healthy"])},
        "idle_rss_le_350_mb": {"value": (out.get("idle_rss_mb") or {}).get("total"),
                               "met": met([(out.get("idle_rss_mb") or {}).get("total")],
                                          lambda v: v <= TARGETS["idle_rss_mb"])},
        "every_image_le_150_mb": {"value": max(services.values()) if services else None,
                                  "largest": max(services, key=services.get) if services else None,
                                  "met": met(list(services.values()), lambda v: v <= TARGETS["image_mb"])},
    }


def main() -> int:
    global PROJECT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=400, help="messages per throughput run (default 400)")
    ap.add_argument("--senders", default="1,8", help="comma-separated concurrent sender counts (default 1,8)")
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="messages sent before the idle wait")
    ap.add_argument("--timeout", type=float, default=0, help="seconds to wait for delivery (default: max(90, N/4)); "
                    "a run also ends when nothing more arrives for 10 s after the last message was accepted")
    ap.add_argument("--bare-timeout", type=float, default=180, help="seconds for the bare services to be healthy")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare comparison")
    ap.add_argument("--no-quickack", action="store_true",
                    help="skip the bare runs repeated without delayed ACKs on the namespace's loopback")
    ap.add_argument("--project", default=PROJECT)
    ap.add_argument("--port-base", type=int, default=PORT_BASE)
    # --client: the sending/IMAP side, run as a child process by the above
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--smtp-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--imap-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cafile", help=argparse.SUPPRESS)
    ap.add_argument("--user", default=USER, help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--poll", type=float, default=0.05, help=argparse.SUPPRESS)
    ap.add_argument("--stall", type=float, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--no-starttls", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.timeout = args.timeout or max(90.0, args.messages / 4)
    if args.client:
        args.senders = int(args.senders)
        return client_main(args)
    args.senders = [int(x) for x in args.senders.split(",")]
    if os.geteuid() != 0:
        ap.error("run as root (docker, mounts, network namespaces)")

    # A SIGTERM/SIGINT ends the run through the finally blocks (clean-up included).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import docker

    from portal.stack import deploy as deploy_mod
    from tests.integration import stackharness as sh

    PROJECT = args.project
    wall = time.monotonic()
    password = "bench-" + os.urandom(12).hex()
    out: dict[str, Any] = {
        "images_mb": None, "seconds_to_healthy": None, "deploy_seconds": None, "idle_rss_mb": None,
        "throughput_msgs_per_s": {"container": {}, "bare": {}, "ratio": {}},
        "messages": args.messages, "senders": args.senders,
        "units": {"images_mb": "10^6 bytes (as docker images)", "idle_rss_mb": "MiB (as docker stats)",
                  "cpu_ms_per_message": "CPU milliseconds per delivered message"},
        "machine": {"cpus": os.cpu_count(), "mem_mb": None, "kernel": os.uname().release,
                    "cgroup": "v2" if CGROUP_V2 else "v1"},
        "runs": {"container": {}, "bare": {}},
        "warmup": {},
        "bare": {"ok": False, "services": list(MAIL_SERVICES), "error": None, "notes": list(BARE_NOTES)},
        "errors": [],
    }
    notes: list[str] = []
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    out["machine"]["mem_mb"] = int(meminfo["MemTotal"].split()[0]) // 1024

    from portal.stack.settings import SERVICES
    client = docker.from_env(timeout=300)
    out["machine"]["docker"] = client.version().get("Version")
    state_dir = Path(tempfile.mkdtemp(prefix=f"{PROJECT}-state-", dir="/var/tmp"))
    bare_dir = Path(tempfile.mkdtemp(prefix=f"{PROJECT}-bare-", dir="/var/tmp"))
    stack = None
    own_dns = False
    stack_up = False
    bare: Bare | None = None
    try:
        own_dns = use_shared_dns(sh, notes)
        stack = sh.start_stack(state_dir, PROJECT, args.port_base)  # loads the image tars if they changed
        stack_up = True
        out["images_mb"] = image_sizes(client, sh.VERSION)
        try:
            container_phase(out, stack, args, password)
        except Exception as err:  # noqa: BLE001 - reported in the JSON
            out["errors"].append(f"container phase: {err}")
            say(traceback.format_exc())
        if args.no_bare or out["errors"]:
            out["bare"]["error"] = "skipped" if args.no_bare else "skipped: the container phase failed"
        else:
            try:
                say("stopping the container stack; exporting images and volumes for the bare run")
                t = time.monotonic()
                r = deploy_mod.compose(stack.settings, "stop")  # compose's default: SIGKILL after 10 s
                if r.returncode:
                    raise RuntimeError(f"compose stop: {r.stderr.strip()[-500:]}")
                out["compose_stop"] = {"seconds": round(time.monotonic() - t, 1), "exit_codes": {
                    svc: stack.container(svc).attrs["State"]["ExitCode"]
                    for svc in SERVICES},
                    "note": "137: killed (did not stop within 10 s of SIGTERM)"}
                if own_dns:
                    sh._dns.stop()  # noqa: SLF001 - free the gateway's port 53 for the test sessions
                volumes = {v: Path(client.volumes.get(f"{PROJECT}_{v}").attrs["Mountpoint"])
                           for v in ("mail", "rspamd", "redis")}
                bare = Bare(bare_dir, stack.settings, client)
                bare.export(stack.settings.images)
                bare.copy_volumes(volumes)
                bare.configure()
                stack.down()
                stack_up = False
                bare_phase(out, stack, bare, args, password, sh.zone_records())
                out["bare"]["ok"] = True
            except Exception as err:  # noqa: BLE001 - reported in the JSON
                out["bare"]["error"] = str(err)[-1500:]
                say(traceback.format_exc())
    finally:
        if bare is not None:
            say("bare: cleaning up")
            problems = bare.cleanup()
            out["bare"]["notes"] += bare.notes
            out["bare"]["stop_seconds_after_sigterm"] = bare.stop_seconds
            if problems:
                out["bare"]["cleanup_problems"] = problems
        else:
            shutil.rmtree(bare_dir, ignore_errors=True)
        if stack is not None and stack_up:
            say("taking the container stack down")
            stack.down()
        if own_dns and sh._dns is not None:  # noqa: SLF001
            sh._dns.stop()  # noqa: SLF001
            shutil.rmtree(sh._dns.workdir, ignore_errors=True)  # noqa: SLF001
        shutil.rmtree(sh.SHARED_DKIM, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)

    tp = out["throughput_msgs_per_s"]
    for k in map(str, args.senders):
        c, b, q = tp["container"].get(k), tp["bare"].get(k), tp.get("bare_quickack", {}).get(k)
        tp["ratio"][k] = round(c / b, 2) if c and b else None
        if "bare_quickack" in tp:
            tp.setdefault("ratio_vs_bare_quickack", {})[k] = round(c / q, 2) if c and q else None
    out["summary"] = run_summary(out)
    out["machine"]["note"] = (
        f"{os.cpu_count()} CPUs shared by the stack, the client (same host) and whatever else runs: "
        "other engineers' test stacks may run concurrently (see runs.*.*.machine: load average and other "
        "running containers at each run's start), so throughput and ratios carry that noise. "
        + " ".join(notes))
    out["targets"] = targets(out)
    out["wall_seconds"] = round(time.monotonic() - wall, 1)
    print(json.dumps(out, indent=2))
    return 0 if not out["errors"] and (args.no_bare or out["bare"]["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
