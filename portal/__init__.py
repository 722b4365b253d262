"""Mailstead: the appliance's portal (web), privileged agent, domain logic and CLI.

Grouped by process: `portal.web` (unprivileged Flask app), `portal.agent` (the
root daemon, its registry, jobs and scheduler), `portal.core` (the state layout,
safe writes, the error root) and the domain packages (stack, dns, certs,
backup, checks, admin, setup), each with a `privileged` module declaring its
agent operations. Nothing here touches the disk at import time.
"""

from __future__ import annotations

__version__ = "0.1.0"
