"""The mail users' own page: change a mailbox's password at /password.

Anyone who knows a mailbox's current password may set a new one here; no admin
session is needed (the page is public once setup is complete, like sign-in). The
agent (mailbox_password) checks the current password and re-encrypts the mailbox's
mail_crypt key with the new one, so all stored mail stays readable: unlike an
administrator's reset, which makes new keys.

A wrong current password and an address with no mailbox get the same answer, so the
page does not tell which addresses exist; POSTs are rate limited per client
(PASSWORD_RATE_LIMIT), on top of the argon2id cost of every check.
"""

from __future__ import annotations

from flask import Blueprint, Flask, render_template
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import Field, PasswordField, StringField
from wtforms.validators import ValidationError

from portal.agent.client import AgentError
from portal.stack import privileged as stack_ops
from portal.stack.accounts import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH
from portal.web import security
from portal.web.dashboard.mailboxes import address_check, password_check, strip
from portal.web.jobs import show_error
from portal.web.steps.admin import repeats

PASSWORD_RATE_LIMIT = "5 per minute"
NOT_RIGHT = "The address or the current password is not right. Check both and try again."
NOT_NOW = ("The password could not be changed now: the mail service did not take the change, so your "
           "old password still works. Try again later, or tell your administrator (the health page of "
           "the dashboard says what is wrong).")

bp = Blueprint("password", __name__)


class PasswordForm(FlaskForm):
    address = StringField("Mail address", filters=[strip], validators=[address_check])
    old_password = PasswordField("Current password")
    new_password = PasswordField("New password", validators=[password_check],
                                 description=f"At least {MIN_PASSWORD_LENGTH} characters; a few unrelated words "
                                             "work well.")
    new_password_confirm = PasswordField("New password again", validators=[repeats("new_password", "new password")])

    def validate_old_password(self, field: Field) -> None:
        if not field.data:
            raise ValidationError("Enter the password your mail apps use now.")
        if len(field.data) > MAX_PASSWORD_LENGTH:
            raise ValidationError(NOT_RIGHT)


def _page(form: PasswordForm, status: int = 200, error: str | None = None,
          changed: str | None = None) -> ResponseReturnValue:
    return render_template("password/change.html", form=form, error=error, changed=changed), status


@bp.route("/password", methods=["GET", "POST"])
def change() -> ResponseReturnValue:
    form = PasswordForm()
    if not form.is_submitted():
        return _page(form)
    if not form.validate():
        return _page(form, 422)
    try:
        result = stack_ops.mailbox_password(address=form.address.data, old_password=form.old_password.data,
                                            new_password=form.new_password.data)
    except AgentError as err:
        if err.field in ("address", "old_password") and err.code == "invalid":
            # The same words for an unknown address and a wrong password.
            form.old_password.errors = [NOT_RIGHT]
            return _page(form, 422)
        if show_error(form, err) is None:
            return _page(form, 422)
        # The agent's own words are for administrators (paths, docker): a user is told
        # what happened to their password, and who can help.
        return _page(form, 503 if err.code in ("unavailable", "timeout") else 409, error=NOT_NOW)
    security.rotate_csrf()
    return _page(PasswordForm(formdata=None), changed=str(result.get("changed", form.address.data)))


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    security.limiter(app).limit(app.config.get("PASSWORD_RATE_LIMIT", PASSWORD_RATE_LIMIT),
                                methods=["POST"])(bp)

