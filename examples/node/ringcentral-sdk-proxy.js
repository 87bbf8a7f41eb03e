// The official RingCentral JS SDK calling the API through tokend's local proxy: the program
// holds no token at all. server = the proxy's URL, auto-refresh off; the proxy sets the token.
//
// Usage: node ringcentral-sdk-proxy.js PROXY_URL CLIENT_ID SECONDS -> prints a JSON summary
'use strict';
const { SDK } = require('@ringcentral/sdk');

async function main() {
  const [server, clientId, seconds] = process.argv.slice(2);
  const platform = new SDK({ server, clientId }).platform();
  platform.ensureLoggedIn = async () => null; // tokend refreshes; the SDK must not

  const deadline = Date.now() + Number(seconds) * 1000;
  let ok = 0;
  let failed = 0;
  const errors = [];
  // Calls with no pause and no retry: any failure at a rotation would show here.
  while (Date.now() < deadline) {
    try {
      const resp = await platform.get('/restapi/v1.0/account/~/extension/~');
      await resp.json();
      ok += 1;
    } catch (e) {
      failed += 1;
      if (errors.length < 5) errors.push(String((e.response && e.response.status) || e.message));
    }
  }
  console.log(JSON.stringify({ ok, failed, errors }));
}

main().catch((e) => { console.error(e); process.exit(1); });
