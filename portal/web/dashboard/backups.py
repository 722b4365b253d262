"""Dashboard Backups area: the target (a local folder or disk, SFTP, S3), the last
backup, verification and restore, "Back up now" and "Verify now" with live progress,
the snapshots, and restoring one of them behind an explicit confirmation.

A change of the target and a restore each ask for a fresh code of the administrator
(the authenticator's current code, never one used before, sign-in included; or an
unused recovery code): the agent checks it (`totp_code`) and says so on that field.

Agent operations: backup_target, backup_state, backup_list, backup_configure (a new
repository's recovery sheet is in its answer: shown once, in the answer to the form,
never stored by the portal), and the jobs backup_run, backup_verify (started through
the jobs blueprint, as jobs.js does, or the forms here without JavaScript) and
backup_restore (started by the backup_restore operation with the chosen snapshot).
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, flash, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import BooleanField, Field, PasswordField, RadioField, SelectField, StringField, SubmitField, TextAreaField
from wtforms.validators import ValidationError

from portal.web import security
from portal.web.jobs import show_error
from portal.agent.client import AgentError
from portal.web.steps.dns import job_status_json, latest_job, start_job
from portal.web.dashboard import Nav, render_dashboard
from portal.backup import privileged as backup_ops

bp = Blueprint("backups", __name__, url_prefix="/admin/backups")
NAV = Nav(64, "Backups", "backups.index")

KINDS = ("backup_run", "backup_verify", "backup_restore")
TARGETS = [("local", "A folder or disk on this machine"), ("sftp", "An SFTP server"),
           ("s3", "S3-compatible storage")]
SNAPSHOT_RE = re.compile(r"^(latest|[0-9a-f]{4,64})$")
PUBKEY_RE = re.compile(r"(ssh-[a-z0-9-]+ [A-Za-z0-9+/=]+(?: [^\s)]+)?)")
CONFIGURE_TIMEOUT = 240.0  # creating a repository: the SFTP login (30 s) and restic init (up to ~1 min)
LIST_TIMEOUT = 130.0  # the agent's own limit for listing is 120 s
MAX_KEY = 16 * 1024


CODE_HELP = ("The 6-digit code your authenticator app shows now, or an unused recovery code. Each code works "
             "once: if you just used one to sign in, wait for the next.")


def strip(value: str | None) -> str:
    return (value or "").strip()


def code_text(form: FlaskForm, field: Field) -> None:
    """A code's shape; whether one is needed (a set-up appliance) and right is the
    agent's to say, on this field."""
    field.data = "".join((field.data or "").split())
    if field.data and (len(field.data) > 64 or not field.data.replace("-", "").isalnum() or not field.data.isascii()):
        raise ValidationError("A code is 6 digits, or a recovery code like ABCD-EFGH-JKLM-NPQR.")


def one_line(limit: int) -> Any:
    def check(form: FlaskForm, field: Field) -> None:
        value = field.data or ""
        if len(value) > limit:
            raise ValidationError(f"{field.label.text} is too long (at most {limit} characters).")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValidationError(f"{field.label.text} cannot contain control characters (such as tabs or "
                                  "line breaks).")
    return check


class TargetForm(FlaskForm):
    target = RadioField("Where the backups go", choices=TARGETS, default="local", validate_choice=False)
    path = StringField("Folder", filters=[strip], validators=[one_line(1000)],
                       description="A folder on this machine (or the disk mounted there), e.g. /mnt/backup/mailstead; "
                                   "for SFTP the folder on the server, e.g. /srv/backup/mailstead; for S3 an "
                                   "optional prefix inside the bucket.")
    host = StringField("SFTP server", filters=[strip], validators=[one_line(253)],
                       description="Its name or address, e.g. backup.example.net.")
    port = StringField("SFTP port", filters=[strip], default="22", validators=[one_line(5)])
    user = StringField("SFTP user", filters=[strip], validators=[one_line(32)])
    key = TextAreaField("SFTP private key (optional)",
                        description="Only if the server already trusts a key of yours: paste the whole private key "
                                    "(without a passphrase). Otherwise the appliance makes its own and shows the "
                                    "public key to add to the server's authorized_keys.")
    endpoint = StringField("S3 endpoint URL", filters=[strip], validators=[one_line(500)],
                           description="e.g. https://s3.eu-central-1.amazonaws.com")
    bucket = StringField("S3 bucket", filters=[strip], validators=[one_line(63)])
    region = StringField("S3 region (optional)", filters=[strip], validators=[one_line(40)])
    access_key_id = StringField("S3 access key ID", filters=[strip], validators=[one_line(200)])
    secret_access_key = PasswordField("S3 secret access key", filters=[strip], validators=[one_line(200)],
                                      description="Stored by the appliance in a file only it can read.")
    password = PasswordField("Repository password (only to use an existing backup)", filters=[strip],
                             validators=[one_line(200)],
                             description="Leave it empty to start a new backup repository: a password is made "
                                         "and shown once on a recovery sheet. To use backups made earlier (e.g. "
                                         "by this appliance before it was reinstalled), enter the password from "
                                         "their recovery sheet.")
    totp_code = StringField("Code to confirm", validators=[code_text], description=CODE_HELP, id="target_totp_code")
    save_target = SubmitField("Save the backup target")

    def validate_target(self, field: Field) -> None:
        if field.data not in dict(TARGETS):
            raise ValidationError("Choose a folder or disk, an SFTP server or S3-compatible storage.")

    def validate_port(self, field: Field) -> None:
        if self.target.data == "sftp" and field.data and not (field.data.isdigit() and 1 <= int(field.data) <= 65535):
            raise ValidationError("SFTP port must be a number from 1 to 65535 (usually 22).")

    def validate_key(self, field: Field) -> None:
        value = field.data or ""
        if len(value) > MAX_KEY:
            raise ValidationError(f"The key is longer than {MAX_KEY // 1024} KiB; paste only the private key.")
        if "\x00" in value:
            raise ValidationError("The key cannot contain NUL characters; paste it as text.")


class RestoreForm(FlaskForm):
    snapshot = SelectField("Snapshot", validate_choice=False, filters=[strip])
    confirm = BooleanField("I understand: the mail, accounts, keys, certificates and settings of this appliance "
                           "are replaced by those in the snapshot; anything newer is lost")
    totp_code = StringField("Code to confirm", validators=[code_text], description=CODE_HELP, id="restore_totp_code")
    restore = SubmitField("Restore this snapshot")

    def validate_snapshot(self, field: Field) -> None:
        if not SNAPSHOT_RE.match(field.data or ""):
            raise ValidationError("Choose a snapshot from the list.")

    def validate_confirm(self, field: Field) -> None:
        if not field.data:
            raise ValidationError("Tick the box to confirm the restore; nothing was changed.")


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def state() -> dict[str, Any]:
    """The target, the last runs, the snapshots and the jobs, each with its own error."""
    out: dict[str, Any] = {"target": None, "target_error": None, "last": {}, "last_error": None,
                           "snapshots": [], "snapshots_error": None, "jobs": {}, "job_errors": {}}
    try:
        out["target"] = backup_ops.backup_target().get("target")
        out["last"] = backup_ops.backup_state()
    except AgentError as err:
        out["target_error"] = err.message
        return out
    if out["target"]:
        try:
            snaps = backup_ops.backup_list().get("snapshots") or []
            out["snapshots"] = [{**s, "size": size(s.get("bytes")), "when": str(s.get("time", ""))[:19].replace("T", " ")}
                                for s in snaps]
        except AgentError as err:
            out["snapshots_error"] = err.message
    for kind in KINDS:
        job, error = latest_job(kind)
        out["jobs"][kind] = job
        out["job_errors"][kind] = error
    return out


def target_form(target: dict[str, Any] | None) -> TargetForm:
    form = TargetForm(formdata=None)
    if target:
        form.target.data = target.get("kind", "local")
        for name in ("path", "host", "user", "endpoint", "bucket", "region"):
            form[name].data = str(target.get(name, "") or "")
        form.port.data = str(target.get("port") or 22)
    return form


def restore_form(snapshots: list[dict[str, Any]], given: RestoreForm | None = None) -> RestoreForm:
    form = given or RestoreForm(formdata=None)
    form.snapshot.choices = [(s["id"], f"{s['id']} — {s['when']}" + (f" (Mailstead {s['version']})" if s.get("version")
                                                                       else "")) for s in snapshots]
    return form


def page(status: int = 200, **extra: Any) -> ResponseReturnValue:
    info = state()
    extra.setdefault("target_form", target_form(info["target"]))
    extra["restore_form"] = restore_form(info["snapshots"], extra.get("restore_form"))
    jobs = info["jobs"]
    after = {k: j["id"] if j and j.get("state") == "done" else "" for k, j in jobs.items()}
    return render_dashboard("dashboard/backups.html", current=NAV.endpoint, **info, after=after, job_form=FlaskForm(),
                            **extra), status


def failure_status(err: AgentError) -> int:
    return 503 if err.code in ("unavailable", "timeout") else 409


@bp.get("/")
def index() -> ResponseReturnValue:
    return page()


@bp.post("/target")
def configure() -> ResponseReturnValue:
    form = TargetForm()
    if not form.validate_on_submit():
        form.key.data = form.totp_code.data = ""
        return page(422, target_form=form)
    kind = form.target.data
    args: dict[str, Any] = {"target": kind, "path": form.path.data, "password": form.password.data,
                            "totp_code": form.totp_code.data}
    if kind == "sftp":
        args.update(host=form.host.data, port=int(form.port.data or 22), user=form.user.data,
                    key=(form.key.data or "").strip())
    elif kind == "s3":
        args.update(endpoint=form.endpoint.data, bucket=form.bucket.data, region=form.region.data,
                    access_key_id=form.access_key_id.data, secret_access_key=form.secret_access_key.data)
    try:
        result = backup_ops.backup_configure(**args)
    except AgentError as err:
        form.key.data = form.totp_code.data = ""  # a code works once: the next try needs a new one
        message = show_error(form, err)
        if message is None:
            return page(422, target_form=form)
        key = PUBKEY_RE.search(message) if err.code == "bad_credentials" else None
        return page(failure_status(err), target_form=form, save_error=message,
                    refused_key=key.group(1) if key else "")
    security.rotate_csrf()
    if result.get("recovery_sheet") or result.get("ssh_public_key"):
        # Shown in this answer only: the portal keeps no copy, and a reload re-sends a spent token.
        return render_dashboard("dashboard/backup_sheet.html", current=NAV.endpoint, result=result)
    flash(f"Backups now go to {result['target'].get('repository', kind)}, using the existing repository.", "ok")
    return redirect(url_for("backups.index"), code=303)


def _start(kind: str, what: str) -> ResponseReturnValue:
    if not FlaskForm().validate_on_submit():
        return page(400, page_error=f"The form expired; press “{what}” again.")
    error = start_job(kind)
    if error:
        return page(503, page_error=f"{what} could not start: {error}")
    security.rotate_csrf()
    return redirect(url_for("backups.index", _anchor=kind.replace("_", "-")), code=303)


@bp.post("/run")
def run() -> ResponseReturnValue:
    """Without JavaScript (jobs.js posts to /jobs/backup_run/start instead)."""
    return _start("backup_run", "Back up now")


@bp.post("/verify")
def verify() -> ResponseReturnValue:
    return _start("backup_verify", "Verify now")


@bp.post("/restore")
def restore() -> ResponseReturnValue:
    form = RestoreForm()
    if not form.validate_on_submit():
        form.totp_code.data = ""
        return page(422, restore_form=form)
    try:
        backup_ops.backup_restore(snapshot=form.snapshot.data, totp_code=form.totp_code.data)
    except AgentError as err:
        form.totp_code.data = ""
        message = show_error(form, err)
        if message is None:
            return page(422, restore_form=form)
        return page(failure_status(err), restore_form=form, restore_error=message)
    security.rotate_csrf()
    return redirect(url_for("backups.index", _anchor="backup-restore"), code=303)


@bp.get("/status/<kind>")
def status(kind: str) -> ResponseReturnValue:
    """jobs.js polls this for the page's three jobs (the finished job the page shows is not repeated)."""
    if kind not in KINDS:
        return {"job": None, "error": "unknown job"}, 404
    return job_status_json(kind)
