"""`mailstead` command line: talks to the agent like the web process does."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from portal.agent.client import DEFAULT_SOCKET, AgentClient, AgentError


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
    add_maintenance_commands(commands)
    return parser


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """Where the backups go (backup configure, restore)."""
    p.add_argument("--target", choices=("local", "sftp", "s3"), help="local folder or disk, SFTP, or S3")
    p.add_argument("--path", default="", help="local: the folder; sftp: the remote folder; s3: optional prefix")
    p.add_argument("--host", default="", help="sftp: server name or address")
    p.add_argument("--port", type=int, default=0, help="sftp: port (default 22)")
    p.add_argument("--user", default="", help="sftp: user name")
    p.add_argument("--key-file", default="", help="sftp: a private key to use (default: the appliance's own key)")
    p.add_argument("--endpoint", default="", help="s3: https:// URL of the S3-compatible store")
    p.add_argument("--bucket", default="", help="s3: bucket name")
    p.add_argument("--region", default="", help="s3: region (if the store needs one)")
    p.add_argument("--access-key-id", default="", help="s3: access key ID (the secret key is asked)")
    p.add_argument("--secret-stdin", action="store_true",
                   help="read the S3 secret key (then, for restore, the password) from stdin, one per line")


def add_maintenance_commands(commands: Any) -> None:
    """The maintenance commands (issue 6): setup, token, backup, restore, upgrade, certs."""
    commands.add_parser("setup", help="where and how to finish setup (portal addresses, token, fingerprint)")
    commands.add_parser("token", help="print the setup token while setup is unfinished")
    backup = commands.add_parser("backup", help="encrypted backups: configure, run, list, verify")
    sub = backup.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("configure", help="choose the target; a new repository prints its recovery sheet once")
    add_target_arguments(p)
    p.add_argument("--existing", action="store_true",
                   help="connect to an existing repository (its password from the recovery sheet is asked)")
    sub.add_parser("run", help="back up now (shows progress)")
    sub.add_parser("list", help="the snapshots in the repository, newest first")
    sub.add_parser("verify", help="restore the latest snapshot into a scratch folder and compare it")
    sub.add_parser("status", help="the last backup, verification and restore")
    p = commands.add_parser("restore", help="bring back mail, accounts, keys and settings from a backup")
    add_target_arguments(p)
    p.add_argument("--snapshot", default="latest", help="snapshot ID from `mailstead backup list` (default latest)")
    p.add_argument("--yes", action="store_true", help="do not ask before replacing this appliance's data")
    p = commands.add_parser("upgrade", help="load newer mail stack images, back up, redeploy; rolls back on failure")
    p.add_argument("--check", action="store_true", help="only say whether a newer version is available")
    p.add_argument("--source", default="", help="a folder holding the newer images (default: the ones in the OS)")
    p.add_argument("--without-backup", action="store_true",
                   help="upgrade even though no backup target is configured")
    p.add_argument("--force", action="store_true", help="redeploy even when the images are not newer")
    certs = commands.add_parser("certs", help="TLS certificates: status, renew")
    sub = certs.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("renew", help="renew the certificate if due (or --force)")
    p.add_argument("--force", action="store_true")
    sub.add_parser("status", help="the certificate in use, its expiry and renewal")


# How long the CLI waits for an answer. A mailbox change hashes the password
# (argon2id) and runs doveadm in the container: well under a second on real
# hardware, but 10 s was too short for a busy emulated VM.
DEFAULT_TIMEOUT = 60.0
# Operations that take minutes (the agent keeps working; the CLI waits this long).
LONG_OPS = {"stack_load_images": 900.0, "stack_deploy": 900.0, "cert_issue": 600.0, "cert_renew": 600.0,
            "dns_check": 120.0, "dns_push": 120.0, "net_check": 60.0, "health_run": 60.0,
            "backup_configure": 360.0, "backup_list": 180.0, "upgrade_check": 120.0}
# Operations that start a background job: the CLI follows it, printing its progress.
JOB_OPS = {"backup_run", "backup_verify", "backup_restore", "upgrade_run"}


def read_secret(prompt: str, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().strip()
    return getpass.getpass(f"{prompt}: ").strip()


def target_args(args: argparse.Namespace, password: bool) -> dict[str, Any]:
    """backup_configure's arguments from --target and friends (secrets asked, never argv)."""
    out: dict[str, Any] = {"target": args.target, "path": args.path, "host": args.host, "port": args.port,
                           "user": args.user, "endpoint": args.endpoint, "bucket": args.bucket,
                           "region": args.region, "access_key_id": args.access_key_id}
    if args.key_file:
        try:
            out["key"] = Path(args.key_file).read_text()
        except OSError as exc:
            raise SystemExit(f"mailstead: --key-file: cannot read {args.key_file}: {exc.strerror}") from None
    if args.target == "s3":
        out["secret_access_key"] = read_secret("S3 secret access key", args.secret_stdin)
    if password:
        out["password"] = read_secret("Repository password (from the recovery sheet)", args.secret_stdin)
        if not out["password"]:
            raise SystemExit("mailstead: password: give the password printed on the recovery sheet")
    return out


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
    if cmd == "backup":
        if args.action == "configure":
            if not args.target:
                raise SystemExit("mailstead: --target: choose local, sftp or s3")
            return "backup_configure", target_args(args, password=args.existing)
        return {"run": "backup_run", "list": "backup_list", "verify": "backup_verify",
                "status": "backup_state"}[args.action], {}
    if cmd == "certs":
        return ("cert_renew", {"force": args.force}) if args.action == "renew" else ("cert_status", {})
    if cmd == "upgrade":
        if args.check:
            return "upgrade_check", {}
        return "upgrade_run", {"source": args.source, "without_backup": args.without_backup, "force": args.force}
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


def follow(client: AgentClient, job: dict[str, Any], out: Any = None) -> dict[str, Any]:
    """Print a background job's progress (stderr) until it ends; return the final job."""
    out = out or sys.stderr
    seen = 0
    while True:
        events = job.get("events") or []
        for event in events[seen:]:
            print(f"[{event['t']:>6.1f} s] {event['step']}: {event['detail']}", file=out, flush=True)
        seen = len(events)
        if job.get("state") != "running":
            return job
        time.sleep(1.0)
        job = client.call("job_status", job_id=job["id"])


def job_outcome(job: dict[str, Any]) -> int:
    if job.get("state") == "done":
        print(json.dumps(job.get("result"), indent=2, sort_keys=True))
        return 0
    print(f"mailstead: {job.get('kind', 'job')} {job.get('state')}: {job.get('error') or 'no message'}",
          file=sys.stderr)
    return 1


def firstboot_paths(state_dir: Path | None) -> Any:
    from portal.agent import firstboot

    paths = firstboot.Paths.from_env()
    if state_dir is not None:
        paths = firstboot.Paths(state_dir, state_dir / "state.db", paths.issue_path, paths.group)
    return paths


NO_TOKEN = "(not made yet: run `systemctl restart mailstead-firstboot`)"


def show_token(state_dir: Path | None) -> int:
    from portal.agent import firstboot

    paths = firstboot_paths(state_dir)
    if firstboot.setup_complete(paths.db_path):
        print("mailstead: setup is finished and the setup token was deleted; sign in to the dashboard "
              "with the admin account", file=sys.stderr)
        return 1
    try:
        print(paths.token.read_text(encoding="ascii").strip())
    except OSError:
        print(f"mailstead: there is no setup token at {paths.token} {NO_TOKEN}", file=sys.stderr)
        return 1
    return 0


def show_setup(state_dir: Path | None) -> int:
    """The console message again: portal addresses, token (while unfinished), fingerprint."""
    import socket

    from portal.agent import firstboot

    paths = firstboot_paths(state_dir)
    try:
        fp = paths.fingerprint.read_text().strip()
    except OSError:
        fp = NO_TOKEN
    done = firstboot.setup_complete(paths.db_path)
    token = None
    if not done:
        try:
            token = paths.token.read_text(encoding="ascii").strip()
        except OSError:
            token = NO_TOKEN
    print(firstboot.issue_text(socket.gethostname(), firstboot.local_addresses(), token, fp), end="")
    if done:
        print("Setup is finished: the portal is the admin dashboard. `mailstead status` checks the appliance.")
    else:
        print("Open the portal address in a browser and enter the token: the wizard sets up the domain, the\n"
              "admin account, DNS, certificates and the mail stack, or restores a backup (`mailstead restore`\n"
              "does the same here). Check the certificate fingerprint against the browser's.")
    return 0


def restore(args: argparse.Namespace, client_for: Any) -> int:
    """mailstead restore: connect to the target (if given), pick the snapshot, confirm, follow the job."""
    if args.target:
        client_for(360.0).call("backup_configure", **target_args(args, password=True))
    snapshots = client_for(180.0).call("backup_list")["snapshots"]
    if not snapshots:
        print("mailstead: the repository holds no snapshot; nothing to restore", file=sys.stderr)
        return 1
    chosen = snapshots[0] if args.snapshot == "latest" else next(
        (s for s in snapshots if args.snapshot in (s["id"], s["full_id"])), None)
    if chosen is None:
        print(f"mailstead: --snapshot: no snapshot {args.snapshot}; see `mailstead backup list`", file=sys.stderr)
        return 1
    label = f"{chosen['id']} of {chosen['time']} (Mailstead {chosen['version'] or '?'})"
    if not args.yes:
        answer = input(f"Replace this appliance's mail, accounts, keys and settings with snapshot {label}? "
                       "Type 'yes': ")
        if answer.strip().lower() != "yes":
            print("mailstead: nothing was changed", file=sys.stderr)
            return 1
    client = client_for(DEFAULT_TIMEOUT)
    snapshot = chosen["full_id"] or chosen["id"]
    try:  # before setup is finished: as the wizard's restore (the setup token goes when done)
        job = client.call("setup_restore", snapshot=snapshot)
    except AgentError as exc:
        if exc.code != "forbidden":
            raise
        job = client.call("backup_restore", snapshot=snapshot)
    return job_outcome(follow(client, job))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state_dir = Path(os.environ["MAILSTEAD_STATE_DIR"]) if os.environ.get("MAILSTEAD_STATE_DIR") else None
    if args.command == "token":
        return show_token(state_dir)
    if args.command == "setup":
        return show_setup(state_dir)
    try:
        if args.command == "restore":
            return restore(args, lambda t: AgentClient(args.socket, timeout=args.timeout or t))
        op, op_args = request(args)
        timeout = args.timeout or LONG_OPS.get(op, DEFAULT_TIMEOUT)
        client = AgentClient(args.socket, timeout=timeout)
        result = client.call(op, **op_args)
        if op in JOB_OPS:
            return job_outcome(follow(client, result))
    except AgentError as exc:
        print(f"mailstead: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    if op == "backup_configure":
        return print_configured(result)
    if op == "backup_list":
        return print_snapshots(result)
    if args.command == "dns-records" and args.zone:
        print(result.get("zone", ""), end="")
    elif op == "health_run" and not args.json:
        print(format_checks(result), end="")
        return 1 if result["summary"]["status"] == "fail" else 0
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def print_configured(result: dict[str, Any]) -> int:
    target = result.get("target", {})
    print(f"Backups go to {target.get('repository') or target}.")
    if result.get("ssh_public_key"):
        print("\nThe appliance's SSH key (add it to the SFTP user's ~/.ssh/authorized_keys):\n"
              f"  {result['ssh_public_key']}")
    if result.get("recovery_sheet"):
        print("\n" + result["recovery_sheet"])
        print("Print or store this sheet now: the password is not shown again.")
    elif not result.get("created"):
        print("Connected to the existing repository with the given password.")
    return 0


def print_snapshots(result: dict[str, Any]) -> int:
    snaps = result.get("snapshots", [])
    if not snaps:
        print("No snapshots yet: `mailstead backup run` makes one.")
    for snap in snaps:
        size = f"{snap['bytes'] / 1e6:.1f} MB" if snap.get("bytes") else ""
        print(f"{snap['id']}  {snap['time'][:19].replace('T', ' ')}  Mailstead {snap['version'] or '?'}  "
              f"{snap.get('files') or ''} files  {size}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
