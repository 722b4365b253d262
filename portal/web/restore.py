"""The first-boot wizard's other path: "Restore from a backup".

Offered on the first page after the token (the Domain step, while no step is
done) and reachable with the setup session only, until setup is complete:

1. /setup/restore            the backup target (local folder, SFTP, S3) and the
                             recovery sheet's password: the agent's backup_configure
                             opens the existing repository (never makes one). For SFTP
                             the appliance's SSH public key is shown, to add to the
                             server's authorized_keys before trying again.
2. /setup/restore/snapshots  the snapshots, newest first (the newest chosen by default)
3. /setup/restore/confirm    what will happen; "Restore now" starts the agent job
                             setup_restore (portal/setup/privileged.py)
4. /setup/restore/progress   live progress (static/jobs.js polls /setup/restore/status)
5. /setup/restore/done       what came back, whether DNS needs an update (the
                             appliance's detected addresses against the restored
                             public_ipv4/public_ipv6), and the way to sign in.

The restore puts back a state.db that says setup is complete: from then on the
portal is the dashboard, except for steps 4 and 5, which stay open to the setup
session that started the job (portal.web.auth.RESTORE_FOLLOW_UP). The job deletes the
setup token agent-side.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

from flask import Blueprint, current_app, jsonify, redirect, render_template, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from werkzeug.routing import BuildError
from wtforms import Field, PasswordField, RadioField, StringField, TextAreaField
from wtforms.validators import ValidationError

from portal import __version__

from portal.web import state, security, wizard
from portal.agent.client import AgentError
from portal.admin import privileged as admin_ops
from portal.agent import jobs as jobs_ops
from portal.backup import privileged as backup_ops
from portal.setup import privileged as setup_ops

bp = Blueprint("restore", __name__, url_prefix="/setup/restore")

JOB = "setup_restore"
MAX_FIELD = 1000
MAX_KEY = 16000
LIST_TIMEOUT = 150.0     # the agent gives restic 120 s to list the snapshots
CONFIGURE_TIMEOUT = 330.0  # the agent gives restic up to 300 s to open the repository
TRUE_VALUES = {"1", "true", "yes"}
AGENT_DOWN = ("unavailable", "timeout", "bad_response")  # portal.agent.client's own codes

KINDS = [("local", "A folder or disk on this appliance"), ("sftp", "An SFTP server"),
         ("s3", "S3-compatible storage")]
# The form's fields for each kind (the others are not sent to the agent).
KIND_FIELDS = {"local": ("path",), "sftp": ("host", "port", "user", "path", "key"),
               "s3": ("endpoint", "bucket", "path", "region", "access_key_id", "secret_access_key")}
STAGES = (("target", "Backup target"), ("snapshots", "Snapshot"), ("confirm", "Confirm"),
          ("progress", "Restore"), ("done", "Done"))


def setup_complete() -> bool:
    return state.setup_complete()


def login_url() -> str:
    try:
        return url_for("auth.login")
    except BuildError:
        return "/login"


# -- forms ------------------------------------------------------------------------------

def _text(field: Field, limit: int = MAX_FIELD, lines: bool = False) -> None:
    value = field.data or ""
    if len(value) > limit:
        raise ValidationError(f"{field.label.text}: far too long ({len(value)} characters); check what you pasted.")
    allowed = "\n\r\t" if lines else ""
    if any((ord(ch) < 32 and ch not in allowed) or ord(ch) == 127 for ch in value):
        raise ValidationError(f"{field.label.text}: remove the control characters (line breaks, tabs, NUL).")


def _strip(value: str | None) -> str:
    return (value or "").strip()


class TargetForm(FlaskForm):
    target = RadioField("Where are the backups?", choices=KINDS, default="local",
                        description="As on your recovery sheet (the line “Target”).")
    path = StringField(
        "Folder", filters=[_strip],
        description="Folder or disk: the folder on this appliance, e.g. /mnt/backup/mailstead (mount the disk "
                    "first). SFTP: the folder on the server. S3: the prefix inside the bucket (optional).")
    host = StringField("SFTP server", filters=[_strip], description="Its name or address, e.g. backup.example.net.")
    port = StringField("SFTP port", filters=[_strip], description="Leave empty for 22.")
    user = StringField("SFTP user", filters=[_strip])
    key = TextAreaField(
        "SSH private key (optional)", filters=[_strip],
        description="Leave empty: this appliance makes its own key, shown here after the first attempt, to add "
                    "to the user's authorized_keys on the server. Or paste the private key the old appliance used "
                    "(without a passphrase).")
    endpoint = StringField("S3 endpoint", filters=[_strip],
                           description="The service URL, e.g. https://s3.eu-central-1.amazonaws.com.")
    bucket = StringField("S3 bucket", filters=[_strip])
    region = StringField("S3 region (optional)", filters=[_strip])
    access_key_id = StringField("S3 access key ID", filters=[_strip])
    secret_access_key = PasswordField("S3 secret access key")
    password = PasswordField(
        "Password from the recovery sheet",
        description="The line “Password” on the sheet printed when backups were set up (groups of four "
                    "letters and digits). Without it the backups cannot be read.")

    def validate_path(self, field: Field) -> None:
        _text(field)

    def validate_host(self, field: Field) -> None:
        _text(field)

    def validate_port(self, field: Field) -> None:
        _text(field)
        if field.data and not (field.data.isascii() and field.data.isdigit() and 1 <= int(field.data) <= 65535):
            raise ValidationError("SFTP port: a number from 1 to 65535 (SFTP is usually 22).")

    def validate_user(self, field: Field) -> None:
        _text(field)

    def validate_key(self, field: Field) -> None:
        _text(field, MAX_KEY, lines=True)

    def validate_endpoint(self, field: Field) -> None:
        _text(field)

    def validate_bucket(self, field: Field) -> None:
        _text(field)

    def validate_region(self, field: Field) -> None:
        _text(field)

    def validate_access_key_id(self, field: Field) -> None:
        _text(field)

    def validate_secret_access_key(self, field: Field) -> None:
        _text(field)

    def validate_password(self, field: Field) -> None:
        if not (field.data or "").strip():
            raise ValidationError("Enter the password from the recovery sheet.")
        _text(field)

    def agent_args(self) -> dict[str, Any]:
        kind = self.target.data
        args: dict[str, Any] = {"target": kind, "password": self.password.data.strip()}
        for name in KIND_FIELDS[kind]:
            value = self._fields[name].data or ""
            if name == "port":
                args["port"] = int(value) if value else 0
            elif value:
                args[name] = value
        return args


class SnapshotForm(FlaskForm):
    snapshot = RadioField("Snapshot", choices=[])


class StartForm(FlaskForm):
    """The "Restore now" button (CSRF only)."""


# -- the agent's answers on the form ---------------------------------------------------------

def attach_error(form: TargetForm, err: AgentError) -> str | None:
    """Put the agent's message on the form's field that fixes it (the error's field, or the
    one the target's kind uses); returns the message when no field takes it (shown at the
    top of the form)."""
    name, sep, message = err.field or "", bool(err.field), err.message
    kind = form.target.data
    if err.code == "no_repository":
        where = {"local": "the folder (is the backup disk mounted?)",
                 "sftp": "the folder on the SFTP server", "s3": "the bucket and the prefix (Folder)"}[kind]
        name, message = "path", f"There is no backup (restic repository) there: check {where}."
        if kind == "s3":
            name = "bucket"
    elif name == "target" and err.code == "unreachable":
        name = {"sftp": "host", "s3": "endpoint"}.get(kind, "path")
    elif name == "target" and err.code != "invalid":
        return err.message
    if not sep and err.code != "no_repository":
        return err.message
    if name in form._fields and name != "csrf_token" and (name == "target" or name in KIND_FIELDS[kind]
                                                            or name == "password"):
        field = form._fields[name]
        field.errors = [*field.errors, message[:1].upper() + message[1:]]
        return None
    return err.message


def ssh_public_key() -> str | None:
    try:
        return backup_ops.backup_ssh_key().get("ssh_public_key")
    except AgentError:
        return None


def render(template: str, stage: str, code: int = 200, **context: Any) -> ResponseReturnValue:
    """A restore page: the restore's stages instead of the setup steps, and the appliance status."""
    return render_template(template, stages=STAGES, stage=stage, status=wizard.appliance_status(),
                           **context), code


# -- 1. the target --------------------------------------------------------------------------

@bp.route("", methods=["GET", "POST"])
def index() -> ResponseReturnValue:
    form = TargetForm()
    error = None
    status = 200
    pubkey = None
    if form.validate_on_submit():
        try:
            result = backup_ops.backup_configure(**form.agent_args())
        except AgentError as err:
            current_app.logger.info("restore: the backup target was refused (%s)", err.code)
            error = attach_error(form, err)
            # On a field: the owner fixes it (422). Else the agent is not there (503) or the
            # target could not be opened for another reason the message gives (409).
            status = 422 if error is None else 503 if err.code in AGENT_DOWN else 409
        else:
            session["restore_target"] = result.get("target") or {}
            session["restore_ssh_key"] = result.get("ssh_public_key") or ""
            session.pop("restore_snapshot", None)
            security.rotate_csrf()
            return redirect(url_for("restore.snapshots"), code=303)
        if form.target.data == "sftp":
            pubkey = ssh_public_key()
    elif form.is_submitted():
        status = 422
    configured = session.get("restore_target")
    return render("restore/target.html", "target", status, form=form, error=error, ssh_key=pubkey,
                  configured=configured)


# -- 2. the snapshots -----------------------------------------------------------------------

def snapshot_label(s: dict[str, Any]) -> str:
    parts = [when(str(s.get("time", "")))]
    if s.get("host"):
        parts.append(str(s["host"]))
    parts.append(f"Mailstead {s['version']}" if s.get("version") else "version unknown")
    return " · ".join(parts) + f" (snapshot {s.get('id', '')})"


def when(stamp: str) -> str:
    """restic's RFC 3339 time (nanoseconds, any zone) as 'YYYY-MM-DD HH:MM UTC'."""
    base, _, rest = stamp.partition(".")
    zone = rest.lstrip("0123456789") if rest else ""
    try:
        t = dt.datetime.fromisoformat(base + zone.replace("Z", "+00:00"))
    except ValueError:
        return stamp or "unknown time"
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def newer_than_this(version: str) -> bool:
    return bool(version) and version_tuple(version) > version_tuple(__version__)


def listed() -> tuple[list[dict[str, Any]], str | None]:
    try:
        snaps = backup_ops.backup_list().get("snapshots") or []
    except AgentError as err:
        return [], err.message
    for s in snaps:
        s["when"] = when(str(s.get("time", "")))
        s["newer"] = newer_than_this(str(s.get("version", "")))
    return snaps, None


@bp.route("/snapshots", methods=["GET", "POST"])
def snapshots() -> ResponseReturnValue:
    if not session.get("restore_target"):
        return redirect(url_for("restore.index"), code=303)
    snaps, error = listed()
    form = SnapshotForm()
    form.snapshot.choices = [(s["id"], snapshot_label(s)) for s in snaps]
    status = 200 if not error else 409
    if form.validate_on_submit():
        chosen = next(s for s in snaps if s["id"] == form.snapshot.data)
        session["restore_snapshot"] = {k: chosen.get(k) for k in ("id", "time", "when", "version", "host",
                                                                 "newer")}
        return redirect(url_for("restore.confirm"), code=303)
    if form.is_submitted():
        status = 422
        if not form.snapshot.errors and not form.errors:
            form.snapshot.errors = ["Choose a snapshot."]
    elif snaps:
        form.snapshot.data = snaps[0]["id"]  # the newest
    return render("restore/snapshots.html", "snapshots", status, form=form, snaps=snaps, error=error,
                  target=session["restore_target"])


# -- 3. confirm and start -------------------------------------------------------------------

@bp.get("/confirm")
def confirm() -> ResponseReturnValue:
    chosen = session.get("restore_snapshot")
    if not chosen or not session.get("restore_target"):
        return redirect(url_for("restore.snapshots"), code=303)
    return render("restore/confirm.html", "confirm", form=StartForm(), chosen=chosen,
                  target=session["restore_target"], error=None)


@bp.post("/start")
def start() -> ResponseReturnValue:
    form = StartForm()
    chosen = session.get("restore_snapshot")
    if not form.validate_on_submit() or not chosen or not session.get("restore_target"):
        return redirect(url_for("restore.snapshots"), code=303)
    try:
        job = setup_ops.setup_restore(snapshot=str(chosen["id"]))
    except AgentError as err:
        return render("restore/confirm.html", "confirm", 503 if err.code in AGENT_DOWN else 409, form=form,
                      chosen=chosen, target=session["restore_target"], error=err.message)
    session["restore_job"] = job["id"]
    security.rotate_csrf()
    return redirect(url_for("restore.progress"), code=303)


# -- 4. progress ----------------------------------------------------------------------------

def the_job() -> tuple[dict[str, Any] | None, str | None]:
    job_id = session.get("restore_job")
    if not job_id:
        return None, None
    try:
        return jobs_ops.job_status(job_id=str(job_id)), None
    except AgentError as err:
        return None, err.message


@bp.get("/progress")
def progress() -> ResponseReturnValue:
    if not session.get("restore_job"):
        return redirect(url_for("restore.index"), code=303)
    job, error = the_job()
    if job and job["state"] == "done":
        return redirect(url_for("restore.done"), code=303)
    return render("restore/progress.html", "progress", job=job, job_state=job and job["state"], error=error)


@bp.get("/status")
def status() -> ResponseReturnValue:
    """The job as static/jobs.js reads it: {"job": ...}."""
    job, error = the_job()
    if error:
        return jsonify({"job": None, "error": error}), 503
    return jsonify({"job": job})


# -- 5. done --------------------------------------------------------------------------------

def _addresses(values: list[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_address(str(v).strip()))
        except ValueError:
            continue
    return out


def address_notes(settings: dict[str, str], found: dict[str, list[str]] | None) -> list[dict[str, str]]:
    """Per IP version, the restored public address against what this appliance finds on
    its interfaces (pure): [{"version", "restored", "found", "verdict": same|differs|unknown|none}]."""
    notes = []
    for version in ("4", "6"):
        restored = (settings.get(f"public_ipv{version}") or "").strip()
        here = [str(a) for a in _addresses((found or {}).get(f"ipv{version}", []))]
        if not restored and not here:
            continue
        if found is None:
            verdict = "unknown"
        elif not restored:
            verdict = "none"  # no such address in the restored settings, but one here
        elif not here:
            verdict = "unknown"  # nothing found (behind NAT?): the owner must know
        else:
            verdict = "same" if any(str(a) == str(ipaddress.ip_address(restored)) for a in _addresses(here)) \
                else "differs"
        notes.append({"version": version, "restored": restored, "found": ", ".join(here), "verdict": verdict})
    return notes


@bp.get("/done")
def done() -> ResponseReturnValue:
    if not session.get("restore_job"):
        return redirect(url_for("restore.index"), code=303)
    job, error = the_job()
    if job is None:
        return render("restore/done.html", "done", 404, job=None,
                      error=error or "the restore job is gone; start the restore again",
                      complete=setup_complete(), settings={}, notes=[], detect_error=None,
                      login=login_url())
    if job["state"] == "running":
        return redirect(url_for("restore.progress"), code=303)
    complete = setup_complete()
    settings = state.settings()
    notes: list[dict[str, str]] = []
    detect_error = None
    if job["state"] == "done":
        try:
            found: dict[str, list[str]] | None = admin_ops.net_addresses()
        except AgentError as err:
            found, detect_error = None, err.message
        notes = address_notes(settings, found)
    return render("restore/done.html", "done", 200,
                  job=job, error=job.get("error"), complete=complete, settings=settings, notes=notes,
                  detect_error=detect_error, login=login_url(), result=job.get("result") or {})
