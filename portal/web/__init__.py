"""The portal's web process (unprivileged): the app factory, token gate, wizard
steps, dashboard, templates and static files. It never opens the agent's state:
every read and write goes through the agent's operations.

Use :func:`create_app`; nothing here reads configuration or touches the disk
at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

from portal import __version__


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the portal app. `config` overrides defaults and environment."""
    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from portal.web import config as config_mod, errors, security, wizard
    from portal.web import jobs as agentweb
    from portal.web import auth, password
    from portal.web.token import bp as setup_bp, register_rate_limit
    from portal.web.restore import bp as restore_bp
    from portal.web.dashboard import area_modules
    from portal.web.steps import step_modules

    app = Flask(__name__)
    app.config.update(config_mod.build(config))
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = config_mod.load_or_create_secret_key(
            app.config["SECRET_KEY_FILE"]
        )

    # nginx terminates TLS in front of gunicorn and sets X-Forwarded-For/-Proto.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1)  # type: ignore[method-assign]

    security.init_app(app)
    errors.init_app(app)

    app.register_blueprint(setup_bp)
    app.register_blueprint(wizard.bp)
    app.register_blueprint(restore_bp)  # the wizard's "Restore from a backup"
    app.register_blueprint(agentweb.bp)
    for module in step_modules() + area_modules():
        app.register_blueprint(module.bp)
    register_rate_limit(app)
    password.init_app(app)  # the mail users' own password page
    auth.init_app(app)  # the admin session gate (replaces the wizard's hook after setup)

    @app.get("/healthz")
    def healthz() -> tuple[str, int, dict[str, str]]:
        return "ok\n", 200, {"Content-Type": "text/plain; charset=utf-8"}

    @app.context_processor
    def inject_version() -> dict[str, str]:
        return {"portal_version": __version__}

    return app
