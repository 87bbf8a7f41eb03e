"""The official RingCentral Python SDK (PyPI `ringcentral`) calling the API through tokend's
local proxy: the program holds no token. server = the proxy's URL, and every call passes
`skip_auth_check=True` so the SDK neither refreshes nor sends a token; the proxy sets it.

Usage: sdk_proxy.py PROXY_URL CLIENT_ID SECONDS -> prints a JSON summary
"""
import json
import sys
import time

from ringcentral import SDK

server, client_id, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
platform = SDK(client_id, "", server).platform()

ok = failed = 0
errors = []
deadline = time.monotonic() + seconds
# Calls with no pause and no retry: any failure at a rotation would show here.
while time.monotonic() < deadline:
    try:
        platform.get("/restapi/v1.0/account/~/extension/~", skip_auth_check=True).json_dict()
        ok += 1
    except Exception as e:  # the SDK raises on any non-2xx
        failed += 1
        if len(errors) < 5:
            errors.append(str(e)[:200])
print(json.dumps({"ok": ok, "failed": failed, "errors": errors}))
