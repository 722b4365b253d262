# shellcheck shell=bash
# Shared helpers for scripts/*. Sourced, not executed.
set -euo pipefail

MAILSTEAD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAILSTEAD_CACHE="${MAILSTEAD_CACHE:-/var/cache/mailstead}"
MKOSI_VERSION_WANTED="${MKOSI_VERSION_WANTED:-25}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (the build uses loop devices, apt and qemu)"; }

# Add trixie as a low-priority apt source: nothing comes from it unless named.
ensure_trixie_source() {
    local src=/etc/apt/sources.list.d/mailstead-trixie.sources
    local pin=/etc/apt/preferences.d/mailstead-trixie
    if [ ! -f "$pin" ]; then
        log "pinning trixie to priority 100 ($pin)"
        printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' > "$pin"
    fi
    if [ ! -f "$src" ]; then
        log "adding trixie apt source ($src)"
        cat > "$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        APT_UPDATED=""
    fi
}

APT_UPDATED=""
apt_update_once() {
    if [ -z "$APT_UPDATED" ]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

# apt_need CMD PACKAGE [apt-get options...]: install PACKAGE when CMD is missing.
apt_need() {
    local cmd="$1" pkg="$2"; shift 2
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -e "$cmd" ]; then
        log "missing '$cmd': installing Debian package '$pkg'"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" "$pkg" >/dev/null \
            || die "could not install '$pkg' (needed for '$cmd'); try: apt-get install $* $pkg"
    fi
}

# mkosi 25 from trixie, unpacked (never installed: that would upgrade the
# host's systemd, libc and python) and run with the host's /usr/bin/python3.
ensure_mkosi() {
    local dir="$MAILSTEAD_CACHE/mkosi-pkg"
    MKOSI="$MAILSTEAD_CACHE/bin/mkosi"
    if [ -x "$MKOSI" ] && "$MKOSI" --version 2>/dev/null | grep -q "mkosi $MKOSI_VERSION_WANTED"; then
        return
    fi
    ensure_trixie_source
    apt_update_once
    log "unpacking mkosi from trixie into $dir"
    rm -rf "$dir"; mkdir -p "$dir" "$MAILSTEAD_CACHE/bin"
    (cd "$dir" && apt-get download -qq mkosi/trixie) || die "could not download mkosi/trixie"
    dpkg -x "$dir"/mkosi_*.deb "$dir/root"
    cat > "$MKOSI" <<WRAP
#!/bin/sh
# mkosi from trixie's .deb, run with the host's python3 (see scripts/lib.sh)
PYTHONPATH="$dir/root/usr/lib/python3/dist-packages\${PYTHONPATH:+:\$PYTHONPATH}" exec /usr/bin/python3 -m mkosi "\$@"
WRAP
    chmod +x "$MKOSI"
    "$MKOSI" --version | grep -q "mkosi $MKOSI_VERSION_WANTED" \
        || die "unpacked mkosi is not version $MKOSI_VERSION_WANTED: $("$MKOSI" --version)"
}

# What mkosi needs on the host to bootstrap its tools tree.
ensure_build_deps() {
    need_root
    apt_need debootstrap debootstrap
    apt_need bwrap bubblewrap
    apt_need zstd zstd
    apt_need /usr/share/keyrings/debian-archive-keyring.gpg debian-archive-keyring
    apt_need mcopy mtools
    apt_need qemu-img qemu-utils
    apt_need newuidmap uidmap
    ensure_mkosi
}

# The docker engine (Debian's docker.io) and compose v2 (trixie's plugin,
# without recommends: they would replace the engine), started when needed.
ensure_docker() {
    apt_need dockerd docker.io
    if ! docker compose version >/dev/null 2>&1; then
        ensure_trixie_source
        apt_update_once
        log "installing docker compose v2 (trixie's docker-compose, no recommends)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t trixie --no-install-recommends \
            docker-compose >/dev/null || die "could not install docker-compose from trixie"
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (log: /var/log/mailstead-dockerd.log)"
        nohup dockerd >/var/log/mailstead-dockerd.log 2>&1 &
        local i
        for i in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
        die "dockerd did not start; see /var/log/mailstead-dockerd.log"
    fi
}
