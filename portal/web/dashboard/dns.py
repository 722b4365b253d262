"""Dashboard DNS area: the records with the latest check, re-check, push again, zone download
(the same pages as the wizard's DNS step, portal/web/steps/dns.py)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from portal.web.steps.dns import DnsPages
from portal.web.dashboard import Nav, render_dashboard

bp = Blueprint("dashboard_dns", __name__, url_prefix="/admin")
NAV = Nav(40, "DNS", "dashboard_dns.index")


def _render(**context: Any) -> str:
    return render_dashboard("dashboard/dns.html", current=NAV.endpoint, **context)


pages = DnsPages(bp, _render)


@bp.get("/dns")
def index() -> ResponseReturnValue:
    return pages.page()
