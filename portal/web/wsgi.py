"""WSGI entry point: `gunicorn portal.web.wsgi:app`. Configuration comes from MAILSTEAD_* env."""

from portal.web import create_app

app = create_app()
