#!/bin/sh
# Healthy when radicale answers HTTP on its port: 200 for the root page,
# 401 if it asks for a login (anything else, or no answer, is unhealthy).
exec python3 - <<'PY'
import http.client
import sys

conn = http.client.HTTPConnection("127.0.0.1", 5232, timeout=4)
try:
    conn.request("PROPFIND", "/", headers={"Depth": "0"})
    status = conn.getresponse().status
except OSError as err:
    sys.exit(f"radicale does not answer on 127.0.0.1:5232: {err}")
sys.exit(0 if status in (200, 401) else f"radicale answered HTTP {status} on 127.0.0.1:5232")
PY
