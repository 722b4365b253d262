#!/bin/sh
# learn.sh spam|ham, the message on stdin: run by dovecot's IMAPSieve scripts
# (report-spam.sieve, report-ham.sieve), as vmail, when a user moves a message
# into or out of Junk. rspamd's controller, on the stack network, learns it; it
# trusts dovecot's fixed address alone (rspamd's worker-controller.inc), so no
# password is needed here and none is kept. What rspamd answers other than
# "learned" (the same message again, too short to learn) is logged by dovecot
# (this script's stderr) and changes nothing for the user: the move is done.
set -eu
case "${1:-}" in
    spam|ham) ;;
    *) echo "learn.sh: say spam or ham" >&2; exit 64 ;;
esac
if ! reply=$(curl --silent --show-error --max-time 60 --data-binary @- "http://rspamd:11334/learn$1" 2>&1); then
    echo "learn.sh: rspamd's controller did not answer: $reply" >&2
    exit 75
fi
case "$reply" in
    *'"success":true'*|*'"success": true'*) ;;
    *) echo "learn.sh: rspamd did not learn the message as $1: $reply" >&2 ;;
esac
exit 0
