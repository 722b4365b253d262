"""The administrator account: TOTP enrolment, sign-in with lockout, recovery codes."""
