"""Token gate: the setup token from the console unlocks the first-boot wizard."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from flask import Blueprint, Flask, current_app, redirect, render_template, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import StringField

from portal.web import db, security
from portal.web.errors import error_page

log = logging.getLogger(__name__)

bp = Blueprint("setup", __name__, url_prefix="/setup")

WRONG_TOKEN = (
    "That setup token is not right. Copy it exactly from the appliance console "
    "(the line “Setup token: …”), or run “cat /var/lib/mailstead/setup-token” as root "
    "on the appliance, and try again."
)
NO_TOKEN_FILE = (
    "The setup token has not been generated yet: mailstead-firstboot has not run. "
    "Wait for the appliance to finish booting, or run “systemctl start mailstead-firstboot” "
    "as root on the appliance, then reload this page."
)
UNREADABLE_TOKEN_FILE = (
    "The portal cannot read the setup token file. As root on the appliance, "
    "check that {path} is owned by root, group mailstead, mode 0440."
)

TRUE_VALUES = {"1", "true", "yes"}


class TokenForm(FlaskForm):
    token = StringField("Setup token")


class TokenFileError(Exception):
    """The token file is missing or unreadable; `message` says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def read_token(path: str | Path) -> str:
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise TokenFileError(NO_TOKEN_FILE) from None
    except (OSError, UnicodeDecodeError):  # permissions, a directory, bad bytes
        log.error("cannot read setup token file %s", path)
        raise TokenFileError(UNREADABLE_TOKEN_FILE.format(path=path)) from None
    if not token:
        raise TokenFileError(NO_TOKEN_FILE)
    return token


def token_matches(submitted: str | None, expected: str) -> bool:
    """Constant-time comparison; surrounding whitespace from copy-paste is ignored."""
    given = (submitted or "").strip().encode("utf-8")
    return hmac.compare_digest(given, expected.encode("utf-8"))


def setup_complete() -> bool:
    return (db.get_setting("setup_complete") or "").lower() in TRUE_VALUES


@bp.route("/token", methods=["GET", "POST"])
def token() -> ResponseReturnValue:
    if setup_complete():
        return render_template("setup/finished.html")
    try:
        expected = read_token(current_app.config["TOKEN_PATH"])
    except TokenFileError as exc:
        return error_page(503, "Setup token not generated yet", exc.message)

    form = TokenForm()
    if not form.is_submitted():
        if session.get("setup"):
            return redirect(url_for("wizard.index"))
        return render_template("setup/token.html", form=form)

    # CSRFProtect has already checked the form's CSRF token.
    if not token_matches(form.token.data, expected):
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
