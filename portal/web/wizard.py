"""First-boot wizard: steps are data; one hook sends the browser to the next unfinished step."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, current_app, g, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue

from portal.web import state
from portal.agent.client import AgentError
from portal.agent import registry


@dataclass(frozen=True)
class Step:
    id: str
    endpoint: str
    order: int
    title: str


# Every module in portal/web/steps declares its STEP; found on first use (the step
# modules import this one, so not at import time).
STEPS: tuple[Step, ...] = ()


def all_steps() -> tuple[Step, ...]:
    global STEPS
    if not STEPS:
        from portal.web.steps import step_modules

        STEPS = tuple(m.STEP for m in step_modules())
    return STEPS



# Reachable without the setup session.
PUBLIC_ENDPOINTS = frozenset({"static", "setup.token", "healthz"})
INDEX = "wizard.index"
PENDING = "wizard.pending"  # shown once every step so far is done

bp = Blueprint("wizard", __name__)


def ordered(steps: Sequence[Step]) -> list[Step]:
    return sorted(steps, key=lambda s: s.order)


def next_unfinished(steps: Sequence[Step], done: Collection[str]) -> Step | None:
    return next((s for s in ordered(steps) if s.id not in done), None)


def redirect_target(
    endpoint: str | None, has_session: bool, steps: Sequence[Step], done: Collection[str]
) -> str | None:
    """The endpoint to send this request to instead, or None to let it through."""
    if endpoint is None or endpoint in PUBLIC_ENDPOINTS:
        return None
    if not has_session:
        return "setup.token"
    nxt = next_unfinished(steps, done)
    if endpoint == INDEX:
        return nxt.endpoint if nxt else PENDING
    if endpoint == PENDING:
        return nxt.endpoint if nxt else None
    # A step's page, or else any page of its blueprint (sub-pages such as admin.saved).
    blueprint = endpoint.partition(".")[0]
    step = next((s for s in steps if s.endpoint == endpoint), None) or next(
        (s for s in steps if s.endpoint.partition(".")[0] == blueprint), None)
    if step and nxt and step.order > nxt.order:
        return nxt.endpoint
    return None


@bp.before_app_request
def route_to_next_step() -> ResponseReturnValue | None:
    endpoint = request.endpoint
    if endpoint is None or endpoint in PUBLIC_ENDPOINTS:
        return None  # don't touch state.db for static files, health checks, 404s
    has_session = bool(session.get("setup"))
    done = state.done_steps() if has_session else set()
    target = redirect_target(endpoint, has_session, all_steps(), done)
    if target is None or target == endpoint:
        return None
    return redirect(url_for(target), code=303 if request.method == "POST" else 302)


@bp.get("/")
def index() -> ResponseReturnValue:
    # The hook above always redirects from here.
    return redirect(url_for("setup.token"))


@bp.get("/setup/next")
def pending() -> ResponseReturnValue:
    return render_wizard("wizard/pending.html", current=None, settings=state.settings())


def render_wizard(template: str, current: Step | None, **context: Any) -> str:
    """Render a wizard page with the step list and the appliance status."""
    done = state.done_steps()
    return render_template(
        template,
        steps=ordered(all_steps()),
        done=done,
        current=current,
        status=appliance_status(),
        **context,
    )


STATUS_TTL = 10.0  # seconds a good answer is reused: versions change only with an upgrade


def appliance_status() -> dict[str, str]:
    """What the agent reports, or a note that it is unavailable (never an exception).
    A good answer is kept for STATUS_TTL seconds per process (it is on every wizard
    page; asking each time costs an agent and a docker round trip); a failure is not."""
    if "appliance_status" not in g:
        cache = current_app.extensions.setdefault("mailstead.status", {})
        if cache and time.monotonic() - cache["at"] < STATUS_TTL:
            g.appliance_status = cache["value"]
            return g.appliance_status
        try:
            result = registry.status()
            g.appliance_status = {k: str(result.get(k, "unknown")) for k in ("os", "docker", "portal")}
            if not g.appliance_status["docker"].startswith(("unavailable", "busy")):
                cache.update(at=time.monotonic(), value=g.appliance_status)
        except AgentError as exc:
            current_app.logger.warning("agent status failed: %s", exc)
            g.appliance_status = {"error": f"agent unavailable ({exc.message})"}
            cache.clear()
    return g.appliance_status


def step(step_id: str) -> Step:
    return next(s for s in all_steps() if s.id == step_id)

