// The example apps (examples/*) in Debian's Chromium: each app's backend (FastAPI) and a real
// holdfast process, several browser contexts at once. Screenshots go to artifacts/examples/;
// with README_SCREENSHOTS=1 they also replace the ones in the examples' READMEs.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ROOT, freePort, startPostgres, startServer } from './harness.mjs';

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
async function startBackend(example, srv, env = {}, port = undefined) {
  port ??= await freePort();
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

/** The server drops a user's connections (the browser then goes through its reconnect logic). */
async function dropUser(srv, apiKey, user) {
  const r = await fetch(`${srv.http}/api/disconnect`, {
    method: 'POST',
    headers: { 'X-API-Key': apiKey, 'content-type': 'application/json' },
    body: JSON.stringify({ user, disconnect: { code: 3011, reason: 'network lost' } }),
  });
  assert.ok(r.ok, `disconnect: HTTP ${r.status}`);
}

async function exampleServer(example, extraArgs = []) {
  return startServer(readFileSync(join(ROOT, 'examples', example, 'config.toml'), 'utf8'), extraArgs);
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
    await dropUser(srv, 'notify-example-api-key-change-me', alice);
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

test('notify-outbox: a committed transaction notifies exactly once and in order, through a kill -9 of holdfast; a rolled-back one never does', async (t) => {
  const pg = await startPostgres();
  const data = mkdtempSync(join(tmpdir(), 'holdfast-notify-outbox-'));
  // The example's config with this database and a fresh disk engine directory; the restarted
  // holdfast gets the same port and directory.
  const config = readFileSync(join(ROOT, 'examples', 'notify-outbox', 'config.toml'), 'utf8').replace(/^dsn = .*$/m, `dsn = "${pg.dsn}"`);
  const args = ['--set', `engine.disk.path=${data}`];
  const port = await freePort();
  const addr = { http: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}/connection/websocket` };
  let app;
  let srv;
  let ctx;
  try {
    // The backend first: it creates its table and the outbox at startup, and never calls holdfast.
    app = await startBackend('notify-outbox', addr, { DATABASE_URL: pg.dsn });
    srv = await startServer(config, args, port);
    const alice = `alice${process.pid}`;
    ctx = await browser.newContext({ viewport: { width: 900, height: 1260 } });
    const page = await ctx.newPage();
    await page.goto(`${app.url}/?user=${alice}`);
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 15000 });

    // A burst of 30 transactions from the backend, every fifth one failing after both inserts
    // (rolled back). Holdfast is killed while it runs and restarted while it goes on.
    const committed = []; // [{i, id, text}] in commit order
    const rolledBack = [];
    let holdfastDown = false;
    const whileDown = []; // what the backend committed while holdfast was dead
    const send = async (i) => {
      const fail = i % 5 === 3;
      const text = `${fail ? 'rolled back' : 'committed'} ${i}`;
      const r = await fetch(`${app.url}/api/notify/${alice}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ text, fail }),
      });
      const body = await r.json();
      if (fail) {
        assert.equal(r.status, 409, JSON.stringify(body));
        assert.match(body.detail, /rolled back/);
        rolledBack.push(text);
      } else {
        assert.equal(r.status, 200, JSON.stringify(body));
        committed.push({ i, id: body.id, text });
        if (holdfastDown) whileDown.push(i);
      }
    };
    const gate = () => {
      let open;
      const p = new Promise((r) => (open = r));
      return Object.assign(p, { open });
    };
    const killed = gate(); // the burst waits here at 16 at the latest...
    const sentWhileDown = gate(); // ...then sends 16-22 while holdfast is dead...
    const restarting = gate(); // ...and 23-30 while it starts again and after.
    const burst = (async () => {
      for (let i = 1; i <= 30; i++) {
        if (i === 16) await killed;
        if (i === 23) {
          sentWhileDown.open();
          await restarting;
        }
        await send(i);
      }
    })();
    burst.catch(() => {}); // awaited below; a failure there must not count as unhandled meanwhile
    const holdfastUp = () => fetch(`${addr.http}/health`).then((r) => r.ok, () => false);

    // Once the page shows notifications arriving, holdfast dies: no shutdown at all, with
    // transactions committing around it (rows may be in the outbox, or stored and not deleted).
    await page.waitForFunction(() => document.querySelectorAll('li.notification').length >= 6, null, { timeout: 15000 });
    await srv.kill();
    holdfastDown = true;
    const [[pending]] = await pg.query('SELECT count(*) FROM holdfast_outbox');
    const onPage = await page.$$eval('li.notification', (els) => els.length);
    t.diagnostic(`killed after ${committed.length} commits: ${pending} row(s) in the outbox, ${onPage} notification(s) on the page`);
    killed.open();
    await page.waitForSelector('#state:not([data-state="connected"])', { timeout: 15000 });
    // The backend does not notice: its transactions keep committing while holdfast is down.
    await Promise.race([sentWhileDown, burst]);
    assert.equal(await holdfastUp(), false, 'holdfast was down while those were sent');
    assert.ok(whileDown.length >= 5, `committed while holdfast was down: ${whileDown}`);
    // Holdfast comes back on the same port and data directory while the burst goes on.
    holdfastDown = false;
    const restarted = startServer(config, args, port);
    restarting.open();
    srv = await restarted;
    await burst;
    assert.equal(committed.length, 24);
    assert.equal(rolledBack.length, 6);

    // Everything committed is published: the outbox drains, and the channel's history holds each
    // committed notification once, in commit order, and nothing rolled back.
    const deadline = Date.now() + 30000;
    while ((await pg.query('SELECT count(*) FROM holdfast_outbox'))[0][0] !== '0') {
      assert.ok(Date.now() < deadline, 'the outbox did not drain');
      await new Promise((r) => setTimeout(r, 50));
    }
    const hist = await fetch(`${srv.http}/api/history`, {
      method: 'POST',
      headers: { 'X-API-Key': 'notify-outbox-example-api-key-change-me', 'content-type': 'application/json' },
      body: JSON.stringify({ channel: `notify:#${alice}`, limit: -1 }),
    }).then((r) => r.json());
    const pubs = hist.result.publications;
    assert.deepEqual(pubs.map((p) => p.data.text), committed.map((c) => c.text), 'each committed one once, in order');
    assert.deepEqual(pubs.map((p) => p.data.id), committed.map((c) => c.id));
    assert.deepEqual(pubs.map((p) => p.offset), Array.from({ length: 24 }, (_, i) => i + 1));

    // The page reconnected by itself and shows exactly those, nothing twice.
    await page.waitForFunction(() => document.querySelectorAll('li.notification').length >= 24, null, { timeout: 30000 });
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 15000 });
    const shown = await page.$$eval('li.notification', (els) =>
      els.map((e) => ({ offset: +e.dataset.offset, id: +e.dataset.row, text: e.querySelector('.text').textContent })),
    );
    assert.deepEqual(shown.map((n) => n.offset), Array.from({ length: 24 }, (_, i) => i + 1), 'offsets 1..24, contiguous');
    assert.deepEqual(shown.map(({ id, text }) => ({ id, text })), committed.map(({ id, text }) => ({ id, text })));
    for (const text of rolledBack) assert.ok(!shown.some((n) => n.text === text), `${text} never shown`);
    assert.equal(await page.evaluate(() => document.body.dataset.duplicates || '0'), '0');
    assert.ok(+(await page.evaluate(() => document.body.dataset.connects)) >= 2, 'the page reconnected');
    await shot(page, 'notify-outbox', 'notify-outbox/screenshot.png');

    // The database agrees: the business rows are the committed ones; no row left in the outbox,
    // none set aside as poison.
    const rows = await pg.query(`SELECT id, text FROM notifications WHERE user_id = '${alice}' ORDER BY id`);
    assert.deepEqual(rows.map(([id, text]) => ({ id: +id, text })), committed.map(({ id, text }) => ({ id, text })));
    assert.deepEqual(await pg.query('SELECT count(*) FROM holdfast_outbox'), [['0']]);
    assert.deepEqual(await pg.query('SELECT count(*) FROM holdfast_outbox_dead_letter'), [['0']]);
    // The restarted holdfast published at least what was committed after the kill.
    const health = await fetch(`${srv.http}/health`).then((r) => r.json());
    const consumer = health.consumers.find((c) => c.name === 'notify_outbox');
    assert.equal(consumer.status, 'ok', JSON.stringify(consumer));
    assert.ok(consumer.processed >= committed.filter((c) => c.i >= 16).length, JSON.stringify(consumer));
    assert.equal(consumer.poison, 0);
    assert.doesNotMatch(app.log(), /Traceback|ERROR/);
  } finally {
    await ctx?.close();
    await app?.stop();
    await srv?.stop();
    await pg.stop();
    rmSync(data, { recursive: true, force: true });
  }
});

/** Chat messages on a page: [{offset, who, text}]. */
const chatLog = (page) =>
  page.$$eval('#log .msg', (els) =>
    els.map((e) => ({ offset: +e.dataset.offset, who: e.querySelector('.who').textContent, text: e.querySelector('.text').textContent })),
  );

test('chat (React): short tokens renew without reconnecting, 20 rapid messages render once in order, offline loses nothing', async () => {
  execFileSync(join(ROOT, 'examples', 'chat', 'build.sh'));
  const srv = await exampleServer('chat');
  // 3-second tokens: several renewals happen within the test.
  const app = await startBackend('chat', srv, { TOKEN_TTL: '3' });
  try {
    const room = `r${process.pid}`;
    const ctxA = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const ctxB = await browser.newContext({ viewport: { width: 900, height: 640 } });
    const a = await ctxA.newPage();
    const b = await ctxB.newPage();
    await Promise.all([a.goto(`${app.url}/?user=alice&room=${room}`), b.goto(`${app.url}/?user=bob&room=${room}`)]);
    for (const p of [a, b]) await p.waitForSelector('button:not([disabled])', { timeout: 15000 });

    // Twenty messages fired without waiting: each renders once, in the order sent, on both pages.
    await a.evaluate(() => {
      for (let i = 1; i <= 20; i++) window.chatSend(`rapid ${i}`);
    });
    const twenty = Array.from({ length: 20 }, (_, i) => `rapid ${i + 1}`);
    for (const p of [a, b]) {
      await p.waitForFunction(() => document.querySelectorAll('#log .msg').length >= 20, null, { timeout: 15000 });
      assert.deepEqual((await chatLog(p)).map((m) => m.text), twenty);
    }

    // Tokens live 3 s: wait for three renewals; the connection stayed the same one throughout.
    await a.waitForFunction(() => window.chatStats.tokens >= 4, null, { timeout: 30000 });
    const stats = await a.evaluate(() => ({ ...window.chatStats, clients: window.chatStats.clients.size }));
    assert.equal(stats.clients, 1, 'one connection: renewals do not reconnect');
    assert.equal(stats.disconnects, 0);
    // The page re-renders four times a second: still exactly one subscribe.
    assert.equal(stats.subscribeCalls, 1, 'no resubscribe on re-render');
    assert.equal(await a.$eval('#state', (e) => e.dataset.state), 'connected');

    // Alice goes offline (and the server drops her socket); Bob writes five messages.
    await ctxA.setOffline(true);
    await dropUser(srv, 'chat-example-api-key-change-me', 'alice');
    await a.waitForSelector('#state:not([data-state="connected"])', { timeout: 15000 });
    await b.evaluate(() => {
      for (let i = 1; i <= 5; i++) window.chatSend(`while alice was away ${i}`);
    });
    await b.waitForFunction(() => document.querySelectorAll('#log .msg').length >= 25, null, { timeout: 15000 });
    await shot(a, 'chat-offline');
    await ctxA.setOffline(false);
    await a.waitForSelector('#state[data-state="connected"]', { timeout: 30000 });
    await a.waitForFunction(() => document.querySelectorAll('#log .msg').length >= 25, null, { timeout: 15000 });
    await a.evaluate(() => window.chatSend('back online'));
    await a.waitForFunction(() => document.querySelectorAll('#log .msg').length >= 26, null, { timeout: 15000 });
    await b.waitForFunction(() => document.querySelectorAll('#log .msg').length >= 26, null, { timeout: 15000 });
    const logA = await chatLog(a);
    assert.deepEqual(logA, await chatLog(b), 'both pages show the same conversation');
    assert.deepEqual(logA.map((m) => m.offset), Array.from({ length: 26 }, (_, i) => i + 1), 'nothing lost, nothing twice');
    assert.equal(await a.evaluate(() => window.chatStats.duplicates), 0);
    assert.equal(await a.evaluate(() => window.chatStats.subscribeCalls), 1);
    await shot(a, 'chat', 'chat/screenshot.png');
    await ctxA.close();
    await ctxB.close();
  } finally {
    await app.stop();
    await srv.stop();
  }
});

/** Transcript entries on an interview page: [{offset, kind, text}]. */
const transcript = (page) =>
  page.$$eval('#transcript .entry', (els) =>
    els.map((e) => ({ offset: +e.dataset.offset, kind: e.classList.contains('question') ? 'question' : 'answer', text: e.querySelector('.text').textContent })),
  );

test('interview: both views see every question and answer; refresh and network loss continue exactly; the seed websockets check passes', async () => {
  const srv = await exampleServer('interview');
  const app = await startBackend('interview', srv);
  try {
    const iv = `iv${process.pid}`;
    const ctxI = await browser.newContext({ viewport: { width: 900, height: 600 } });
    const ctxC = await browser.newContext({ viewport: { width: 900, height: 600 } });
    const interviewer = await ctxI.newPage();
    const candidate = await ctxC.newPage();
    await Promise.all([
      interviewer.goto(`${app.url}/?role=interviewer&user=ann&interview=${iv}`),
      candidate.goto(`${app.url}/?role=candidate&user=carl&interview=${iv}`),
    ]);
    for (const p of [interviewer, candidate]) await p.waitForSelector('body[data-ready="1"]', { timeout: 15000 });
    const say = async (page, text) => {
      await page.fill('#text', text);
      await page.click('#send');
    };
    const waitEntries = (page, n) =>
      page.waitForFunction((n) => document.querySelectorAll('#transcript .entry').length >= n, n, { timeout: 30000 });
    // Who is in the room (a map_users channel the server keeps), as the page shows it.
    const present = (page, users) =>
      page.waitForSelector(`#present[data-users="${users}"]`, { timeout: 20000 });
    await Promise.all([present(interviewer, 'ann, carl'), present(candidate, 'ann, carl')]);

    await say(interviewer, 'Tell me about a production incident you handled.');
    await Promise.all([waitEntries(interviewer, 1), waitEntries(candidate, 1)]);
    await say(candidate, 'A WebSocket server that lost messages when users reconnected.');
    await Promise.all([waitEntries(interviewer, 2), waitEntries(candidate, 2)]);

    // The candidate refreshes: the transcript is back, exactly.
    await candidate.reload();
    await candidate.waitForSelector('body[data-ready="1"]', { timeout: 15000 });
    await waitEntries(candidate, 2);
    assert.deepEqual(await transcript(candidate), await transcript(interviewer));

    // The candidate's network dies; a question is asked meanwhile; the network comes back.
    await ctxC.setOffline(true);
    await dropUser(srv, 'interview-example-api-key-change-me', 'carl');
    await candidate.waitForSelector('#state:not([data-state="connected"])', { timeout: 15000 });
    await say(interviewer, 'How would you make that impossible?');
    await waitEntries(interviewer, 3);
    // The candidate has left the room for the interviewer once the entry's key_ttl passed.
    await present(interviewer, 'ann');
    await ctxC.setOffline(false);
    await waitEntries(candidate, 3);
    await Promise.all([present(interviewer, 'ann, carl'), present(candidate, 'ann, carl')]);
    await say(candidate, 'Number every message and let clients recover from their position.');
    await Promise.all([waitEntries(interviewer, 4), waitEntries(candidate, 4)]);

    // The interviewer refreshes too.
    await interviewer.reload();
    await interviewer.waitForSelector('body[data-ready="1"]', { timeout: 15000 });
    await waitEntries(interviewer, 4);
    const want = await transcript(interviewer);
    assert.deepEqual(want.map((e) => e.offset), [1, 2, 3, 4], 'every entry once, in order');
    assert.deepEqual(want.map((e) => e.kind), ['question', 'answer', 'question', 'answer']);
    assert.deepEqual(await transcript(candidate), want);
    assert.deepEqual(await candidate.evaluate(() => window.entries), [1, 2, 3, 4], 'nothing shown twice');
    await shot(interviewer, 'interview-interviewer', 'interview/interviewer.png');
    await shot(candidate, 'interview-candidate', 'interview/candidate.png');

    // The seed's own check: a plain websockets client, asyncio in debug mode.
    const check = execFileSync(PYTHON, [join(ROOT, 'examples', 'interview', 'check_websocket.py'), app.url, iv], {
      encoding: 'utf8',
    });
    assert.match(check, /ping: answered/);
    assert.match(check, /history: 4 entries/);
    assert.match(check, /no asyncio errors/);
    assert.doesNotMatch(app.log(), /Traceback|ERROR|Task exception/);
    await ctxI.close();
    await ctxC.close();
  } finally {
    await app.stop();
    await srv.stop();
  }
});

/** The agents conversation on a page: [{offset, kind, text}]. */
const conversation = (page) =>
  page.$$eval('#conv .e', (els) => els.map((e) => ({ offset: +e.dataset.offset, kind: e.className.slice(2), text: e.textContent })));

test('agents: browsers opened during an answer show the same conversation; errors reach the user; reconnect cycles; /health under 50 concurrent requests', async () => {
  const webPort = await freePort();
  const srv = await exampleServer('agents', ['--set', `rpc.proxy.endpoint=http://127.0.0.1:${webPort}/holdfast/rpc`]);
  const app = await startBackend('agents', srv, { AGENT_STEP: '0.25' }, webPort);
  const user = `u${process.pid}`;
  const contexts = [];
  const open = async () => {
    const ctx = await browser.newContext({ viewport: { width: 900, height: 700 } });
    contexts.push(ctx);
    const page = await ctx.newPage();
    await page.goto(`${app.url}/?user=${user}`);
    await page.waitForSelector('body[data-connected="1"]', { timeout: 15000 });
    return page;
  };
  const ask = async (page, text) => {
    await page.fill('#text', text);
    await page.click('button');
  };
  // An answer is complete when its answer (or error) entry is shown: `count` of them.
  const finished = (page, count) =>
    page.waitForFunction((n) => document.querySelectorAll('#conv .e.answer, #conv .e.error').length >= n, count, { timeout: 30000 });
  try {
    // Single browser: the question, six progress steps, the answer.
    const first = await open();
    await ask(first, 'What is exact recovery?');
    await finished(first, 1);
    let conv = await conversation(first);
    assert.deepEqual(conv.map((e) => e.kind), ['user', ...Array(6).fill('progress'), 'answer']);
    // Each agent's status (a map channel) ends "done" on the page that asked.
    const statesOf = (page) => page.evaluate(() => Object.fromEntries(Object.entries(window.agentStatus).map(([k, v]) => [k, v.state])));
    const allDone = { planner: 'done', researcher: 'done', writer: 'done' };
    await first.waitForFunction(() => ['planner', 'researcher', 'writer'].every((a) => window.agentStatus[a]?.state === 'done'), null, { timeout: 15000 });
    assert.equal(await first.$$eval('#agents .agent-card[data-state="done"]', (els) => els.length), 3);

    // Two browsers in sequence: the second one opened afterwards shows the same conversation,
    // and the agents' status from the map's snapshot.
    const second = await open();
    await finished(second, 1);
    assert.deepEqual(await conversation(second), conv);
    await second.waitForFunction(() => Object.keys(window.agentStatus).length === 3, null, { timeout: 15000 });
    assert.deepEqual(await statesOf(second), allDone);

    // Browsers opened while an answer streams: one, then three more (five in all).
    await ask(first, 'And what happens to a second browser tab?');
    await first.waitForFunction(() => document.querySelectorAll('#conv .e.progress').length >= 8, null, { timeout: 15000 });
    const during = [await open()];
    during.push(...(await Promise.all([open(), open()])));
    const pages = [first, second, ...during];
    assert.equal(pages.length, 5);
    await Promise.all(pages.map((p) => finished(p, 2)));
    conv = await conversation(first);
    assert.equal(conv.length, 16);
    assert.deepEqual(conv.map((e) => e.offset), Array.from({ length: 16 }, (_, i) => i + 1), 'in order, nothing twice');
    for (const p of pages) assert.deepEqual(await conversation(p), conv, 'every browser shows the same conversation');
    await shot(during[0], 'agents', 'agents/screenshot.png');

    // Error recovery: a failing agent is reported as a message; the next question works.
    await ask(second, 'Please fail for me');
    await Promise.all(pages.map((p) => finished(p, 3)));
    const failed = (await conversation(first)).at(-1);
    assert.equal(failed.kind, 'error');
    assert.match(failed.text, /could not finish/);
    // The failing agent's status says so in every browser, live.
    for (const p of pages) {
      await p.waitForFunction(() => window.agentStatus.researcher?.state === 'failed', null, { timeout: 15000 });
      assert.deepEqual(await statesOf(p), { planner: 'done', researcher: 'failed', writer: 'waiting' });
    }
    await ask(during[2], 'Recovered?');
    await Promise.all(pages.map((p) => finished(p, 4)));
    assert.equal((await conversation(first)).at(-1).kind, 'answer');
    await shot(first, 'agents-error-recovered');

    // Ten rapid reconnect cycles of one browser, while another asks: it ends connected with the
    // whole conversation, nothing twice.
    const asking = ask(first, 'One more, during reconnects');
    await during[1].evaluate(async () => {
      for (let i = 0; i < 10; i++) {
        window.agentsClient.disconnect();
        window.agentsClient.connect();
        await new Promise((r) => setTimeout(r, 20));
      }
    });
    await asking;
    await during[1].waitForSelector('#state[data-state="connected"]', { timeout: 15000 });
    await Promise.all(pages.map((p) => finished(p, 5)));
    conv = await conversation(first);
    for (const p of pages) assert.deepEqual(await conversation(p), conv);
    assert.deepEqual(conv.map((e) => e.offset), Array.from({ length: conv.length }, (_, i) => i + 1));

    // A second page follows the conversation with a plain EventSource on uni_sse (no SDK): it
    // shows the conversation so far, follows an answer live, and after its stream is cut in the
    // middle of the answer reconnects with its position: every entry once, in order.
    const ctxF = await browser.newContext({ viewport: { width: 900, height: 700 } });
    contexts.push(ctxF);
    const follow = await ctxF.newPage();
    await follow.goto(`${app.url}/follow?user=${user}`);
    await follow.waitForSelector('body[data-connected="1"]', { timeout: 15000 });
    await follow.waitForFunction((n) => window.offsets.length >= n, conv.length, { timeout: 15000 });
    const followed = ask(first, 'Followed by an EventSource');
    await follow.waitForFunction((n) => window.offsets.length >= n + 3, conv.length, { timeout: 15000 });
    await follow.evaluate(() => window.dropFollow());
    await followed;
    await Promise.all(pages.map((p) => finished(p, 6)));
    conv = await conversation(first);
    await follow.waitForFunction((n) => window.offsets.length >= n, conv.length, { timeout: 15000 });
    assert.deepEqual(await follow.evaluate(() => window.offsets), conv.map((e) => e.offset), 'EventSource page: every entry once, in order');
    assert.ok((await follow.evaluate(() => window.reconnects)) >= 1, 'the stream was cut and reopened');
    assert.equal(await follow.$$eval('#conv .e', (els) => els.length), conv.length);
    await shot(follow, 'agents-follow-eventsource');

    // /health answers 50 concurrent requests with the live counters.
    const health = await Promise.all(Array.from({ length: 50 }, () => fetch(`${srv.http}/health`).then(async (r) => [r.status, await r.json()])));
    for (const [status, body] of health) {
      assert.equal(status, 200);
      assert.equal(body.status, 'ok');
      assert.ok(body.connections >= 5, JSON.stringify(body));
      assert.ok(body.publications >= conv.length, JSON.stringify(body));
    }
    assert.doesNotMatch(app.log(), /Traceback|Task exception/);
  } finally {
    for (const c of contexts) await c.close();
    await app.stop();
    await srv.stop();
  }
});
