"""WSGI entry point: `gunicorn portal.wsgi:app`. Configuration comes from MAILSTEAD_* env."""

from . import create_app

app = create_app()
