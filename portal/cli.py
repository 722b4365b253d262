"""`mailstead` command line: calls the agent's operations through their stubs,
as the web process does.

Each command names its operation once (`set_defaults(op=...)`); its arguments are
the options whose names are the operation's parameters, and the operation's
declared secrets are asked at a prompt (or read from stdin with --password-stdin
/ --secret-stdin), never taken from the command line. How long to wait is the
operation's own declaration; a job (deploy, certificate issue, DNS check, backup,
restore, upgrade) is followed with its progress.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portal.admin import privileged as admin_ops
from portal.agent import jobs as jobs_ops
from portal.agent import registry
from portal.agent import scheduler as schedule_ops
from portal.agent.client import DEFAULT_SOCKET, AgentError, use_socket
from portal.agent.registry import Operation
from portal.backup import privileged as backup_ops
from portal.certs import privileged as cert_ops
from portal.checks import privileged as check_ops
from portal.dns import privileged as dns_ops
from portal.setup import privileged as setup_ops
from portal.stack import privileged as stack_ops
from portal.update import privileged as update_ops

SECRET_PROMPTS = {"password": "Password", "new_password": "New password", "old_password": "Current password",
                  "secret": "TSIG secret (base64)"}
CODE_PROMPT = ("To confirm, a fresh code from the administrator's authenticator app (each code works once), "
               "or an unused recovery code")


def read_password(prompt: str, from_stdin: bool) -> str:
    """From stdin (one line) for scripts, else asked twice on the terminal."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"{prompt}: ")
    if getpass.getpass(f"{prompt} (again): ") != first:
        raise SystemExit("mailstead: the two passwords differ; nothing was changed")
    return first


def read_secret(prompt: str, from_stdin: bool) -> str:
    """A secret from stdin (one line), or asked on the terminal; "" when there is none
    to ask (no terminal and nothing on stdin): the caller then names what is missing."""
    if from_stdin:
        return sys.stdin.readline().strip()
    try:
        return getpass.getpass(f"{prompt}: ").strip()
    except EOFError:
        print(file=sys.stderr)
        return ""


def command(commands: Any, name: str, op: Operation | None, help: str,
            build: Callable[[argparse.Namespace], dict[str, Any]] | None = None) -> argparse.ArgumentParser:
    """A subcommand that runs `op` (arguments from its options, or from `build`)."""
    p = commands.add_parser(name, help=help)
    p.set_defaults(op=op, build=build)
    return p


def collect(ns: argparse.Namespace, op: Operation) -> dict[str, Any]:
    """The operation's arguments: options of the same names; secrets asked, never argv
    (a confirmation code only when the agent asks for one: see confirmed)."""
    out = {name: getattr(ns, name) for name in op.params
           if name not in op.secret and getattr(ns, name, None) is not None}
    stdin = bool(getattr(ns, "stdin", False))
    for name in op.params:
        if name in op.secret and name != "totp_code":
            prompt = SECRET_PROMPTS.get(name, name.replace("_", " ").capitalize())
            if name == "old_password":
                out[name] = sys.stdin.readline().rstrip("\n") if stdin else getpass.getpass(f"{prompt}: ")
            elif name in ("password", "new_password"):
                out[name] = read_password(prompt, stdin)
            else:
                out[name] = read_secret(prompt, stdin)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailstead", description="Mailstead appliance tools")
    parser.add_argument("--socket", default=os.environ.get("MAILSTEAD_AGENT_SOCKET", DEFAULT_SOCKET),
                        help="agent socket (env MAILSTEAD_AGENT_SOCKET; default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the agent (default: each operation's own)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = command(commands, "status", check_ops.health_run,
                "run the health checks and print them (exit 1 if one fails)", build=status_args)
    p.add_argument("--versions", action="store_true", help="only show OS, docker engine and portal versions (JSON)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--no-alert", action="store_true", help="do not mail the admin about changes seen by this run")
    command(commands, "schedule-list", schedule_ops.schedule_list, "the maintenance jobs, their schedules and last runs")
    p = command(commands, "schedule-set", schedule_ops.schedule_set, "change a job's schedule (crontab text, or 'default')")
    p.add_argument("job", help="backup, verify, cert_renew, health, dns_check or update")
    p.add_argument("cron", help="e.g. '0 3 * * *' for 03:00 daily (minute hour day month weekday)")
    p = command(commands, "schedule-runs", schedule_ops.schedule_runs, "the latest runs of a job (or of all jobs)")
    p.add_argument("job", nargs="?", default="")
    p.add_argument("--limit", type=int, default=20)
    p = command(commands, "alerts-configure", check_ops.alerts_configure,
                "where alerts go besides the admin's mail, and the DNSBLs")
    p.add_argument("--webhook-url", default="", help="https:// URL that gets a JSON POST per change (empty: none)")
    p.add_argument("--dnsbl-zones", default="", help="blocklist zones, comma separated (empty: the defaults)")
    command(commands, "alerts-test", check_ops.alerts_test, "send a test alert to the admin and the webhook")
    p = command(commands, "alerts-private", check_ops.alerts_private,
                "allow alert webhooks to private or loopback addresses (on), or refuse them again (off)",
                build=lambda ns: {"allow": ns.state == "on"})
    p.add_argument("state", choices=("on", "off"))
    command(commands, "load-images", stack_ops.stack_load_images, "load the preloaded mail stack images into docker")
    command(commands, "deploy", stack_ops.stack_deploy, "render the mail stack from the settings and start it")
    command(commands, "stack-status", stack_ops.stack_status, "state and health of each mail stack service")
    command(commands, "mailbox-list", stack_ops.mailbox_list, "mailboxes and aliases")
    p = command(commands, "mailbox-create", stack_ops.mailbox_create,
                "create a mailbox (password asked, or --password-stdin)")
    p.add_argument("address")
    p.add_argument("--password-stdin", dest="stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--quota-mb", type=int, default=0, help="0 means no limit (default)")
    p = command(commands, "mailbox-reset-password", stack_ops.mailbox_reset_password,
                "set a new password for a forgotten one (mail stored until now becomes unreadable)")
    p.add_argument("address")
    p.add_argument("--password-stdin", dest="stdin", action="store_true", help="read the password from stdin")
    p = command(commands, "mailbox-password", stack_ops.mailbox_password,
                "change a password (old and new on stdin or asked)")
    p.add_argument("address")
    p.add_argument("--password-stdin", dest="stdin", action="store_true", help="read old, then new password from stdin")
    p = command(commands, "mailbox-delete", stack_ops.mailbox_delete, "delete a mailbox and its mail")
    p.add_argument("address")
    p = command(commands, "mailbox-rename", stack_ops.mailbox_rename, "rename a mailbox, keeping its mail")
    p.add_argument("address")
    p.add_argument("new_address")
    for name, op in (("alias-add", stack_ops.alias_add), ("alias-remove", stack_ops.alias_remove)):
        p = command(commands, name, op, f"{name.split('-')[1]} an alias")
        p.add_argument("source", help="an address, or @domain for the domain's catch-all")
        p.add_argument("destination")
    p = command(commands, "dns-records", dns_ops.dns_records, "the DNS records the appliance needs (table, or --zone)")
    p.add_argument("--zone", action="store_true", help="print only the BIND zone fragment")
    p.add_argument("--dnssec", action="store_true", help="include the TLSA record (for a DNSSEC-signed zone)")
    command(commands, "dns-check", dns_ops.dns_check, "ask each authoritative server for every expected record")
    p = command(commands, "dns-push", dns_ops.dns_push, "publish the records by RFC 2136 (see dns-configure-push)")
    p.add_argument("--dry-run", action="store_true", help="only show what would change")
    p = command(commands, "dns-configure-push", dns_ops.dns_configure_push,
                "store the RFC 2136 server and TSIG key (secret asked, or --secret-stdin)")
    p.add_argument("server", help="IP address of the primary DNS server that accepts updates")
    p.add_argument("key_name", help="TSIG key name, e.g. mailstead-key")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--algorithm", default="hmac-sha256", choices=("hmac-sha256", "hmac-sha512"))
    p.add_argument("--secret-stdin", dest="stdin", action="store_true", help="read the base64 TSIG secret from stdin")
    p = command(commands, "net-check", dns_ops.net_check, "reverse DNS of the public addresses and outbound port 25")
    p.add_argument("--smtp-host", default=None, help="SMTP server to greet on port 25 (default: a large public MX)")
    p = command(commands, "acme-configure", cert_ops.acme_configure,
                "choose the certificate authority (ACME) and how to prove the names", build=acme_args)
    p.add_argument("--directory", default="letsencrypt",
                   help="letsencrypt, letsencrypt-staging, or an https:// ACME directory URL")
    p.add_argument("--contact", default="", help="email address the CA writes to about expiry")
    p.add_argument("--challenge", default="http-01", choices=("http-01", "dns-01"))
    p.add_argument("--include-apex", action="store_true", help="also cover the bare domain")
    p.add_argument("--reuse-key", action="store_true", help="keep the key across renewals (for TLSA)")
    p.add_argument("--ca-bundle", default="", help="PEM file to trust for a private CA's directory (its text is sent)")
    p.add_argument("--caa-issuer", default="", help="the CA's CAA domain, for a custom CA")
    command(commands, "cert-issue", cert_ops.cert_issue, "get a certificate from the CA now and install it")
    p = command(commands, "cert-renew", cert_ops.cert_renew, "renew the certificate if due (or --force)")
    p.add_argument("--force", action="store_true")
    command(commands, "cert-status", cert_ops.cert_status, "the certificate in use, its expiry and renewal")
    p = command(commands, "settings-set", None, "store settings (KEY=VALUE ..., each checked; an empty VALUE "
                "removes it)")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p = command(commands, "admin-unlock", admin_ops.admin_unlock,
                "lift the sign-in lockout (all client addresses, or --client)")
    p.add_argument("--client", default="", help="only this client address")
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
    p.add_argument("--secret-stdin", dest="stdin", action="store_true",
                   help="read the S3 secret key (then, for restore, the password) from stdin, one per line")


def add_maintenance_commands(commands: Any) -> None:
    """The maintenance commands: setup, token, backup, restore, upgrade, certs."""
    command(commands, "setup", None, "where and how to finish setup (portal addresses, token, fingerprint)")
    command(commands, "token", None, "print the setup token while setup is unfinished")
    backup = commands.add_parser("backup", help="encrypted backups: configure, run, list, verify")
    sub = backup.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(sub, "configure", backup_ops.backup_configure,
                "choose the target; a new repository prints its recovery sheet once",
                build=lambda ns: target_args(ns, password=ns.existing))
    add_target_arguments(p)
    p.add_argument("--existing", action="store_true",
                   help="connect to an existing repository (its password from the recovery sheet is asked)")
    command(sub, "run", backup_ops.backup_run, "back up now (shows progress)")
    command(sub, "list", backup_ops.backup_list, "the snapshots in the repository, newest first")
    command(sub, "verify", backup_ops.backup_verify, "restore the latest snapshot into a scratch folder and compare it")
    command(sub, "status", backup_ops.backup_state, "the last backup, verification and restore")
    p = command(commands, "restore", None, "bring back mail, accounts, keys and settings from a backup")
    add_target_arguments(p)
    p.add_argument("--snapshot", default="latest", help="snapshot ID from `mailstead backup list` (default latest)")
    p.add_argument("--yes", action="store_true", help="do not ask before replacing this appliance's data")
    p = command(commands, "upgrade", update_ops.update_status,
                "the appliance's version and updates (signed images from the update feed)", build=upgrade_args)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--check", action="store_true", help="read the feed now: is a newer version available?")
    which.add_argument("--now", action="store_true",
                       help="install the newest version now and reboot into it (it rolls back by itself "
                            "when it is not healthy)")
    which.add_argument("--rollback", action="store_true",
                       help="go back to the version that ran before the last update (with the settings "
                            "from before it; mail is kept) and reboot")
    certs = commands.add_parser("certs", help="TLS certificates: status, renew")
    sub = certs.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(sub, "renew", cert_ops.cert_renew, "renew the certificate if due (or --force)")
    p.add_argument("--force", action="store_true")
    command(sub, "status", cert_ops.cert_status, "the certificate in use, its expiry and renewal")


def status_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.versions:
        ns.op = registry.status
        return {}
    return {"alert": not ns.no_alert}


def upgrade_args(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.check:
        ns.op = update_ops.update_check
    elif ns.now:
        ns.op = update_ops.update_install
    elif ns.rollback:
        ns.op = update_ops.update_rollback
    return {}


def acme_args(ns: argparse.Namespace) -> dict[str, Any]:
    out = {"directory": ns.directory, "contact": ns.contact, "challenge": ns.challenge,
           "include_apex": ns.include_apex, "reuse_key": ns.reuse_key, "caa_issuer": ns.caa_issuer}
    if ns.ca_bundle:
        try:  # read here, as the user who runs the command: the agent reads no path it is given
            out["ca_bundle_pem"] = Path(ns.ca_bundle).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise SystemExit(f"mailstead: --ca-bundle: cannot read {ns.ca_bundle}: {exc.strerror}") from None
    return out


def target_args(args: argparse.Namespace, password: bool) -> dict[str, Any]:
    """backup_configure's arguments from --target and friends (secrets asked, never argv)."""
    if not args.target:
        raise SystemExit("mailstead: --target: choose local, sftp or s3")
    from_stdin = bool(getattr(args, "stdin", False))
    out: dict[str, Any] = {"target": args.target, "path": args.path, "host": args.host, "port": args.port,
                           "user": args.user, "endpoint": args.endpoint, "bucket": args.bucket,
                           "region": args.region, "access_key_id": args.access_key_id}
    if args.key_file:
        try:
            out["key"] = Path(args.key_file).read_text()
        except OSError as exc:
            raise SystemExit(f"mailstead: --key-file: cannot read {args.key_file}: {exc.strerror}") from None
    if args.target == "s3":
        out["secret_access_key"] = read_secret("S3 secret access key", from_stdin)
    if password:
        out["password"] = read_secret("Repository password (from the recovery sheet)", from_stdin)
        if not out["password"]:
            raise SystemExit("mailstead: password: give the password printed on the recovery sheet")
    return out


def request(ns: argparse.Namespace) -> tuple[Operation, dict[str, Any]]:
    """The operation and its arguments for the parsed command line."""
    op: Operation | None = getattr(ns, "op", None)
    if op is None:
        raise AssertionError(f"{ns.command} runs no single operation")
    build = getattr(ns, "build", None)
    args = build(ns) if build is not None else collect(ns, op)
    return ns.op, args


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


def follow(job: dict[str, Any], out: Any = None) -> dict[str, Any]:
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
        job = jobs_ops.job_status(job_id=job["id"])


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
    if firstboot.setup_finished(paths):
        print("mailstead: setup is finished and the setup token was deleted; sign in to the dashboard "
              "with the admin account", file=sys.stderr)
        return 1
    try:
        from portal.core import safefs

        print(safefs.read_text(paths.token, 4096).strip())
    except (OSError, UnicodeDecodeError, safefs.UnsafePathError):
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
    done = firstboot.setup_finished(paths)
    token = None
    if not done:
        try:
            from portal.core import safefs

            token = safefs.read_text(paths.token, 4096).strip()
        except (OSError, UnicodeDecodeError, safefs.UnsafePathError):
            token = NO_TOKEN
    print(firstboot.issue_text(socket.gethostname(), firstboot.local_addresses(), token, fp), end="")
    if done:
        print("Setup is finished: the portal is the admin dashboard. `mailstead status` checks the appliance.")
    else:
        print("Open the portal address in a browser and enter the token: the wizard sets up the domain, the\n"
              "admin account, DNS, certificates and the mail stack, or restores a backup (`mailstead restore`\n"
              "does the same here). Check the certificate fingerprint against the browser's.")
    return 0


def restore(args: argparse.Namespace) -> int:
    """mailstead restore: connect to the target (if given), pick the snapshot, confirm, follow the job.
    On a set-up appliance the agent asks for a fresh code for the target and another for
    the restore (each code works once)."""
    from_stdin = bool(getattr(args, "stdin", False))
    if args.target:
        confirmed(backup_ops.backup_configure, target_args(args, password=True), from_stdin)
    snapshots = backup_ops.backup_list()["snapshots"]
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
    snapshot = chosen["full_id"] or chosen["id"]
    try:  # before setup is finished: as the wizard's restore (the setup token goes when done)
        job = setup_ops.setup_restore(snapshot=snapshot)
    except AgentError as exc:
        if exc.code != "forbidden":
            raise
        job = confirmed(backup_ops.backup_restore, {"snapshot": snapshot}, from_stdin)
    return job_outcome(follow(job))


def settings_set(pairs: list[str]) -> int:
    """mailstead settings-set KEY=VALUE ...: each through the agent's checks, in order."""
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"mailstead: {pair[:40]}: write it as KEY=VALUE (an empty VALUE removes the setting)")
        result = setup_ops.settings_set(key=key.strip(), value=value)
        print(f"{result['key']}: " + ("removed" if result.get("removed") else result["value"]))
    return 0


def call(op: Operation, args: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run `op` through its stub (its declared timeout unless --timeout)."""
    if timeout is None:
        return op(**args)
    from portal.agent.client import channel

    return channel(timeout).call(op.name, **args)


def confirmed(op: Operation, args: dict[str, Any], from_stdin: bool, timeout: float | None = None) -> dict[str, Any]:
    """Run `op`; if the agent asks for a confirmation code (a set-up appliance: a
    restore, a change of the backup target), ask for one and run it again with it. The
    console is asked as the web is: the agent keeps one rule for every caller."""
    if "totp_code" not in op.params or args.get("totp_code"):
        return call(op, args, timeout)
    try:
        return call(op, args, timeout)
    except AgentError as exc:
        if exc.field != "totp_code" or exc.code != "invalid":
            raise
    code = read_secret(CODE_PROMPT, from_stdin)
    if not code:
        raise SystemExit("mailstead: totp_code: no code given; nothing was changed")
    return call(op, {**args, "totp_code": code}, timeout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_socket(args.socket)
    state_dir = Path(os.environ["MAILSTEAD_STATE_DIR"]) if os.environ.get("MAILSTEAD_STATE_DIR") else None
    if args.command == "token":
        return show_token(state_dir)
    if args.command == "setup":
        return show_setup(state_dir)
    try:
        if args.command == "restore":
            return restore(args)
        if args.command == "settings-set":
            return settings_set(args.pairs)
        op, op_args = request(args)
        result = confirmed(op, op_args, bool(getattr(args, "stdin", False)), args.timeout)
        if op.job:
            return job_outcome(follow(result))
    except AgentError as exc:
        print(f"mailstead: {exc} ({exc.code})", file=sys.stderr)
        return 1
    if op is backup_ops.backup_configure:
        return print_configured(result)
    if op is backup_ops.backup_list:
        return print_snapshots(result)
    if args.command == "upgrade":
        return print_update(op, result)
    if args.command == "dns-records" and args.zone:
        print(result.get("zone", ""), end="")
    elif op is check_ops.health_run and not args.json:
        print(format_checks(result), end="")
        return 1 if result["summary"]["status"] == "fail" else 0
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def print_update(op: Operation, result: dict[str, Any]) -> int:
    """`mailstead upgrade`: what runs, what the feed offers, what happened (exit 1 when the
    feed could not be read)."""
    if op is update_ops.update_check:
        print(result.get("message", ""))
        for line in (result.get("notes") or {}).get("notes", []) if result.get("available") else []:
            print(f"  {line}")
        return 0 if result.get("ok") else 1
    if op is not update_ops.update_status:
        print(result.get("message", ""))
        return 0
    check = result.get("check") or {}
    window = result.get("window") or {}
    print(f"Running {result['running']} (built {result.get('built') or '?'}).")
    print(f"Feed: {result.get('feed_url') or 'none set'}; automatic updates "
          f"{'on' if result.get('auto') else 'off'}, window {window.get('cron') or '?'} "
          f"({result.get('time_zone') or 'the appliance local time'}), next {window.get('next_run') or '?'}.")
    if check:
        print(f"Last check {check.get('at')}: {check.get('message')}")
    if result.get("pending"):
        pending = result["pending"]
        print(f"Under way: {pending.get('from')} -> {pending.get('to')} since {pending.get('at')}.")
    if result.get("installing"):
        print("An update is being installed now; the appliance reboots when it is written.")
    for entry in (result.get("history") or [])[:10]:
        print(f"  {entry.get('at')}  {entry.get('outcome'):<13} {entry.get('from')} -> {entry.get('to')}: "
              f"{entry.get('message', '')}")
    if result.get("rollback_to"):
        print(f"`mailstead upgrade --rollback` goes back to {result['rollback_to']}.")
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
