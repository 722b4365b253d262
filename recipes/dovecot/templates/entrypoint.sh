#!/bin/sh
# dovecot: config from /etc/mailstead/dovecot (read-only), mail in /var/mail.
set -eu

DB=/var/lib/mailstead-accounts/accounts.db

# doveadm (run by the agent to manage the mail_crypt keys) reads the default path.
ln -sf /etc/mailstead/dovecot/dovecot.conf /etc/dovecot/dovecot.conf

# The mail volume: only vmail may enter it.
chown vmail:vmail /var/mail
chmod 0700 /var/mail

install -d -m 0755 /run/dovecot /var/lib/dovecot
# The index cache (plaintext header fields) on its tmpfs: memory only.
install -d -o vmail -g vmail -m 0700 /var/cache/dovecot-index
# Compiled global sieve scripts (their source is in the read-only config).
install -d -o vmail -g vmail -m 0700 /var/lib/dovecot/sieve-bin
# Fail early, with dovecot's own message, on a broken config.
doveconf -n >/dev/null

# auth workers keep accounts.db open: if it is replaced by another file (a
# restore), reload. (They open it on first use, so its creation needs nothing.)
watch_accounts() {
    last=$(stat -c %d:%i "$DB" 2>/dev/null || echo none)
    while sleep 2; do
        now=$(stat -c %d:%i "$DB" 2>/dev/null || echo none)
        if [ "$now" != "$last" ]; then
            if [ "$last" != none ] && [ "$now" != none ]; then
                echo "mailstead-dovecot: $DB was replaced, reloading" >&2
                doveadm reload >/dev/null 2>&1 || true
            fi
            last=$now
        fi
    done
}
watch_accounts &

exec dovecot -F
