"""Administrator sign-in and the gate in front of every page.

Before setup is complete (setting setup_complete), the wizard's token gate
applies (portal.web.wizard.route_to_next_step). Afterwards every page except
PUBLIC_AFTER_SETUP needs an admin session: session["admin"] (the address),
session["auth_at"] and session["seen"] (epoch seconds); a session idle for
IDLE_TIMEOUT or older than ABSOLUTE_TIMEOUT ends. The wizard's pages then lead
to the dashboard. Passwords and codes are checked by the agent (admin_login),
which also keeps the lockout backoff; this module adds a per-client rate limit.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from flask import (Blueprint, Flask, current_app, flash, get_flashed_messages, jsonify, redirect,
                   render_template, request, session, url_for)
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import BooleanField, PasswordField, StringField
from wtforms.validators import ValidationError

from portal.web import state, security, wizard
from portal.agent.client import AgentError
from portal.admin import privileged as admin_ops

IDLE_TIMEOUT = 15 * 60
ABSOLUTE_TIMEOUT = 8 * 60 * 60
LOGIN_RATE_LIMIT = "10 per minute"
DASHBOARD_HOME = "dashboard.home"
FALLBACK_HOME = "auth.login"  # shows "signed in as …" while the dashboard has no home page

# Reachable without an admin session once setup is complete (setup.token then says so;
# password.change is the mail users' own page, which asks for the current password).
PUBLIC_AFTER_SETUP = frozenset({"static", "healthz", "auth.login", "setup.token", "password.change"})
# Answered with 401 JSON instead of a redirect (polled by static/jobs.js).
JSON_BLUEPRINTS = frozenset({"jobs"})
# The wizard's restore (portal/web/restore.py) puts back a state that says setup is
# complete while the owner still watches it: its progress and outcome stay open to the
# setup session that started it (nothing else does; its forms are refused).
RESTORE_FOLLOW_UP = frozenset({"restore.progress", "restore.status", "restore.done"})
TRUE_VALUES = {"1", "true", "yes"}

bp = Blueprint("auth", __name__)


def setup_complete() -> bool:
    return state.setup_complete()


def now() -> float:
    return time.time()


def session_problem(t: float) -> str | None:
    """Why the current session is not a valid admin session (None if it is)."""
    if not session.get("admin"):
        return "Sign in to continue."
    if not state.session_valid():
        return "You were signed out (on this or another device); sign in again."
    try:
        auth_at, seen = float(session.get("auth_at", 0)), float(session.get("seen", 0))
    except (TypeError, ValueError):
        return "Sign in to continue."
    if t - auth_at > ABSOLUTE_TIMEOUT:
        return "Your session ended after 8 hours; sign in again."
    if t - seen > IDLE_TIMEOUT:
        return "Your session ended after 15 minutes without activity; sign in again."
    return None


def safe_next(target: str | None) -> str | None:
    """`target` if it is a path on this site (never another host), else None."""
    if not target or len(target) > 2000 or any(ord(c) < 32 or c == "\\" for c in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


def home_url() -> str:
    endpoint = DASHBOARD_HOME if DASHBOARD_HOME in current_app.view_functions else FALLBACK_HOME
    return url_for(endpoint)


def wizard_endpoints() -> frozenset[str]:
    """Endpoints that belong to the wizard (its steps' blueprints and the wizard's own)."""
    cached = current_app.extensions.get("mailstead.wizard_endpoints")
    if cached is None:
        from portal.web.steps import step_modules

        blueprints = {"wizard", "restore"} | {m.bp.name for m in step_modules()}
        cached = frozenset(e for e in current_app.view_functions if e.partition(".")[0] in blueprints)
        current_app.extensions["mailstead.wizard_endpoints"] = cached
    return cached


def gate() -> ResponseReturnValue | None:
    """The one before_request hook: the wizard's token gate until setup is complete,
    then the admin session gate."""
    endpoint = request.endpoint
    if endpoint is None or endpoint in ("static", "healthz"):
        return None  # no state.db for static files, health checks, 404s
    if not setup_complete():
        if endpoint == "auth.login":
            return None  # says that setup is not finished
        return wizard.route_to_next_step()
    if endpoint in PUBLIC_AFTER_SETUP:
        return None
    if endpoint in RESTORE_FOLLOW_UP and session.get("setup") and session.get("restore_job"):
        return None
    t = now()
    problem = session_problem(t)
    if problem is not None:
        had_session = bool(session.get("admin"))
        session.clear()
        if had_session:
            flash(problem, "info")
        if request.blueprint in JSON_BLUEPRINTS:
            return jsonify({"error": problem, "login": url_for("auth.login")}), 401
        target = request.full_path.rstrip("?") if request.method == "GET" else request.path
        return redirect(url_for("auth.login", next=target), code=303 if request.method != "GET" else 302)
    session["seen"] = t
    if endpoint in wizard_endpoints():
        return redirect(home_url(), code=303 if request.method != "GET" else 302)
    return None


def init_app(app: Flask) -> None:
    """Register the sign-in pages and put `gate` in place of the wizard's hook
    (call after the wizard blueprint is registered)."""
    app.register_blueprint(bp)
    funcs = app.before_request_funcs.setdefault(None, [])
    if wizard.route_to_next_step not in funcs:
        raise RuntimeError("auth.init_app: register the wizard blueprint first")
    funcs[funcs.index(wizard.route_to_next_step)] = gate
    security.limiter(app).limit(app.config.get("LOGIN_RATE_LIMIT", LOGIN_RATE_LIMIT), methods=["POST"])(bp)


# -- pages -------------------------------------------------------------------------------

class LoginForm(FlaskForm):
    address = StringField("Administrator address",
                          description="The address you chose in the setup wizard, e.g. postmaster@example.org.")
    password = PasswordField("Password")
    code = StringField("Authenticator code",
                       description="The 6-digit code from your authenticator app, or one of your "
                                   "recovery codes (each works once).")

    def validate_address(self, field: StringField) -> None:
        field.data = (field.data or "").strip()
        if not field.data:
            raise ValidationError("Enter the administrator's address.")
        if len(field.data) > 254 or "@" not in field.data:
            raise ValidationError("Enter the address as name@domain, e.g. postmaster@example.org.")

    def validate_password(self, field: PasswordField) -> None:
        if not field.data:
            raise ValidationError("Enter your password.")
        if len(field.data) > 1024:
            raise ValidationError("That password is too long to be yours (at most 1024 characters).")

    def validate_code(self, field: StringField) -> None:
        field.data = "".join((field.data or "").split())
        if not field.data:
            raise ValidationError("Enter the 6-digit code from your authenticator app, or a recovery code.")
        if len(field.data) > 64 or not field.data.replace("-", "").isalnum() or not field.data.isascii():
            raise ValidationError("A code is 6 digits, or a recovery code like ABCD-EFGH-JKLM-NPQR.")


class LogoutForm(FlaskForm):
    everywhere = BooleanField("Sign out everywhere (every browser and device)")


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if not setup_complete():
        return render_template("auth/not_ready.html")
    next_url = safe_next(request.args.get("next"))
    if not session_problem(now()):
        if request.method == "GET":
            if DASHBOARD_HOME in current_app.view_functions:
                return redirect(next_url or url_for(DASHBOARD_HOME))
            return render_template("auth/signed_in.html", address=session["admin"], logout=LogoutForm())
    form = LoginForm()
    error = None
    status = 200
    if form.validate_on_submit():
        try:
            result = admin_ops.admin_login(address=form.address.data, password=form.password.data,
                                           code=form.code.data, client=request.remote_addr or "")
        except AgentError as err:
            current_app.logger.warning("admin sign-in refused (%s)", err.code)
            error = err.message
            status = 429 if err.code == "locked" else 403 if err.code == "denied" else 503
            if err.code not in ("locked", "denied", "not_configured"):
                error = f"Sign-in is not possible right now: {err.message}"
        else:
            session.clear()
            security.rotate_csrf()
            t = now()
            session["admin"] = result["address"]
            session["sid"] = result["session"]
            state.forget()
            session["auth_at"] = t
            session["seen"] = t
            session.permanent = True
            if result.get("used_recovery_code"):
                flash(f"You signed in with a recovery code; {result.get('recovery_codes_left', 0)} "
                      "are left. Each works once.", "warning")
            return redirect(next_url or home_url(), code=303)
    messages = get_flashed_messages(with_categories=True)
    return render_template("auth/login.html", form=form, error=error, messages=messages,
                           next_url=next_url), status


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    # CSRFProtect has checked the token; the gate has checked the session.
    form = LogoutForm()
    everywhere = bool(form.everywhere.data)
    try:  # ended on the server too: a copy of the cookie no longer works
        admin_ops.admin_logout(session=str(session.get("sid") or ""), everywhere=everywhere)
    except AgentError as err:
        current_app.logger.warning("sign-out: the agent did not answer (%s)", err.code)
    session.clear()
    security.rotate_csrf()
    flash("You are signed out everywhere." if everywhere else "You are signed out.", "info")
    return redirect(url_for("auth.login"), code=303)
