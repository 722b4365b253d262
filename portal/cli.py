"""`mailstead` command line: talks to the agent like the web process does."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from .agent.client import AgentClient, AgentError
from .agent.server import DEFAULT_SOCKET


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
                        help="seconds to wait for the agent (default: 10, or 900 for load-images and deploy)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="show OS, docker engine and portal versions as JSON")
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
    return parser


def request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The agent operation and arguments for the parsed command line."""
    cmd = args.command
    simple = {"status": "status", "load-images": "stack_load_images", "deploy": "stack_deploy",
              "stack-status": "stack_status", "mailbox-list": "mailbox_list"}
    if cmd in simple:
        return simple[cmd], {}
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
    if cmd in ("alias-add", "alias-remove"):
        return cmd.replace("-", "_"), {"source": args.source, "destination": args.destination}
    raise AssertionError(cmd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    op, op_args = request(args)
    timeout = args.timeout or (900.0 if op in ("stack_load_images", "stack_deploy") else 10.0)
    try:
        result = AgentClient(args.socket, timeout=timeout).call(op, **op_args)
    except AgentError as exc:
        print(f"mailstead: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
