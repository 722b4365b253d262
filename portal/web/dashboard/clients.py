"""Dashboard: Client setup, the same page as at the end of the wizard (portal/web/clientsetup.py)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, url_for
from flask.typing import ResponseReturnValue

from portal.web import clientsetup
from portal.web.dashboard import Nav, render_dashboard

bp = Blueprint("clients", __name__, url_prefix="/admin/clients")
NAV = Nav(60, "Client setup", "clients.index")


def _page(status: int = 200, **context: Any) -> ResponseReturnValue:
    ctx = clientsetup.page_context(**context)
    if ctx["client"] is None:
        status = 409
    return render_dashboard("dashboard/clients.html", current=NAV.endpoint,
                            urls={"test": url_for("clients.test_message"),
                                  "profile": url_for("clients.profile")}, **ctx), status


@bp.get("/")
def index() -> ResponseReturnValue:
    return _page()


@bp.post("/test")
def test_message() -> ResponseReturnValue:
    form = clientsetup.SendTestForm()
    sent, error = clientsetup.send_test(form)
    status = 200 if sent else (422 if form.errors else (502 if error else 200))
    return _page(status, test_form=form, sent=sent, test_error=error)


@bp.get("/profile.mobileconfig")
def profile() -> ResponseReturnValue:
    if not clientsetup.page_context()["client"]:
        return _page()
    response, form = clientsetup.profile_download()
    if response is None:
        return _page(422, profile_form=form)
    return response
