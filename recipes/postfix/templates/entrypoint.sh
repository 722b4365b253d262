#!/bin/sh
# postfix: config from /etc/mailstead/postfix (read-only), queue in /var/spool/postfix.
set -eu

DB=/var/lib/mailstead-accounts/accounts.db

for f in main.cf master.cf; do
    install -m 0644 -o root -g root "/etc/mailstead/postfix/$f" "/etc/postfix/$f"
done

# Fix the spool's owners and modes whenever the image's postfix/postdrop IDs
# differ from the ones the spool was set up for (an image upgrade). Not on
# every start: it walks the queue and every postfix file (under emulation it
# took half a minute). Not on a new spool either (no stamp yet: all it holds
# came from this image): `postfix start-fg` makes the missing queue folders
# with this image's owners and modes (its check runs `post-install
# create-missing`), and it runs postfix's integrity checks and refuses to
# start, saying why, when they fail.
ids="$(id -u postfix):$(id -g postfix):$(getent group postdrop | cut -d: -f3)"
stamp=/var/spool/postfix/.mailstead-permissions
if [ "$(cat "$stamp" 2>/dev/null)" != "$ids" ]; then
    if [ -e "$stamp" ]; then
        postfix set-permissions >/dev/null 2>&1 || true
    fi
    echo "$ids" >"$stamp.tmp" && mv -f "$stamp.tmp" "$stamp"
fi

# postfix daemons open the sqlite maps once, when they start. If accounts.db
# appears after that (a first deploy, before the first account) or is replaced
# (a restore), reload, so that no daemon keeps failing or reading a stale file.
watch_accounts() {
    last=$(stat -c %d:%i "$DB" 2>/dev/null || echo none)
    while sleep 2; do
        now=$(stat -c %d:%i "$DB" 2>/dev/null || echo none)
        if [ "$now" != "$last" ]; then
            last=$now
            echo "mailstead-postfix: $DB changed, reloading" >&2
            postfix reload >/dev/null 2>&1 || true
        fi
    done
}
watch_accounts &

exec postfix start-fg
