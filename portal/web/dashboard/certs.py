"""Dashboard Certificates area: status, expiry and renewal, "Renew now" (the cert_issue job)
and the ACME settings (the same pieces as the wizard's step, portal/web/steps/certs.py)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from portal.web.steps.certs import CertPages
from portal.web.dashboard import Nav, render_dashboard

bp = Blueprint("dashboard_certs", __name__, url_prefix="/admin")
NAV = Nav(50, "Certificates", "dashboard_certs.index")


def _render(**context: Any) -> str:
    return render_dashboard("dashboard/certs.html", current=NAV.endpoint, **context)


pages = CertPages(bp, _render)


@bp.get("/certs")
def index() -> ResponseReturnValue:
    return pages.page()
