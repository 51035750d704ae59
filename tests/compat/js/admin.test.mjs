// The embedded admin web UI (/admin/) and the development first page (/), in Debian's Chromium
// driven by playwright-core, against the real holdfast binary; centrifuge (npm) in Node plays the
// subscribed clients the UI shows and acts on. Screenshots go to artifacts/admin/<page>.png.
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import WebSocket from 'ws';
import { Centrifuge } from 'centrifuge';
import { chromium } from 'playwright-core';
import { API_KEY, CONFIG, ROOT, SECRET, once, startServer, token } from './harness.mjs';

const SHOTS = join(ROOT, 'artifacts', 'admin');
const PASSWORD = 'admin-pass';
const ADMIN_SECRET = 'admin-secret-0123456789';
const ADMIN_CONFIG = `${CONFIG}
[[channel.namespaces]]
name = "adminmap"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "recoverable"
key_ttl = "300s"

[admin]
enabled = true
password = "${PASSWORD}"
secret = "${ADMIN_SECRET}"
`;
/** The strict CSP the pages are written for: no inline script or style, same-origin connections. */
function assertCsp(headers) {
  const csp = headers['content-security-policy'] ?? '';
  for (const d of ["default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]) {
    assert.ok(csp.split(';').map((x) => x.trim()).includes(d), `CSP has ${d}: ${csp}`);
  }
  assert.ok(!csp.includes('unsafe-'), csp);
}

let plain; // the harness's default configuration: no admin, no --insecure
let srv; // admin enabled with a password
let browser;
const clients = [];
let n = 0;
const uniq = (p) => `${p}_${process.pid}_${++n}`;

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  [plain, srv] = await Promise.all([startServer(), startServer(ADMIN_CONFIG)]);
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  for (const c of clients.splice(0)) c.disconnect();
  await browser?.close();
  await Promise.all([plain?.stop(), srv?.stop()]);
});

afterEach(() => {
  for (const c of clients.splice(0)) c.disconnect();
});

/** A Node client of `server` for `user` (client name "js", the npm client's default). */
function connect(server, user) {
  const c = new Centrifuge(server.ws, { websocket: WebSocket, token: token(user) });
  clients.push(c);
  return c;
}

/** A connected client of `user` subscribed to `channel`: { c, sub, client (its id) }. */
async function subscriber(server, user, channel) {
  const c = connect(server, user);
  const sub = c.newSubscription(channel);
  const connected = once(c, 'connected');
  const subscribed = once(sub, 'subscribed');
  sub.subscribe();
  c.connect();
  const [ctx] = await Promise.all([connected, subscribed]);
  return { c, sub, client: ctx.client };
}

/** The first of several events of `emitter`: { name, ctx }. */
function firstOf(emitter, names, timeoutMs = 10000) {
  return new Promise((res, rej) => {
    const handlers = names.map((name) => [name, (ctx) => done(null, { name, ctx })]);
    const t = setTimeout(() => done(new Error(`timed out waiting for ${names.join(' or ')}`)), timeoutMs);
    function done(err, v) {
      clearTimeout(t);
      for (const [name, h] of handlers) emitter.removeListener(name, h);
      if (err) rej(err);
      else res(v);
    }
    for (const [name, h] of handlers) emitter.on(name, h);
  });
}

const post = (server, path, body, headers = {}) =>
  fetch(`${server.http}${path}`, { method: 'POST', headers: { 'Content-Type': 'application/json', ...headers }, body: JSON.stringify(body) });

/** A fresh page at 1200×800 that records CSP violations and uncaught errors. */
async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`uncaught: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/i.test(m.text())) problems.push(m.text());
  });
  return { context, page, problems };
}

const shot = (page, name) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });

/** Waits until the text of `selector` is exactly `want` (trimmed). */
const textIs = (page, selector, want) =>
  page.waitForFunction(([s, w]) => document.querySelector(s)?.textContent.trim() === w, [selector, want], { timeout: 10000 });

test('admin is off by default: /admin/ and its API answer 404', async () => {
  for (const path of ['/admin/', '/admin/app.js', '/admin/settings']) {
    assert.equal((await fetch(`${plain.http}${path}`)).status, 404, `GET ${path}`);
  }
  assert.equal((await post(plain, '/admin/auth', { password: PASSWORD })).status, 404, 'POST /admin/auth');
  assert.equal((await post(plain, '/admin/api/info', {})).status, 404, 'POST /admin/api/info');
});

test('admin enabled without a password and secret stays off, and says why', async () => {
  const s = await startServer(`${CONFIG}\n[admin]\nenabled = true\n`);
  try {
    assert.equal((await fetch(`${s.http}/admin/`)).status, 404);
    assert.equal((await post(s, '/admin/auth', { password: '' })).status, 404);
    const lines = s.log().split('\n');
    assert.ok(lines.some((l) => /admin/i.test(l) && /password/i.test(l)), `a log line names admin and password:\n${s.log()}`);
  } finally {
    await s.stop();
  }
});

test('admin login: bad passwords are refused, brute force is limited', async () => {
  const s = await startServer(ADMIN_CONFIG);
  try {
    for (let i = 1; i <= 5; i++) {
      const r = await post(s, '/admin/auth', { password: `wrong-${i}` });
      assert.equal(r.status, 401, `attempt ${i}`);
      assert.equal(typeof (await r.json()).error, 'string');
    }
    const r = await post(s, '/admin/auth', { password: 'wrong-6' });
    assert.equal(r.status, 429, 'the 6th bad attempt within a minute');
    assert.match(r.headers.get('retry-after') ?? '', /^\d+$/, 'Retry-After');
    assert.match((await r.json()).error, /too many/i);
  } finally {
    await s.stop();
  }
});

test('admin API needs the token from /admin/auth', async () => {
  assert.equal((await post(srv, '/admin/api/info', {})).status, 401, 'no Authorization');
  assert.equal((await post(srv, '/admin/api/info', {}, { Authorization: 'token forged.token.value' })).status, 401, 'a forged token');
  assert.equal((await post(srv, '/admin/trace', { channel: 'x' })).status, 401, 'trace without Authorization');
  const r = await post(srv, '/admin/auth', { password: PASSWORD });
  assert.equal(r.status, 200);
  const { token: t } = await r.json();
  assert.ok(t, 'a token');
  const info = await (await post(srv, '/admin/api/info', {}, { Authorization: `token ${t}` })).json();
  assert.ok(info.result.nodes.length >= 1, JSON.stringify(info));
  // The effective configuration never carries a secret, not even inside the JSON.
  const raw = await (await post(srv, '/admin/api/config', {}, { Authorization: `token ${t}` })).text();
  for (const secret of [SECRET, API_KEY, PASSWORD, ADMIN_SECRET]) assert.ok(!raw.includes(secret), `config leaks ${secret}`);
  assert.match(raw, /"hmac_secret_key":\s*"\*{8}"/);
});

describe('admin UI', () => {
  let context;
  let page;
  let problems;
  let settings;
  /** Same-document navigation to an admin page; waits for its heading. */
  const go = async (hash, heading) => {
    await page.evaluate((h) => {
      location.hash = h;
    }, hash);
    await page.locator('main h1', { hasText: heading }).waitFor();
  };

  before(async () => {
    settings = await (await fetch(`${srv.http}/admin/settings`)).json();
    ({ context, page, problems } = await newPage());
  });

  after(async () => {
    await context?.close();
  });

  afterEach(() => {
    assert.deepEqual(problems.splice(0), [], 'no CSP violations or uncaught errors');
  });

  test('login form: a wrong password shows an error, the right one (Enter) logs in', async () => {
    assert.equal(settings.insecure, false);
    assert.ok(settings.version && settings.node, JSON.stringify(settings));
    const resp = await page.goto(`${srv.http}/admin/`);
    assert.equal(resp.status(), 200);
    assertCsp(resp.headers());
    const password = page.locator('#password');
    await password.fill('wrong');
    await password.press('Enter');
    await page.locator('#login-error').filter({ hasText: /\S/ }).waitFor();
    assert.equal(await page.locator('#nav').isVisible(), false, 'no navigation before login');
    await shot(page, 'login');
    await password.fill(PASSWORD);
    await password.press('Enter');
    await page.locator('#nav a[href="#/channels"]').waitFor();
    await page.locator('#node-info', { hasText: settings.node }).waitFor();
  });

  test('nodes page: this node, refreshed live', async () => {
    await page.locator('#nav a[href="#/"]').click();
    await page.locator('#nodes tbody tr', { hasText: settings.node }).waitFor();
    await subscriber(srv, 'nodes-user', uniq('nodes'));
    const { nodes } = await srv.api('info', {});
    const want = String(nodes.find((x) => x.name === settings.node)?.num_clients ?? nodes[0].num_clients);
    // The page was open before the client connected: the count arrives by its refresh.
    await page.waitForFunction((w) => [...document.querySelectorAll('#nodes td.num-clients')].some((td) => td.textContent.trim() === w), want, { timeout: 10000 });
    await shot(page, 'nodes');
  });

  test('channels page: a subscribed channel with its count; the filter narrows the list; links to the channel', async () => {
    const mine = uniq('admin_chan');
    const other = uniq('admin_other');
    await subscriber(srv, 'chan-user', mine);
    await subscriber(srv, 'chan-user-2', other);
    await page.locator('#nav a[href="#/channels"]').click();
    const row = page.locator(`#channels tbody tr[data-channel="${mine}"]`);
    await row.waitFor();
    assert.deepEqual(await row.locator('td').allTextContents(), [mine, '1']);
    await page.locator(`#channels tbody tr[data-channel="${other}"]`).waitFor();
    await page.locator('#channel-filter').pressSequentially('admin_chan');
    await page.locator(`#channels tbody tr[data-channel="${other}"]`).waitFor({ state: 'detached' });
    await row.waitFor();
    await shot(page, 'channels');
    await page.locator('#channel-filter').fill('no-such-channel-anywhere');
    await page.locator('#channels', { hasText: /no channel/i }).waitFor();
    await page.locator('#channel-filter').fill(mine);
    await row.locator('a').click();
    await page.locator('main h1', { hasText: mine }).waitFor();
    assert.equal(new URL(page.url()).hash, `#/channel/${encodeURIComponent(mine)}`);
  });

  test('channel page: presence, history and paging to older publications', async () => {
    const channel = uniq('admin_hist');
    const { client } = await subscriber(srv, 'hist-user', channel);
    for (let i = 1; i <= 25; i++) await srv.api('publish', { channel, data: { text: `m${i}` } });
    await go(`#/channel/${encodeURIComponent(channel)}`, channel);
    await page.locator('#presence tbody tr', { hasText: client }).waitFor();
    await page.locator('#presence tbody tr', { hasText: 'hist-user' }).waitFor();
    await page.locator('#presence-stats', { hasText: /1 client/ }).waitFor();
    const rows = page.locator('#history tbody tr');
    await page.locator('#history tbody tr[data-offset="25"]').waitFor();
    assert.equal(await rows.count(), 20, 'a page of 20');
    assert.match(await rows.first().textContent(), /m25/);
    assert.match(await rows.last().textContent(), /m6\b/);
    await shot(page, 'channel');
    await page.locator('#history-older').click();
    await page.locator('#history tbody tr[data-offset="5"]').waitFor();
    assert.equal(await rows.count(), 5);
    assert.equal(await page.locator('#history tbody tr[data-offset="25"]').count(), 0);
    assert.match(await rows.last().textContent(), /m1\b/);
    await page.locator('#history-newest').click();
    await page.locator('#history tbody tr[data-offset="25"]').waitFor();
    assert.equal(await rows.count(), 20);
  });

  test('channel page: publish console (Ctrl+Enter and the button) reaches a subscriber exactly', async () => {
    const channel = uniq('admin_pub');
    const { sub } = await subscriber(srv, 'pub-user', channel);
    const got = [];
    sub.on('publication', (ctx) => got.push(ctx.data));
    await go(`#/channel/${encodeURIComponent(channel)}`, channel);
    const first = once(sub, 'publication');
    await page.locator('#publish-data').fill('{"text":"from admin"}');
    await page.locator('#publish-data').press('Control+Enter');
    assert.deepEqual((await first).data, { text: 'from admin' });
    await page.locator('#publish-result', { hasText: /offset 1\b/ }).waitFor();
    // Not JSON: an error next to the button and nothing published.
    await page.locator('#publish-data').fill('not json');
    await page.locator('#publish-send').click();
    await page.locator('#publish-result.error').waitFor();
    const second = once(sub, 'publication');
    await page.locator('#publish-data').fill('{"n": 2, "list": [1, "two"]}');
    await page.locator('#publish-send').click();
    await second;
    assert.deepEqual(got, [{ text: 'from admin' }, { n: 2, list: [1, 'two'] }]);
    await page.locator('#history tbody tr[data-offset="2"]').waitFor();
  });

  test('map channel page: state paged by key, recent changes, and the write console reaches a map subscriber', async () => {
    const channel = `adminmap:${uniq('board')}`;
    const key = (i) => `k${String(i).padStart(2, '0')}`;
    for (let i = 1; i <= 25; i++) await srv.api('map_publish', { channel, key: key(i), data: { n: i } });
    const c = connect(srv, 'map-user');
    const sub = c.newMapSubscription(channel);
    const mirror = {};
    sub.on('sync', (ctx) => {
      for (const e of ctx.entries) mirror[e.key] = e.data;
    });
    sub.on('update', (ctx) => {
      if (ctx.removed) delete mirror[ctx.key];
      else mirror[ctx.key] = ctx.data;
    });
    const synced = once(sub, 'sync');
    sub.subscribe();
    c.connect();
    await synced;
    await go(`#/channel/${encodeURIComponent(channel)}`, channel);
    // No stream sections on a map channel: its state instead.
    await page.locator('#map-state tbody tr[data-key="k01"]').waitFor();
    assert.equal(await page.locator('#history').count(), 0, 'no history table on a map channel');
    const rows = page.locator('#map-state tbody tr');
    assert.equal(await rows.count(), 20, 'a page of 20 keys');
    assert.match(await page.locator('#map-state tbody tr[data-key="k20"]').textContent(), /"n":20/);
    await page.locator('#map-stats', { hasText: /^25 keys · page 1 · stream top 25 · epoch \w+$/ }).waitFor();
    await page.locator('#map-stream tbody tr[data-offset="25"]', { hasText: 'k25' }).waitFor();
    await page.locator('#map-next').click();
    await page.locator('#map-state tbody tr[data-key="k25"]').waitFor();
    assert.equal(await rows.count(), 5, 'the last 5 keys');
    assert.equal(await page.locator('#map-next').isDisabled(), true, 'no page after the last');
    await page.locator('#map-first').click();
    await page.locator('#map-state tbody tr[data-key="k01"]').waitFor();
    // Set a key from the console: the subscriber's mirror gets it, the page shows it.
    const updated = once(sub, 'update');
    await page.locator('#map-key').fill('k03');
    await page.locator('#map-data').fill('{"n": 300, "by": "admin"}');
    await page.locator('#map-publish').click();
    assert.deepEqual((await updated).data, { n: 300, by: 'admin' });
    await page.locator('#map-result', { hasText: /Set at offset 26\b/ }).waitFor();
    await page.locator('#map-state tbody tr[data-key="k03"]', { hasText: '"by":"admin"' }).waitFor();
    await shot(page, 'channel-map');
    // Bad JSON is refused next to the button; a removal reaches the mirror and the stream.
    await page.locator('#map-data').fill('{oops');
    await page.locator('#map-publish').click();
    await page.locator('#map-result.error', { hasText: /Not valid JSON/ }).waitFor();
    const removed = once(sub, 'update');
    await page.locator('#map-key').fill('k04');
    await page.locator('#map-remove').click();
    assert.equal((await removed).removed, true);
    await page.locator('#map-stream tbody tr[data-offset="27"][data-change="removed"]', { hasText: 'k04' }).waitFor();
    await page.locator('#map-state tbody tr[data-key="k04"]').waitFor({ state: 'detached' });
    // Removing a key that is not there writes nothing and says so.
    await page.locator('#map-remove').click();
    await page.locator('#map-result.error', { hasText: /Nothing written \(key_mode\)/ }).waitFor();
    const { entries } = await srv.api('map_read_state', { channel, limit: 100 });
    const server = Object.fromEntries(entries.map((e) => [e.key, e.data]));
    assert.deepEqual(mirror, server, "the subscriber's mirror is the server's state");
    assert.equal(Object.keys(server).length, 24);
  });

  test('channel page: live trace of publications, subscribes and joins', async () => {
    const channel = uniq('admin_trace');
    await go(`#/channel/${encodeURIComponent(channel)}`, channel);
    await page.locator('#trace-start').click();
    await page.locator('#trace[data-state="running"]').waitFor({ state: 'attached' });
    await srv.api('publish', { channel, data: { text: 'traced message' } });
    await page.locator('#trace li[data-type="publication"]', { hasText: 'traced message' }).waitFor();
    const { client } = await subscriber(srv, 'trace-user', channel);
    await page.locator('#trace li[data-type="subscribe"]', { hasText: client }).waitFor();
    await page.locator('#trace li[data-type="join"]', { hasText: 'trace-user' }).waitFor();
    await shot(page, 'channel-trace');
    await page.locator('#trace-stop').click();
    await page.locator('#trace[data-state="stopped"]').waitFor({ state: 'attached' });
    assert.equal(await page.locator('#trace-start').isEnabled(), true);
  });

  test('user page: connections, user trace, Unsubscribe and Disconnect reach the client', async () => {
    const user = uniq('admin-user');
    const channel = uniq('admin_user_chan');
    const { c, sub, client } = await subscriber(srv, user, channel);
    // The nav's "go to user" box.
    await page.locator('#user-go').fill(user);
    await page.locator('#user-go').press('Enter');
    await page.locator('main h1', { hasText: user }).waitFor();
    const row = page.locator(`#connections tbody tr[data-client="${client}"]`);
    await row.waitFor();
    const cells = await row.locator('td').allTextContents();
    assert.equal(cells[0], client);
    assert.match(cells[1], /^websocket\b/);
    assert.match(cells[2], /^js\b/);
    assert.equal(cells[3], '127.0.0.1');
    assert.match(cells[5], new RegExp(channel));
    await shot(page, 'user');

    // Trace the user: a second connection connects, the API disconnects it.
    await page.locator('#trace-start').click();
    await page.locator('#trace[data-state="running"]').waitFor({ state: 'attached' });
    const c2 = connect(srv, user);
    const connected2 = once(c2, 'connected');
    c2.connect();
    const { client: client2 } = await connected2;
    await page.locator('#trace li[data-type="connect"]', { hasText: client2 }).waitFor();
    const gone2 = firstOf(c2, ['disconnected', 'connecting']);
    await srv.api('disconnect', { user, client: client2 });
    const { ctx: why2 } = await gone2;
    c2.disconnect();
    await page.locator('#trace li[data-type="disconnect"]', { hasText: client2 }).filter({ hasText: String(why2.code) }).waitFor();
    await shot(page, 'user-trace');
    await page.locator('#trace-stop').click();

    const unsubscribed = once(sub, 'unsubscribed');
    await row.locator(`button.unsubscribe[data-channel="${channel}"]`).click();
    await unsubscribed;
    await page.locator('#user-result', { hasText: /unsubscribed/i }).waitFor();
    await row.filter({ hasNotText: channel }).waitFor();

    const gone = firstOf(c, ['disconnected', 'connecting']);
    await row.locator('button.disconnect').click();
    await gone;
    await page.locator('#user-result', { hasText: /disconnected/i }).waitFor();
  });

  test('health page: engine ok', async () => {
    await page.locator('#nav a[href="#/health"]').click();
    await textIs(page, '#engine-status', 'ok');
    await page.locator('#consumers').waitFor();
    await shot(page, 'health');
  });

  test('config page: secrets redacted, never shown', async () => {
    await page.locator('#nav a[href="#/config"]').click();
    await page.locator('#config', { hasText: '"hmac_secret_key": "********"' }).waitFor();
    const html = await page.content();
    const text = await page.evaluate(() => document.body.innerText);
    for (const secret of [SECRET, API_KEY, PASSWORD, ADMIN_SECRET]) {
      assert.ok(!html.includes(secret) && !text.includes(secret), `the page shows ${secret}`);
    }
    await shot(page, 'config');
  });

  test('a rejected token (expired, server restarted) and logout bring back the login form', async () => {
    await page.evaluate(() => {
      for (const k of Object.keys(sessionStorage)) sessionStorage.setItem(k, 'forged.token.value');
    });
    await page.reload();
    await page.locator('#password').waitFor();
    await page.locator('#password').fill(PASSWORD);
    await page.locator('#password').press('Enter');
    await page.locator('#nav a[href="#/channels"]').waitFor();
    await page.locator('#logout').click();
    await page.locator('#password').waitFor();
    await page.reload();
    await page.locator('#password').waitFor();
    assert.equal(await page.locator('#nav').isVisible(), false);
  });
});

test('the first page: only with --insecure; connects, subscribes, publishes and receives', async () => {
  assert.equal((await fetch(`${plain.http}/`)).status, 404, 'no first page without --insecure');
  const config = CONFIG.replace(/\[client\.token\]\nhmac_secret_key = "[^"]*"\n/, '');
  assert.ok(!config.includes('[client.token]'));
  const s = await startServer(config, ['--insecure']);
  const { context, page, problems } = await newPage();
  try {
    const resp = await page.goto(`${s.http}/`);
    assert.equal(resp.status(), 200);
    assertCsp(resp.headers());
    assert.equal(await page.title(), 'Holdfast is running');
    await textIs(page, '#state', 'connected');
    await textIs(page, '#sub-state', 'subscribed');
    await page.locator('#message').fill('hello from the page');
    await page.locator('#publish').click();
    await page.locator('#messages li', { hasText: 'hello from the page' }).waitFor();
    await s.api('publish', { channel: 'news', data: { text: 'from the API' } });
    await page.locator('#messages li', { hasText: 'from the API' }).waitFor();
    assert.deepEqual(await page.locator('#messages li').allTextContents(), ['hello from the page', 'from the API']);
    const body = await page.evaluate(() => document.body.innerText);
    assert.match(body, /X-API-Key/);
    assert.match(body, /In production \/ answers 404/);
    await shot(page, 'first');
    assert.deepEqual(problems, [], 'no CSP violations or uncaught errors');
  } finally {
    await context.close();
    await s.stop();
  }
});
