// Reads a tokend json sink from Node with no dependencies: fs.watch on the *directory*
// (a watch on the file dies when tokend renames a new one over it), re-read on each event.
//
// Usage: node reader.js SINK_JSON API_URL SECONDS   -> prints a JSON summary
'use strict';
const fs = require('fs');
const path = require('path');

class TokenFile {
  constructor(file) {
    this.file = path.resolve(file);
    this.data = null;
    this.reload();
    fs.watch(path.dirname(this.file), (_event, name) => {
      if (name === null || name === path.basename(this.file)) this.reload();
    });
  }

  // Keeps the last good token when the file is missing or unparsable.
  reload() {
    try {
      const data = JSON.parse(fs.readFileSync(this.file, 'utf8'));
      if (data.access_token) this.data = data;
    } catch (_) { /* keep the last good token */ }
    return this.data;
  }
}

async function call(url, token) {
  const r = await fetch(url, { headers: { Authorization: `Bearer ${token.access_token}` } });
  await r.arrayBuffer();
  return r.status;
}

// The first token different from `old`, or null after `ms`.
async function waitForNew(tokens, old, ms) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const t = tokens.reload();
    if (t && t.access_token !== old.access_token) return t;
    await new Promise((r) => setTimeout(r, 10));
  }
  return null;
}

async function main() {
  const [sink, url, seconds] = process.argv.slice(2);
  const tokens = new TokenFile(sink);
  const deadline = Date.now() + Number(seconds) * 1000;
  let ok = 0, rotation401 = 0, failed = 0;
  const generations = new Set();
  while (Date.now() < deadline) {
    let token = tokens.data;
    if (!token) { await new Promise((r) => setTimeout(r, 50)); continue; }
    let status = await call(url, token);
    if (status === 401) {
      // Never cache across a 401: the server kills the old token the moment tokend
      // refreshes, a few milliseconds before the new file lands. Wait briefly for it.
      // Up to three times: a second rotation may land while we retry.
      for (let i = 0; i < 3 && status === 401; i += 1) {
        const fresh = await waitForNew(tokens, token, 2000);
        if (!fresh) break;
        token = fresh;
        status = await call(url, fresh);
        if (status !== 401) rotation401 += 1;
      }
    }
    if (status === 200) { ok += 1; generations.add(token.generation); } else { failed += 1; }
    await new Promise((r) => setTimeout(r, 20));
  }
  console.log(JSON.stringify({ ok, rotation_401: rotation401, failed, generations: [...generations].sort((a, b) => a - b) }));
  process.exit(0);
}

main().catch((e) => { console.error(e); process.exit(1); });
