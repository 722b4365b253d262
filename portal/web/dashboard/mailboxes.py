"""Dashboard: mailboxes and aliases, through the stack's agent operations
(mailbox_list, mailbox_create, mailbox_delete, mailbox_reset_password,
mailbox_quota, alias_add, alias_remove). Input is checked here first and again
by the agent; every problem is shown on its field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, flash, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import BooleanField, Field, HiddenField, IntegerField, PasswordField, SelectField, StringField
from wtforms.validators import InputRequired, NumberRange, Optional, ValidationError

from portal.agent.registry import Operation
from portal.web import security
from portal.web.jobs import show_error
from portal.agent.client import AgentError
from portal.stack.accounts import (MAX_PASSWORD_LENGTH, MAX_QUOTA_MB, MIN_PASSWORD_LENGTH, AccountError,
                                    check_address, check_alias_source)
from portal.web.dashboard import Nav, render_dashboard
from portal.stack import privileged as stack_ops

bp = Blueprint("mailboxes", __name__, url_prefix="/admin/mailboxes")
NAV = Nav(20, "Mailboxes", "mailboxes.index")


def strip(value: str | None) -> str:
    return (value or "").strip()


def address_check(form: FlaskForm, field: Field) -> None:
    value = field.data or ""
    if not value:
        raise ValidationError("Enter an address, such as alice@example.org.")
    if len(value) > 320:
        raise ValidationError("That is too long for an email address (at most 320 characters).")
    try:
        field.data = check_address(value, field.name)
    except AccountError as err:
        raise ValidationError(err.message) from None


def alias_source_check(form: FlaskForm, field: Field) -> None:
    """An address, or @domain (the domain's catch-all)."""
    value = field.data or ""
    if not value.startswith("@"):
        address_check(form, field)
        return
    try:
        field.data = check_alias_source(value, field.name)
    except AccountError as err:
        raise ValidationError(err.message) from None


def password_check(form: FlaskForm, field: Field) -> None:
    value = field.data or ""
    if len(value) < MIN_PASSWORD_LENGTH:
        raise ValidationError(f"Use at least {MIN_PASSWORD_LENGTH} characters; a few unrelated words work well.")
    if len(value) > MAX_PASSWORD_LENGTH:
        raise ValidationError(f"Use at most {MAX_PASSWORD_LENGTH} characters.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValidationError("The password cannot contain control characters (such as tabs or line breaks).")


QUOTA_HELP = "In MiB; 0 means no limit (1024 MiB = 1 GiB)."
QUOTA_RANGE = NumberRange(0, MAX_QUOTA_MB, f"Enter a number from 0 (no limit) to {MAX_QUOTA_MB}.")
QUOTA_TYPE = "Enter a whole number of MiB, such as 2048; 0 means no limit."


class CreateForm(FlaskForm):
    address = StringField("Address", filters=[strip], validators=[address_check])
    password = PasswordField("Password", validators=[password_check],
                             description=f"At least {MIN_PASSWORD_LENGTH} characters. Its user can change it on "
                                         "this portal's /password page, which keeps their mail readable; "
                                         "a reset here makes older mail unreadable.")
    quota_mb = IntegerField("Quota (MiB)", default=0, validators=[Optional(), QUOTA_RANGE],
                            description=QUOTA_HELP)


class DeleteForm(FlaskForm):
    address = HiddenField("Address", filters=[strip], validators=[address_check])
    confirm = BooleanField("Yes, delete this mailbox; its stored mail can no longer be read")


class ResetForm(FlaskForm):
    address = SelectField("Mailbox", validate_choice=False, filters=[strip], validators=[address_check])
    new_password = PasswordField("New password", validators=[password_check],
                                 description="Mail stored until now becomes unreadable, for the user and for "
                                             "you (it was encrypted with the old password). Only for a "
                                             "forgotten password.")


class QuotaForm(FlaskForm):
    address = SelectField("Mailbox", validate_choice=False, filters=[strip], validators=[address_check])
    quota_mb = IntegerField("New quota (MiB)", validators=[InputRequired(QUOTA_TYPE), QUOTA_RANGE],
                            description=QUOTA_HELP)


class AliasForm(FlaskForm):
    source = StringField("Alias address", filters=[strip], validators=[alias_source_check],
                         description="An address in your domain that is not a mailbox, or @ and the "
                                     "domain (such as @example.org) for a catch-all: mail for every "
                                     "address there that is neither a mailbox nor an alias.")
    destination = StringField("Forward to", filters=[strip], validators=[address_check],
                              description="A mailbox here, or any address elsewhere.")


class UnaliasForm(FlaskForm):
    source = HiddenField("Alias address", filters=[strip], validators=[alias_source_check])
    destination = HiddenField("Forward to", filters=[strip], validators=[address_check])


def _integer_messages(form: FlaskForm) -> None:
    """WTForms' own message for a non-number is terse: say what to enter."""
    field = form._fields.get("quota_mb")
    if field is not None and field.errors:
        field.errors = [QUOTA_TYPE if e == "Not a valid integer value." else e for e in field.errors]


def forms(**given: FlaskForm) -> dict[str, FlaskForm]:
    """All forms of the page (fresh unless given), with each select's choices."""
    return {
        "create": given.get("create") or CreateForm(prefix="create", formdata=None),
        "reset": given.get("reset") or ResetForm(prefix="reset", formdata=None),
        "quota": given.get("quota") or QuotaForm(prefix="quota", formdata=None),
        "alias": given.get("alias") or AliasForm(prefix="alias", formdata=None),
        "delete": given.get("delete"),
    }


def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    try:
        result = stack_ops.mailbox_list()
    except AgentError as err:
        return [], [], err.message
    return result.get("mailboxes", []), result.get("aliases", []), None


def page(status: int = 200, error: str | None = None, **given: FlaskForm) -> ResponseReturnValue:
    mailboxes, aliases, list_error = listing()
    all_forms = forms(**given)
    choices = [(m["address"], m["address"]) for m in mailboxes]
    for name in ("reset", "quota"):
        all_forms[name].address.choices = choices
    return render_dashboard("dashboard/mailboxes.html", current=NAV.endpoint, mailboxes=mailboxes,
                            aliases=aliases, list_error=list_error, error=error, forms=all_forms), status


def act(form: FlaskForm, name: str, op: Operation, args: Callable[[], dict[str, Any]],
        done: Callable[[], str]) -> ResponseReturnValue:
    """Validate `form`, call the agent with `args()`, and redirect with the message
    `done()`, or show the page again with the errors on their fields."""
    if not form.validate_on_submit():
        _integer_messages(form)
        return page(422, **{name: form})
    try:
        op(**args())
    except AgentError as err:
        message = show_error(form, err)
        if message is None:
            return page(422, **{name: form})
        # 503 only when the agent itself does not answer; a missing docker engine is a
        # state of the appliance (409 with the agent's message), not a server failure.
        return page(503 if err.code in ("unavailable", "timeout") else 409,
                    error=message, **{name: form})
    security.rotate_csrf()
    flash(done(), "ok")
    return redirect(url_for("mailboxes.index"), code=303)


@bp.get("/")
def index() -> ResponseReturnValue:
    return page()


@bp.post("/create")
def create() -> ResponseReturnValue:
    form = CreateForm(prefix="create")
    return act(form, "create", stack_ops.mailbox_create,
               lambda: {"address": form.address.data, "password": form.password.data,
                        "quota_mb": form.quota_mb.data or 0},
               lambda: f"Mailbox {form.address.data} created.")


@bp.route("/delete", methods=["GET", "POST"])
def delete() -> ResponseReturnValue:
    """GET: ask for confirmation (?address=...); POST: delete, if the box is ticked."""
    if request.method == "GET":
        try:
            address = check_address(strip(request.args.get("address"))[:320])
        except AccountError:
            return redirect(url_for("mailboxes.index"), code=303)
        return page(delete=DeleteForm(prefix="delete", formdata=None, address=address))
    form = DeleteForm(prefix="delete")
    valid = form.validate_on_submit()
    if valid and not form.confirm.data:
        form.confirm.errors = ["Tick the box to confirm, or choose Cancel to keep the mailbox."]
        valid = False
    if not valid:
        return page(422, delete=form)
    try:
        result = stack_ops.mailbox_delete(address=form.address.data)
    except AgentError as err:
        return page(409, error=show_error(form, err), delete=form)
    security.rotate_csrf()
    removed = len(result.get("aliases_removed", []))
    flash(f"Mailbox {form.address.data} deleted"
          + (f", with the {removed} alias(es) pointing to it." if removed else "."), "ok")
    return redirect(url_for("mailboxes.index"), code=303)


@bp.post("/reset-password")
def reset_password() -> ResponseReturnValue:
    form = ResetForm(prefix="reset")
    return act(form, "reset", stack_ops.mailbox_reset_password,
               lambda: {"address": form.address.data, "new_password": form.new_password.data},
               lambda: f"New password set for {form.address.data}.")


@bp.post("/quota")
def quota() -> ResponseReturnValue:
    form = QuotaForm(prefix="quota")
    return act(form, "quota", stack_ops.mailbox_quota,
               lambda: {"address": form.address.data, "quota_mb": form.quota_mb.data},
               lambda: f"Quota of {form.address.data} changed.")


@bp.post("/alias")
def alias_add() -> ResponseReturnValue:
    form = AliasForm(prefix="alias")
    return act(form, "alias", stack_ops.alias_add,
               lambda: {"source": form.source.data, "destination": form.destination.data},
               lambda: f"{form.source.data} now forwards to {form.destination.data}.")


@bp.post("/alias/remove")
def alias_remove() -> ResponseReturnValue:
    form = UnaliasForm(prefix="unalias")
    if not form.validate_on_submit():
        return page(422, error="That alias could not be removed: reload the page and try again.")
    try:
        stack_ops.alias_remove(source=form.source.data, destination=form.destination.data)
    except AgentError as err:
        return page(409, error=err.message)
    security.rotate_csrf()
    flash(f"Alias {form.source.data} → {form.destination.data} removed.", "ok")
    return redirect(url_for("mailboxes.index"), code=303)
