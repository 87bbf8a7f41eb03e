#!/usr/bin/env python3
"""Reads a tokend json sink with the Python standard library only.

The reader contract: re-read the file when it changes (here: when its inode, mtime or size
changes, which a rename always does), never cache a token across a 401, never refresh yourself.

Usage: reader.py SINK_JSON API_URL SECONDS
Calls API_URL with the current token until SECONDS pass and prints a JSON summary.
"""
import json
import os
import sys
import time
import urllib.error
import urllib.request


class TokenFile:
    """The latest token in a tokend json sink; re-opens the file only when it changed."""

    def __init__(self, path):
        self.path = path
        self._key = None
        self._data = None

    def current(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._data  # keep serving the last good token
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("access_token"):
                    self._data, self._key = data, key
            except (OSError, ValueError):
                pass  # a bad file never replaces a good token
        return self._data


def call(url, token):
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token["access_token"]})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_for_new(tokens, old, timeout):
    """The first token different from `old`, or None after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        new = tokens.current()
        if new and new["access_token"] != old["access_token"]:
            return new
        time.sleep(0.01)
    return None


def main():
    sink, url, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    tokens = TokenFile(sink)
    ok = rotation_401 = failed = 0
    generations = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        token = tokens.current()
        if token is None:
            time.sleep(0.05)
            continue
        status = call(url, token)
        if status == 401:
            # Never cache across a 401: the server kills the old token the moment tokend
            # refreshes, a few milliseconds before the new file lands. Wait briefly for it.
            for _ in range(3):
                retry = wait_for_new(tokens, token, 2.0)
                if retry is None:
                    break
                token, status = retry, call(url, retry)
                if status != 401:
                    rotation_401 += 1
                    break
        if status == 200:
            ok += 1
            generations.add(token["generation"])
        else:
            failed += 1
        time.sleep(0.02)
    print(json.dumps({"ok": ok, "rotation_401": rotation_401, "failed": failed, "generations": sorted(generations)}))


if __name__ == "__main__":
    main()
