"""CSRF protection, rate limiter and response security headers."""

from __future__ import annotations

from flask import Flask, current_app, g, request, session
from flask.wrappers import Response
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect

# Pages are self-contained: no inline scripts or styles, no external assets;
# scripts only from /static (progress polling, copy buttons, the password meter).
CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def init_app(app: Flask) -> None:
    CSRFProtect(app)
    # One limiter per app so each app (and each test) has its own counters.
    # The key is the client address as ProxyFix resolved it from nginx's header.
    app.extensions["mailstead.limiter"] = Limiter(get_remote_address, app=app)
    app.after_request(_security_headers)


def limiter(app: Flask | None = None) -> Limiter:
    return (app or current_app).extensions["mailstead.limiter"]


def rotate_csrf() -> None:
    """Forget the session's CSRF token after a state change, so a replayed
    copy of the old form is refused (Flask-WTF tokens are otherwise reusable
    for the whole session)."""
    field = current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token")
    session.pop(field, None)
    g.pop(field, None)


def _security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    # same-origin keeps the Referer that Flask-WTF's HTTPS check needs.
    headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "static":
        headers.setdefault("Cache-Control", "no-store")
    return response
