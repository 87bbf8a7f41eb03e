// The official RingCentral JS SDK with a token managed by tokend, the way its authors
// recommend for a central refresher: auto-refresh off (ensureLoggedIn returns null) and
// platform.auth().setData() fed from the json sink on every change.
//
// Usage: node ringcentral-sdk.js SINK_JSON SERVER_URL CLIENT_ID SECONDS -> prints a JSON summary
'use strict';
const fs = require('fs');
const path = require('path');
const { SDK } = require('@ringcentral/sdk');

async function waitForNew(load, changed, ms) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    await load();
    if (changed()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return false;
}

async function main() {
  const [sink, server, clientId, seconds] = process.argv.slice(2);
  // No client secret here: this process never logs in or refreshes.
  const sdk = new SDK({ server, clientId });
  const platform = sdk.platform();
  platform.ensureLoggedIn = async () => null; // tokend refreshes; the SDK must not

  const file = path.resolve(sink);
  let generation = null;
  const load = async () => {
    try {
      const data = JSON.parse(fs.readFileSync(file, 'utf8'));
      if (!data.access_token || data.generation === generation) return false;
      // tokend writes expire_time (ms), the field this SDK keeps.
      await platform.auth().setData(data);
      generation = data.generation;
      return true;
    } catch (_) { return false; } // keep the last good token
  };
  await load();
  fs.watch(path.dirname(file), (_e, name) => { if (name === null || name === path.basename(file)) load(); });

  const deadline = Date.now() + Number(seconds) * 1000;
  let ok = 0, rotation401 = 0, failed = 0;
  const generations = new Set();
  while (Date.now() < deadline) {
    let used = generation;
    let done = false;
    // Up to three tries: after a 401 at rotation, wait for the new token, then call again.
    for (let i = 0; i < 3 && !done; i += 1) {
      try {
        await platform.get('/restapi/v1.0/account/~/extension/~');
        ok += 1; generations.add(used); done = true;
        if (i > 0) rotation401 += 1;
      } catch (e) {
        const status = e.response && e.response.status;
        if (status !== 401 || !(await waitForNew(load, () => generation !== used, 2000))) break;
        used = generation;
      }
    }
    if (!done) failed += 1;
    await new Promise((r) => setTimeout(r, 20));
  }
  console.log(JSON.stringify({ ok, rotation_401: rotation401, failed, generations: [...generations].sort((a, b) => a - b) }));
  process.exit(0);
}

main().catch((e) => { console.error(e); process.exit(1); });
