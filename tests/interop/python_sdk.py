"""Interop: the official RingCentral Python SDK (PyPI `ringcentral`) against `tokend fake-server`.

Usage: python_sdk.py SERVER_URL CLIENT_ID CLIENT_SECRET JWT
Logs in with JWT, calls the extension endpoint, refreshes, and checks the old access token is
refused with RingCentral's "Access token corrupted" (OAU-129). Prints a JSON summary; exit 0 on success.
"""
import json
import sys

import requests
from ringcentral import SDK

server, client_id, client_secret, jwt = sys.argv[1:5]
platform = SDK(client_id, client_secret, server).platform()
platform.login(jwt=jwt)
first = platform.auth().data()
ext = platform.get("/restapi/v1.0/account/~/extension/~").json_dict()
platform.refresh()
second = platform.auth().data()
assert second["access_token"] != first["access_token"], "refresh issued a new access token"
ext_after = platform.get("/restapi/v1.0/account/~/extension/~").json_dict()
old = requests.get(
    server + "/restapi/v1.0/account/~/extension/~",
    headers={"Authorization": "Bearer " + first["access_token"]},
)
body = old.json()
assert old.status_code == 401, old.status_code
assert body["errors"][0]["errorCode"] == "OAU-129", body
print(json.dumps({
    "extension_id": ext["id"],
    "extension_id_after_refresh": ext_after["id"],
    "old_token_status": old.status_code,
    "old_token_code": body["errors"][0]["errorCode"],
}))
