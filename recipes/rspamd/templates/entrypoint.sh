#!/bin/sh
# Placeholder until the rspamd recipe lands.
exec sleep infinity
