"""`mailstead` command line: talks to the agent like the web process does."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from .agent.client import DEFAULT_SOCKET, AgentClient, AgentError


def read_password(prompt: str, from_stdin: bool) -> str:
    """From stdin (one line) for scripts, else asked twice on the terminal."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"{prompt}: ")
    if getpass.getpass(f"{prompt} (again): ") != first:
        raise SystemExit("mailstead: the two passwords differ; nothing was changed")
    return first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailstead", description="Mailstead appliance tools")
    parser.add_argument("--socket", default=os.environ.get("MAILSTEAD_AGENT_SOCKET", DEFAULT_SOCKET),
                        help="agent socket (env MAILSTEAD_AGENT_SOCKET; default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the agent (default: 60; 900 for load-images and deploy)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("status", help="run the health checks and print them (exit 1 if one fails)")
    p.add_argument("--versions", action="store_true", help="only show OS, docker engine and portal versions (JSON)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--no-alert", action="store_true", help="do not mail the admin about changes seen by this run")
    commands.add_parser("schedule-list", help="the maintenance jobs, their schedules and last runs")
    p = commands.add_parser("schedule-set", help="change a job's schedule (crontab text, or 'default')")
    p.add_argument("job", help="backup, verify, cert_renew, health, dns_check or upgrade_check")
    p.add_argument("cron", help="e.g. '0 3 * * *' for 03:00 daily (minute hour day month weekday)")
    p = commands.add_parser("schedule-runs", help="the latest runs of a job (or of all jobs)")
    p.add_argument("job", nargs="?", default="")
    p.add_argument("--limit", type=int, default=20)
    p = commands.add_parser("alerts-configure", help="where alerts go besides the admin's mail, and the DNSBLs")
    p.add_argument("--webhook-url", default="", help="https:// URL that gets a JSON POST per change (empty: none)")
    p.add_argument("--dnsbl-zones", default="", help="blocklist zones, comma separated (empty: the defaults)")
    commands.add_parser("alerts-test", help="send a test alert to the admin and the webhook")
    commands.add_parser("load-images", help="load the preloaded mail stack images into docker")
    commands.add_parser("deploy", help="render the mail stack from the settings and start it")
    commands.add_parser("stack-status", help="state and health of each mail stack service")
    commands.add_parser("mailbox-list", help="mailboxes and aliases")
    for name, text in (("mailbox-create", "create a mailbox (password asked, or --password-stdin)"),
                       ("mailbox-reset-password", "set a new password for a forgotten one "
                                                  "(mail stored until now becomes unreadable)")):
        p = commands.add_parser(name, help=text)
        p.add_argument("address")
        p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if name == "mailbox-create":
            p.add_argument("--quota-mb", type=int, default=0, help="0 means no limit (default)")
    p = commands.add_parser("mailbox-password", help="change a password (old and new on stdin or asked)")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true", help="read old, then new password from stdin")
    p = commands.add_parser("mailbox-delete", help="delete a mailbox and its mail")
    p.add_argument("address")
    p = commands.add_parser("mailbox-rename", help="rename a mailbox, keeping its mail")
    p.add_argument("address")
    p.add_argument("new_address")
    for name in ("alias-add", "alias-remove"):
        p = commands.add_parser(name, help=f"{name.split('-')[1]} an alias")
        p.add_argument("source")
        p.add_argument("destination")
    p = commands.add_parser("dns-records", help="the DNS records the appliance needs (table, or --zone)")
    p.add_argument("--zone", action="store_true", help="print only the BIND zone fragment")
    p.add_argument("--dnssec", action="store_true", help="include the TLSA record (for a DNSSEC-signed zone)")
    commands.add_parser("dns-check", help="ask each authoritative server for every expected record")
    p = commands.add_parser("dns-push", help="publish the records by RFC 2136 (see dns-configure-push)")
    p.add_argument("--dry-run", action="store_true", help="only show what would change")
    p = commands.add_parser("dns-configure-push", help="store the RFC 2136 server and TSIG key "
                                                       "(secret asked, or --secret-stdin)")
    p.add_argument("server", help="IP address of the primary DNS server that accepts updates")
    p.add_argument("key_name", help="TSIG key name, e.g. mailstead-key")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--algorithm", default="hmac-sha256", choices=("hmac-sha256", "hmac-sha512"))
    p.add_argument("--secret-stdin", action="store_true", help="read the base64 TSIG secret from stdin")
    p = commands.add_parser("net-check", help="reverse DNS of the public addresses and outbound port 25")
    p.add_argument("--smtp-host", default=None, help="SMTP server to greet (default: a large public MX)")
    p.add_argument("--smtp-port", type=int, default=25)
    p = commands.add_parser("acme-configure", help="choose the certificate authority (ACME) and how to prove the names")
    p.add_argument("--directory", default="letsencrypt",
                   help="letsencrypt, letsencrypt-staging, or an https:// ACME directory URL")
    p.add_argument("--contact", default="", help="email address the CA writes to about expiry")
    p.add_argument("--challenge", default="http-01", choices=("http-01", "dns-01"))
    p.add_argument("--include-apex", action="store_true", help="also cover the bare domain")
    p.add_argument("--reuse-key", action="store_true", help="keep the key across renewals (for TLSA)")
    p.add_argument("--ca-bundle", default="", help="PEM file to trust for a private CA's directory")
    p.add_argument("--caa-issuer", default="", help="the CA's CAA domain, for a custom CA")
    commands.add_parser("cert-issue", help="get a certificate from the CA now and install it")
    p = commands.add_parser("cert-renew", help="renew the certificate if due (or --force)")
    p.add_argument("--force", action="store_true")
    commands.add_parser("cert-status", help="the certificate in use, its expiry and renewal")
    return parser


# How long the CLI waits for an answer. A mailbox change hashes the password
# (argon2id) and runs doveadm in the container: well under a second on real
# hardware, but 10 s was too short for a busy emulated VM.
DEFAULT_TIMEOUT = 60.0
# Operations that take minutes (the agent keeps working; the CLI waits this long).
LONG_OPS = {"stack_load_images": 900.0, "stack_deploy": 900.0, "cert_issue": 600.0, "cert_renew": 600.0,
            "dns_check": 120.0, "dns_push": 120.0, "net_check": 60.0, "health_run": 60.0}


def request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The agent operation and arguments for the parsed command line."""
    cmd = args.command
    simple = {"load-images": "stack_load_images", "deploy": "stack_deploy",
              "stack-status": "stack_status", "mailbox-list": "mailbox_list", "schedule-list": "schedule_list"}
    if cmd in simple:
        return simple[cmd], {}
    if cmd == "status":
        return ("status", {}) if args.versions else ("health_run", {"alert": not args.no_alert})
    if cmd == "schedule-set":
        return "schedule_set", {"job": args.job, "cron": args.cron}
    if cmd == "schedule-runs":
        return "schedule_runs", {"job": args.job, "limit": args.limit}
    if cmd == "alerts-configure":
        return "alerts_configure", {"webhook_url": args.webhook_url, "dnsbl_zones": args.dnsbl_zones}
    if cmd == "alerts-test":
        return "alerts_test", {}
    if cmd == "mailbox-create":
        return "mailbox_create", {"address": args.address, "quota_mb": args.quota_mb,
                                  "password": read_password("Password", args.password_stdin)}
    if cmd == "mailbox-reset-password":
        return "mailbox_reset_password", {"address": args.address,
                                          "new_password": read_password("New password", args.password_stdin)}
    if cmd == "mailbox-password":
        old = (sys.stdin.readline().rstrip("\n") if args.password_stdin
               else getpass.getpass("Current password: "))
        return "mailbox_password", {"address": args.address, "old_password": old,
                                    "new_password": read_password("New password", args.password_stdin)}
    if cmd == "mailbox-delete":
        return "mailbox_delete", {"address": args.address}
    if cmd == "mailbox-rename":
        return "mailbox_rename", {"address": args.address, "new_address": args.new_address}
    if cmd == "dns-records":
        return "dns_records", {"dnssec": args.dnssec}
    if cmd in ("dns-check", "cert-issue", "cert-status"):
        return cmd.replace("-", "_"), {}
    if cmd == "dns-push":
        return "dns_push", {"dry_run": args.dry_run}
    if cmd == "dns-configure-push":
        secret = (sys.stdin.readline().strip() if args.secret_stdin
                  else getpass.getpass("TSIG secret (base64): ").strip())
        return "dns_configure_push", {"server": args.server, "key_name": args.key_name, "port": args.port,
                                      "algorithm": args.algorithm, "secret": secret}
    if cmd == "net-check":
        op_args: dict[str, Any] = {"smtp_port": args.smtp_port}
        if args.smtp_host:
            op_args["smtp_host"] = args.smtp_host
        return "net_check", op_args
    if cmd == "acme-configure":
        return "acme_configure", {"directory": args.directory, "contact": args.contact,
                                  "challenge": args.challenge, "include_apex": args.include_apex,
                                  "reuse_key": args.reuse_key, "ca_bundle": args.ca_bundle,
                                  "caa_issuer": args.caa_issuer}
    if cmd == "cert-renew":
        return "cert_renew", {"force": args.force}
    if cmd in ("alias-add", "alias-remove"):
        return cmd.replace("-", "_"), {"source": args.source, "destination": args.destination}
    raise AssertionError(cmd)


MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def format_checks(result: dict[str, Any]) -> str:
    """`mailstead status`: one line per check, then what to do for each problem."""
    lines = []
    for r in result["results"]:
        lines.append(f"[{MARKS.get(r['status'], r['status'])}] {r['id']:<11} {r['message']}")
        if r["status"] != "ok" and r.get("fix"):
            lines.append(f"{'':19}-> {r['fix']}")
    s = result["summary"]
    lines.append(f"\n{s['ok']} ok, {s['warn']} warning(s), {s['fail']} failed ({result['seconds']:g} s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    op, op_args = request(args)
    timeout = args.timeout or LONG_OPS.get(op, DEFAULT_TIMEOUT)
    try:
        result = AgentClient(args.socket, timeout=timeout).call(op, **op_args)
    except AgentError as exc:
        print(f"mailstead: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    if args.command == "dns-records" and args.zone:
        print(result.get("zone", ""), end="")
    elif op == "health_run" and not args.json:
        print(format_checks(result), end="")
        return 1 if result["summary"]["status"] == "fail" else 0
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
