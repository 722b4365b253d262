#!/bin/sh
# Healthy when the controller answers (it scans, learns and reports
# statistics) and the milter port (postfix's smtpd_milters) accepts connections.
rspamc -h 127.0.0.1:11334 -t 20 stat >/dev/null || exit 1
exec timeout 10 bash -c ': </dev/tcp/127.0.0.1/11332' 2>/dev/null
