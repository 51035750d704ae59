// The example apps (examples/*) in Debian's Chromium: each app's backend (FastAPI) and a real
// holdfast process, several browser contexts at once. Screenshots go to artifacts/examples/;
// with README_SCREENSHOTS=1 they also replace the ones in the examples' READMEs.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ROOT, freePort, startServer } from './harness.mjs';

const PYTHON = process.env.PYTHON || join(ROOT, 'tests', 'compat', '.venv', 'bin', 'python');
const SHOTS = join(ROOT, 'artifacts', 'examples');
let browser;

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
});

/** Starts an example's FastAPI backend (uvicorn) against a holdfast server. */
async function startBackend(example, srv, env = {}) {
  const port = await freePort();
  const proc = spawn(PYTHON, ['-m', 'uvicorn', 'app:app', '--host', '127.0.0.1', '--port', String(port)], {
    cwd: join(ROOT, 'examples', example),
    env: { ...process.env, HOLDFAST_API: srv.http, HOLDFAST_WS: srv.ws, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  proc.stdout.on('data', (d) => (log += d));
  proc.stderr.on('data', (d) => (log += d));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${example} backend exited:\n${log}`);
    try {
      if ((await fetch(url)).ok) break;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${example} backend not up:\n${log}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url,
    log: () => log,
    async post(path, body) {
      const r = await fetch(url + path, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      if (!r.ok) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
      return r.json();
    },
    async stop() {
      if (proc.exitCode !== null) return;
      const done = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await done;
    },
  };
}

async function exampleServer(example) {
  return startServer(readFileSync(join(ROOT, 'examples', example, 'config.toml'), 'utf8'));
}

async function shot(page, name, readme) {
  const path = join(SHOTS, `${name}.png`);
  await page.screenshot({ path });
  if (readme && process.env.README_SCREENSHOTS === '1') copyFileSync(path, join(ROOT, 'examples', readme));
}

/** Notifications on the page: [{offset, text, tag}]. */
const notifications = (page) =>
  page.$$eval('li.notification', (els) =>
    els.map((e) => ({ offset: +e.dataset.offset, text: e.querySelector('.text').textContent, tag: e.querySelector('.tag').textContent })),
  );

test('notify: messages sent before the page opens are shown on connect, live ones after, none twice', async () => {
  const srv = await exampleServer('notify');
  const app = await startBackend('notify', srv);
  try {
    const alice = `alice${process.pid}`;
    const bob = `bob${process.pid}`;
    // Cold start: the backend sends before alice has ever connected. No error, no retry.
    for (let i = 1; i <= 3; i++) {
      const r = await app.post(`/api/notify/${alice}`, { text: `sent before the page opened (${i})` });
      assert.equal(r.offset, i);
    }
    await app.post(`/api/notify/${bob}`, { text: 'for bob only' });

    const ctxA = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const ctxB = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const a = await ctxA.newPage();
    const b = await ctxB.newPage();
    await Promise.all([a.goto(`${app.url}/?user=${alice}`), b.goto(`${app.url}/?user=${bob}`)]);
    // The connection confirmation is visible, and the stored messages arrived, in order.
    await a.waitForSelector('#state[data-state="connected"]', { timeout: 15000 });
    assert.match(await a.textContent('#confirmation'), new RegExp(`Connected as ${alice}`));
    await a.waitForFunction(() => document.querySelectorAll('li.notification').length >= 3, null, { timeout: 15000 });
    let got = await notifications(a);
    assert.deepEqual(got.map((n) => n.offset), [1, 2, 3]);
    assert.deepEqual(got.map((n) => n.tag), ['sent while away', 'sent while away', 'sent while away']);
    // Live delivery.
    await app.post(`/api/notify/${alice}`, { text: 'sent while the page is open' });
    await a.waitForFunction(() => document.querySelectorAll('li.notification').length >= 4, null, { timeout: 15000 });
    assert.equal((await notifications(a))[3].tag, 'live');

    // Offline: the network goes away and the server drops the socket; two messages are sent
    // meanwhile. Back online, they arrive exactly once, after the others.
    await ctxA.setOffline(true);
    const api = await fetch(`${srv.http}/api/disconnect`, {
      method: 'POST',
      headers: { 'X-API-Key': 'notify-example-api-key-change-me', 'content-type': 'application/json' },
      body: JSON.stringify({ user: alice, disconnect: { code: 3011, reason: 'network lost' } }),
    });
    assert.ok(api.ok);
    await a.waitForSelector('#state:not([data-state="connected"])', { timeout: 15000 });
    await app.post(`/api/notify/${alice}`, { text: 'sent while offline (1)' });
    await app.post(`/api/notify/${alice}`, { text: 'sent while offline (2)' });
    await ctxA.setOffline(false);
    await a.waitForFunction(() => document.querySelectorAll('li.notification').length >= 6, null, { timeout: 30000 });
    await a.waitForSelector('#state[data-state="connected"]', { timeout: 15000 });
    got = await notifications(a);
    assert.deepEqual(got.map((n) => n.offset), [1, 2, 3, 4, 5, 6], 'exactly once, in order');
    assert.equal(await a.evaluate(() => document.body.dataset.duplicates || '0'), '0');
    await shot(a, 'notify', 'notify/screenshot.png');

    // A reload shows the same six (from history), nothing twice.
    await a.reload();
    await a.waitForFunction(() => document.querySelectorAll('li.notification').length >= 6, null, { timeout: 15000 });
    assert.deepEqual((await notifications(a)).map((n) => n.offset), [1, 2, 3, 4, 5, 6]);
    await shot(a, 'notify-reloaded');

    // Bob's page saw only Bob's message.
    await b.waitForFunction(() => document.querySelectorAll('li.notification').length >= 1, null, { timeout: 15000 });
    assert.deepEqual((await notifications(b)).map((n) => n.text), ['for bob only']);

    // Nowhere a "no connections for user" error, nor a server-side failure.
    for (const log of [srv.log(), app.log()]) {
      assert.doesNotMatch(log, /no (websocket )?connections? (found )?for user/i);
      assert.doesNotMatch(log, /Traceback|ERROR/);
    }
    await ctxA.close();
    await ctxB.close();
  } finally {
    await app.stop();
    await srv.stop();
  }
});
