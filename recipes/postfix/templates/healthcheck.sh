#!/bin/sh
# Healthy when the postfix master runs, 25/465/587 listen, and port 25 answers
# with its 220 banner (checked at most once a minute, so that the log is not
# filled with health-check sessions).
pid=$(tr -d " \n" < /var/spool/postfix/pid/master.pid 2>/dev/null)
[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { echo "postfix master is not running"; exit 1; }
for port in 0019 01D1 024B; do
    grep -qiE "^ *[0-9]+: [0-9A-F]+:$port [0-9A-F]+:0000 0A " /proc/net/tcp 2>/dev/null \
        || { echo "port $((0x$port)) not listening"; exit 1; }
done
stamp=/run/mailstead-smtp-answered
if [ -z "$(find "$stamp" -mmin -1 2>/dev/null)" ]; then
    banner=$(timeout 4 bash -c 'exec 3<>/dev/tcp/127.0.0.1/25; IFS= read -r line <&3; printf "QUIT\r\n" >&3; printf "%s" "$line"') || true
    case "$banner" in
        220*) touch "$stamp" ;;
        *) echo "port 25 did not answer with 220: ${banner:-nothing}"; exit 1 ;;
    esac
fi
