#!/bin/sh
# Healthy when the dovecot master answers and IMAPS (993), POP3S (995), LMTP (24)
# and auth (12345) are listening. Reads /proc instead of connecting, so that the
# check does not fill the log with aborted logins.
doveadm service status >/dev/null 2>&1 || { echo "dovecot master not answering"; exit 1; }
for port in 03E1 03E3 0018 3039; do
    grep -qiE "^ *[0-9]+: [0-9A-F]+:$port [0-9A-F]+:0000 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        || { echo "port $((0x$port)) not listening"; exit 1; }
done
