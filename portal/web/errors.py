"""Error pages: every failure a person can cause gets a page that says what to do."""

from __future__ import annotations

from flask import Flask, render_template
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, InternalServerError

CSRF_MESSAGE = "The form expired or was submitted twice; reload the page and try again."
RATE_LIMIT_MESSAGE = (
    "Too many attempts from your address. Wait a minute, then try again. "
    "The setup token is shown on the appliance console."
)

MESSAGES: dict[int, tuple[str, str]] = {
    400: ("Bad request", "The request could not be understood. Reload the page and try again."),
    404: ("Page not found", "There is no page at this address. Start again from the home page."),
    405: ("Method not allowed", "This page cannot be used that way. Start again from the home page."),
    413: ("Request too large", "The submitted form is too large. Shorten the input and try again."),
    500: ("Something went wrong", "The portal hit an internal error. Reload the page; "
          "if it keeps happening, check “journalctl -u mailstead-web” on the appliance."),
}


def error_page(status: int, title: str, message: str, detail: str | None = None) -> tuple[str, int]:
    return render_template(
        "errors/error.html", status=status, title=title, message=message, detail=detail
    ), status


AGENT_DOWN = ("The appliance's agent (mailstead-agent) does not answer, so this page cannot be shown. "
              "Wait a minute and reload; if it keeps happening, check “systemctl status mailstead-agent” "
              "on the appliance.")


def init_app(app: Flask) -> None:
    from portal.agent.client import AgentError

    @app.errorhandler(AgentError)
    def agent_error(exc: AgentError) -> tuple[str, int]:
        # A page that did not expect the agent to fail (the portal's state is the agent's).
        app.logger.warning("agent call failed: %s (%s)", exc.code, exc.message)
        if exc.code in ("unavailable", "timeout", "bad_response"):
            return error_page(503, "The appliance is not answering", AGENT_DOWN, exc.message)
        return error_page(500, *MESSAGES[500])

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError) -> tuple[str, int]:
        return error_page(400, "Form expired", CSRF_MESSAGE, exc.description)

    @app.errorhandler(429)
    def too_many(_exc: HTTPException) -> tuple[str, int]:
        # Flask-Limiter adds Retry-After (RATELIMIT_HEADERS_ENABLED).
        return error_page(429, "Too many attempts", RATE_LIMIT_MESSAGE)

    @app.errorhandler(InternalServerError)
    def internal(_exc: InternalServerError) -> tuple[str, int]:
        # Flask has already logged the traceback.
        return error_page(500, *MESSAGES[500])

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[str, int] | HTTPException:
        status = exc.code or 500
        if status not in MESSAGES:
            return exc
        return error_page(status, *MESSAGES[status])
