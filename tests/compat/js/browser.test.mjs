// The same npm client bundled into a page, in Debian's Chromium driven by playwright-core.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';
import { ROOT, Recorder, startServer, token } from './harness.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const rec = new Recorder('js-browser', 'centrifuge-js (Chromium)');
let srv;
let web;
let browser;

before(async () => {
  srv = await startServer();
  const bundles = {};
  for (const [enc, entry] of [['json', 'entry.mjs'], ['protobuf', 'entry-protobuf.mjs']]) {
    const out = await esbuild.build({
      entryPoints: [join(here, 'browser', entry)],
      bundle: true,
      write: false,
      format: 'iife',
      platform: 'browser',
    });
    bundles[`/bundle-${enc}.js`] = out.outputFiles[0].text;
  }
  const html = readFileSync(join(here, 'browser', 'page.html'), 'utf8');
  web = createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const enc = new URL(req.url, 'http://x').searchParams.get('enc') || 'json';
    if (bundles[path]) {
      res.writeHead(200, { 'content-type': 'text/javascript' }).end(bundles[path]);
    } else {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(html.replace('${ENC}', enc));
    }
  });
  await new Promise((r) => web.listen(0, '127.0.0.1', r));
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  rec.write();
  await browser?.close();
  web?.close();
  await srv?.stop();
});

// Each case: the bundle's encoding, the client's transport list (none = WebSocket alone), whether
// the test blocks WebSocket (as a proxy that refuses upgrades would), the transport that must
// end up carrying the session, and the report's column.
const CASES = [
  { encoding: 'json', transports: null, blockWs: false, expect: 'websocket', column: 'json' },
  { encoding: 'protobuf', transports: null, blockWs: false, expect: 'websocket', column: 'protobuf' },
  {
    encoding: 'json',
    transports: 'websocket,http_stream,sse',
    blockWs: true,
    expect: 'http_stream',
    column: 'http_stream (json)',
  },
  { encoding: 'json', transports: 'sse', blockWs: false, expect: 'sse', column: 'sse (json)' },
];

for (const { encoding, transports, blockWs, expect, column } of CASES) {
test(`browser (${column}): missed publications arrive exactly once, in order, after going offline`, async () => {
  const user = `web-${column.replace(/\W+/g, '-')}`;
  try {
    const channel = `browser_${user}_${process.pid}`;
    const context = await browser.newContext({ viewport: { width: 900, height: 520 } });
    if (blockWs) {
      // The WebSocket endpoint is refused before it reaches the server.
      await context.routeWebSocket(/\/connection\/websocket/, (ws) => ws.close());
    }
    const page = await context.newPage();
    const list = transports ? `&transports=${transports}` : '';
    const url = `http://127.0.0.1:${web.address().port}/?ws=${encodeURIComponent(srv.ws)}&token=${token(user)}&channel=${channel}&enc=${encoding}${list}`;
    await page.goto(url);
    await page.waitForFunction(() => window.events.some((e) => e.subscribed), null, { timeout: 10000 });
    const connected = await page.evaluate(() => window.events.filter((e) => e.connected).map((e) => e.connected));
    assert.deepEqual(connected, [expect], `the session runs over ${expect}`);
    if (blockWs) rec.add('falls back by itself when WebSocket is blocked', column, 'pass');
    for (let i = 1; i <= 3; i++) await srv.api('publish', { channel, data: { i } });
    await page.waitForFunction(() => window.received.length === 3, null, { timeout: 10000 });
    // Offline: the browser cannot reach the server, and the server drops the connection.
    await context.setOffline(true);
    await srv.api('disconnect', { user, disconnect: { code: 3011, reason: 'force reconnect' } });
    await page.waitForFunction(() => window.events.some((e) => e.subscribing), null, { timeout: 10000 });
    for (let i = 4; i <= 8; i++) await srv.api('publish', { channel, data: { i } });
    assert.equal(await page.evaluate(() => window.received.length), 3, 'nothing reaches an offline browser');
    await context.setOffline(false);
    await page.waitForFunction(() => window.received.length >= 8, null, { timeout: 15000 });
    await srv.api('publish', { channel, data: { i: 9 } });
    await page.waitForFunction(() => window.received.length >= 9, null, { timeout: 10000 });
    const received = await page.evaluate(() => window.received);
    const events = await page.evaluate(() => window.events);
    assert.deepEqual(received, [1, 2, 3, 4, 5, 6, 7, 8, 9], 'exactly once, in order');
    const resub = events.filter((e) => e.subscribed).at(-1);
    assert.deepEqual(resub, { subscribed: true, wasRecovering: true, recovered: true });
    mkdirSync(join(ROOT, 'artifacts'), { recursive: true });
    const shot = column.replace(/\W+/g, '-').replace(/-$/, '');
    await page.screenshot({ path: join(ROOT, 'artifacts', `browser-recovery-${shot}.png`) });
    await context.close();
    rec.add('recovery after going offline', column, 'pass');
  } catch (e) {
    if (blockWs) rec.add('falls back by itself when WebSocket is blocked', column, 'fail');
    rec.add('recovery after going offline', column, 'fail');
    throw e;
  }
});
}

for (const encoding of ['json', 'protobuf']) {
  test(`browser (${encoding}): fossil delta compression, decoded by the page's client`, async () => {
    try {
      const user = `web-delta-${encoding}`;
      const channel = `delta:browser_${encoding}_${process.pid}`;
      const context = await browser.newContext();
      const page = await context.newPage();
      const url = `http://127.0.0.1:${web.address().port}/?ws=${encodeURIComponent(srv.ws)}&token=${token(user)}&channel=${channel}&enc=${encoding}&delta=fossil`;
      await page.goto(url);
      await page.waitForFunction(() => window.events.some((e) => e.subscribed), null, { timeout: 10000 });
      let text = 'A streamed answer, sent whole each time: ';
      const want = [];
      for (let i = 1; i <= 20; i++) {
        text += ` wörd${i} ✓`;
        want.push(text);
        await srv.api('publish', { channel, data: { i, text }, delta: true });
      }
      await page.waitForFunction(() => window.received.length >= 20, null, { timeout: 10000 });
      assert.deepEqual(await page.evaluate(() => window.texts), want);
      const st = await page.evaluate(() => window.deltaStats());
      assert.equal(st.numFullPayloads, 1, JSON.stringify(st));
      assert.equal(st.numDeltaPayloads, 19, JSON.stringify(st));
      await context.close();
      rec.add('fossil delta compression', encoding, 'pass');
    } catch (e) {
      rec.add('fossil delta compression', encoding, 'fail');
      throw e;
    }
  });
}
