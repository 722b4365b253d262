"""`mailstead` command line: talks to the agent like the web process does."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .agent.client import AgentClient, AgentError
from .agent.server import DEFAULT_SOCKET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailstead", description="Mailstead appliance tools")
    parser.add_argument("--socket", default=os.environ.get("MAILSTEAD_AGENT_SOCKET", DEFAULT_SOCKET),
                        help="agent socket (env MAILSTEAD_AGENT_SOCKET; default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="show OS, docker engine and portal versions as JSON")
    args = parser.parse_args(argv)

    try:
        result = AgentClient(args.socket).call(args.command)
    except AgentError as exc:
        print(f"mailstead: {exc.message} ({exc.code})", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
