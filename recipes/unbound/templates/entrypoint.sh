#!/bin/sh
# unbound: the stack's caching DNS resolver. Runs as the unbound user
# (compose `user:`); config is mounted read-only. -d: stay in the foreground,
# -p: no pid file.
exec unbound -d -p -c /etc/mailstead/unbound/unbound.conf
