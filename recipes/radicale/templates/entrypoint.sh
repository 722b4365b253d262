#!/bin/sh
# radicale: CalDAV/CardDAV for the mail accounts. Started as root only to hand
# the `dav` volume to the radicale user (a fresh named volume is owned by
# root, as is the image's mount point; a restore may leave root-owned files);
# radicale itself runs as that user, with no capabilities.
set -eu
find /var/lib/radicale/collections \( ! -user radicale -o ! -group radicale \) \
    -exec chown -h radicale:radicale {} +
# The auth plugin (mailstead_dovecot_auth.py) lives next to the config.
export PYTHONPATH=/etc/mailstead/radicale PYTHONDONTWRITEBYTECODE=1
exec setpriv --reuid=radicale --regid=radicale --init-groups \
    radicale --config /etc/mailstead/radicale/config
