#!/bin/sh
# rspamd: spam scoring, SPF/DKIM/DMARC checks, DKIM and ARC signing; postfix
# talks to it over the milter protocol on :11332. Runs as root only to put
# the mounted config and keys in place, then runs rspamd as _rspamd.
set -eu
umask 077

SRC=/etc/mailstead/rspamd
KEYS_IN=/run/mailstead-dkim
KEYS=/run/rspamd/dkim

say() { echo "mailstead-rspamd: $*" >&2; }

# Config: rendered from settings, mounted read-only; copied into rspamd's own
# local.d, lua.local.d (rules in Lua) and override.d (the container's writable
# layer) with restrictive modes, since local.d/redis.conf holds the redis password.
for d in local.d lua.local.d override.d; do
    rm -rf "/etc/rspamd/$d"
    install -d -o root -g _rspamd -m 0750 "/etc/rspamd/$d"
    for f in "$SRC/$d"/*; do
        [ -f "$f" ] || continue
        install -o root -g _rspamd -m 0640 "$f" "/etc/rspamd/$d/"
    done
done

# The controller trusts this container and dovecot (secure_ip,
# worker-controller.inc); any other client would need this password, which
# nobody knows.
controller_pw=$(rspamadm pw --encrypt --password "$(head -c 32 /dev/urandom | base64 -w0)")
printf 'password = "%s";\nenable_password = "%s";\n' "$controller_pw" "$controller_pw" \
    >>/etc/rspamd/override.d/worker-controller.inc

# DKIM/ARC keys: 0600 root on the host; here readable by _rspamd but not
# writable, and kept out of the rspamd volume. /run/rspamd (rspamd's pid
# file) stays root's, so that after a restart this script can clean up with
# no capability beyond CHOWN, SETUID and SETGID (compose's cap_add; KILL is
# for tini, which forwards docker's signals to rspamd).
rm -rf "$KEYS"
install -d -o root -g _rspamd -m 0770 /run/rspamd
install -d -o root -g _rspamd -m 0750 "$KEYS" /run/rspamd/www
# rspamd 3.12 reads RSA keys as PEM, but an Ed25519 key only as the base64
# of its 32-byte seed: the tail of the fixed 48-byte PKCS#8 DER encoding.
ED25519_PKCS8_PREFIX=302e020100300506032b657004220420
copy_key() {  # copy_key SRC DEST
    der=$(sed '/^-----/d' "$1" | base64 -d | od -An -v -tx1 | tr -d ' \n')
    case "$der" in
        "$ED25519_PKCS8_PREFIX"*)
            [ ${#der} -eq 96 ] || { say "$1: unexpected Ed25519 key encoding"; return 1; }
            sed '/^-----/d' "$1" | base64 -d | tail -c 32 | base64 -w0 >"$2" ;;
        *)
            cat "$1" >"$2" ;;
    esac
    chown root:_rspamd "$2"
    chmod 0640 "$2"
}
missing=""
for selector in $(cat "$SRC/dkim-selectors"); do
    if [ -f "$KEYS_IN/$selector.key" ]; then
        copy_key "$KEYS_IN/$selector.key" "$KEYS/$selector.key"
    else
        missing="$missing $KEYS_IN/$selector.key"
    fi
done
if [ -n "$missing" ]; then
    say "WARNING: outgoing mail is NOT DKIM-signed: missing key(s):$missing"
    say "(the agent makes them with portal.stack.dkim.ensure_keys; then deploy again)"
fi

# The named volume (Bayes cache, hyperscan caches, history) is _rspamd's.
chown _rspamd:_rspamd /var/lib/rspamd

# The public suffix list (URL and eSLD matching) comes compiled with the
# image (recipes/rspamd/postinst-hs-cache.chroot): put it where rspamd looks,
# through a temporary name so a power loss never leaves half a cache. The
# platform shim makes rspamd look for exactly that file on any CPU (and
# compile its own regexp caches for the same generic target); without it,
# rspamd's main process would compile the list itself on first start:
# minutes under emulation, and ~200 MB more memory in every worker.
# (As _rspamd: root here has no right to write into _rspamd's folder.)
as_rspamd() { setpriv --reuid=_rspamd --regid=_rspamd --clear-groups "$@"; }
as_rspamd sh -eu -c '
for f in "$1"/*.hsmp.gz; do
    name="${f##*/}"
    dest="/var/lib/rspamd/${name%.gz}"
    [ -s "$dest" ] && continue  # written by rename: complete if there
    gzip -dc "$f" >/var/lib/rspamd/.mailstead-hs.tmp
    mv -f /var/lib/rspamd/.mailstead-hs.tmp "$dest"
done' sh /usr/lib/mailstead/rspamd-hs-cache

# No separate configuration test: rspamd checks its configuration as it
# loads it, and exits saying what is wrong (in the container's log).
export LD_PRELOAD=/usr/lib/mailstead/hs-generic-platform.so
exec setpriv --reuid=_rspamd --regid=_rspamd --clear-groups \
    rspamd --no-fork --config /etc/rspamd/rspamd.conf
