"""Token gate: the setup token from the console unlocks the first-boot wizard."""

from __future__ import annotations

import logging

from flask import Blueprint, Flask, redirect, render_template, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import StringField

from portal.agent.client import AgentError
from portal.setup import privileged as setup_ops
from portal.web import security, state
from portal.web.errors import error_page

log = logging.getLogger(__name__)

bp = Blueprint("setup", __name__, url_prefix="/setup")

WRONG_TOKEN = (
    "That setup token is not right. Copy it exactly from the appliance console "
    "(the line “Setup token: …”), or run “mailstead token” as root "
    "on the appliance, and try again."
)
class TokenForm(FlaskForm):
    token = StringField("Setup token")


def setup_complete() -> bool:
    return state.setup_complete()


@bp.route("/token", methods=["GET", "POST"])
def token() -> ResponseReturnValue:
    if setup_complete():
        return render_template("setup/finished.html")
    form = TokenForm()
    # CSRFProtect has already checked a posted form's CSRF token. The agent compares the
    # token (the web process cannot read the token file); an empty one only asks whether
    # a token exists yet, so the page can say that the console has none to show.
    given = (form.token.data or "")[:1000] if form.is_submitted() else ""
    try:
        matches = setup_ops.setup_token_check(token=given)["ok"]
    except AgentError as exc:
        if exc.code == "finished":
            return render_template("setup/finished.html")
        if exc.code == "no_token":
            return error_page(503, "Setup token not generated yet", exc.message)
        raise
    if not form.is_submitted():
        if session.get("setup"):
            return redirect(url_for("wizard.index"))
        return render_template("setup/token.html", form=form)
    if not matches:
        log.warning("wrong setup token submitted")
        return render_template("setup/token.html", form=form, error=WRONG_TOKEN), 403

    session.clear()
    session["setup"] = True
    session.permanent = True
    security.rotate_csrf()
    log.info("setup token accepted; wizard unlocked")
    return redirect(url_for("wizard.index"))


def register_rate_limit(app: Flask) -> None:
    """At most TOKEN_RATE_LIMIT token POSTs per client address."""
    security.limiter(app).limit(app.config["TOKEN_RATE_LIMIT"], methods=["POST"])(bp)
