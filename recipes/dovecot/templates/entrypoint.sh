#!/bin/sh
# Placeholder until the dovecot recipe lands.
exec sleep infinity
