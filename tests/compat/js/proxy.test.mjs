// centrifuge-js over HTTP-streaming and SSE behind a real reverse proxy: Debian's nginx with its
// default buffering, round-robin over two holdfast nodes tied by Redis, no sticky sessions. The
// client's /emulation requests land on either node (the one that does not own the session
// forwards them); a rolling restart of both nodes under a steady publication rate loses nothing.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EventSource } from 'eventsource';
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';
import { CONFIG, freePort, once, startServer, token } from './harness.mjs';

let redis;
let redisPort;
let nginx;
let proxyUrl;
const ports = [];
const nodes = [];
const prefix = `proxy${process.pid}`;

const config = () =>
  CONFIG.replace('type = "memory"', `type = "redis"\n[engine.redis]\naddress = "redis://127.0.0.1:${redisPort}"\nprefix = "${prefix}"`);

function startProcess(cmd, args) {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stdout.on('data', (d) => (log += d));
  proc.stderr.on('data', (d) => (log += d));
  proc.log = () => log;
  return proc;
}

async function waitFor(what, check, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

before(async () => {
  redisPort = await freePort();
  redis = startProcess('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1']);
  await waitFor('redis', async () => {
    const { createConnection } = await import('node:net');
    return new Promise((res) => {
      const s = createConnection(redisPort, '127.0.0.1', () => {
        s.end();
        res(true);
      });
      s.on('error', () => res(false));
    });
  });
  for (let i = 0; i < 2; i++) {
    ports.push(await freePort());
    nodes.push(await startServer(config(), [], ports[i]));
  }
  const proxyPort = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'holdfast-nginx-'));
  // Debian's defaults for what matters here: proxy_buffering on, HTTP/1.0 upstream requests
  // unless told otherwise. Only what a WebSocket deployment needs anyway is set.
  writeFileSync(
    join(dir, 'nginx.conf'),
    `${process.getuid?.() === 0 ? 'user root;' : ''}
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  upstream holdfast {
    server 127.0.0.1:${ports[0]} max_fails=0;
    server 127.0.0.1:${ports[1]} max_fails=0;
  }
  server {
    listen 127.0.0.1:${proxyPort};
    location / {
      proxy_pass http://holdfast;
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_next_upstream error timeout http_502 http_503;
    }
  }
}
`,
  );
  const bin = existsSync('/usr/sbin/nginx') ? '/usr/sbin/nginx' : 'nginx';
  nginx = startProcess(bin, ['-p', dir, '-c', join(dir, 'nginx.conf'), '-g', 'daemon off;']);
  proxyUrl = `http://127.0.0.1:${proxyPort}`;
  await waitFor('nginx', async () => (await fetch(`${proxyUrl}/ready`)).status === 200);
});

after(async () => {
  nginx?.kill('SIGTERM');
  for (const n of nodes) await n?.stop();
  redis?.kill('SIGTERM');
});

const clients = [];
function client(transport, user, opts = {}) {
  const c = new Centrifuge([{ transport, endpoint: `${proxyUrl}/connection/${transport}` }], {
    token: token(user),
    eventsource: EventSource,
    emulationEndpoint: `${proxyUrl}/emulation`,
    minReconnectDelay: 50,
    maxReconnectDelay: 300,
    ...opts,
  });
  clients.push(c);
  return c;
}

async function forwarded() {
  let sum = 0;
  for (const n of nodes) {
    const text = await (await fetch(`${n.http}/metrics`)).text();
    const m = text.match(/^holdfast_emulation_forwarded_total (\d+)/m);
    sum += m ? Number(m[1]) : 0;
  }
  return sum;
}

for (const transport of ['http_stream', 'sse']) {
  test(`nginx, two nodes (${transport}): the protocol works through /emulation requests on either node`, async () => {
    const before = await forwarded();
    const ch = `proxy_${transport}_${process.pid}`;
    const c = client(transport, `p-${transport}`);
    const sub = c.newSubscription(ch);
    sub.subscribe();
    c.connect();
    await sub.ready(10000);
    // Several commands: round robin sends about half of them to the node without the session.
    for (let i = 1; i <= 6; i++) {
      const got = once(sub, 'publication', (p) => p.data.i === i);
      await sub.publish({ i });
      await got;
    }
    const h = await sub.history({ limit: 10 });
    assert.deepEqual(h.publications.map((p) => p.data.i), [1, 2, 3, 4, 5, 6]);
    const p = await sub.presence();
    assert.equal(Object.values(p.clients)[0].user, `p-${transport}`);
    assert.ok((await forwarded()) > before, 'some /emulation requests were forwarded between nodes');
    c.disconnect();
  });
}

test('nginx, two nodes: a rolling restart under load loses nothing on HTTP-streaming and SSE', async () => {
  const ch = `roll_${process.pid}`;
  const subs = [];
  for (const [k, transport] of ['http_stream', 'http_stream', 'sse', 'sse'].entries()) {
    const c = client(transport, `roll-${k}`);
    const sub = c.newSubscription(ch);
    const got = [];
    sub.on('publication', (p) => got.push(p.data.i));
    const recoveries = [];
    sub.on('subscribed', (ctx) => ctx.wasRecovering && recoveries.push(ctx.recovered));
    sub.subscribe();
    c.connect();
    await sub.ready(10000);
    subs.push({ transport, got, c, recoveries });
  }
  const total = 300;
  let published = 0;
  // Publications go straight to whichever node is not restarting, ~100 per second.
  let target = 1;
  const publishing = (async () => {
    while (published < total) {
      const r = await fetch(`${nodes[target].http}/api/publish`, {
        method: 'POST',
        headers: { 'X-API-Key': 'compat-api-key', 'Content-Type': 'application/json' },
        body: JSON.stringify({ channel: ch, data: { i: published + 1 } }),
      });
      const j = await r.json();
      assert.ok(j.result, JSON.stringify(j));
      published++;
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  for (const i of [0, 1]) {
    await waitFor('some publications', async () => published >= (i + 1) * 80);
    target = 1 - i;
    await nodes[i].stop();
    nodes[i] = await startServer(config(), [], ports[i]);
  }
  await publishing;
  await waitFor('every subscriber has every publication', async () => subs.every((s) => s.got.length >= total), 30000);
  const want = Array.from({ length: total }, (_, i) => i + 1);
  for (const s of subs) {
    assert.deepEqual(s.got, want, `${s.transport}: every publication once, in order`);
    // Both nodes restarted: every client lost its node at least once and recovered.
    assert.ok(s.recoveries.length >= 1, `${s.transport}: reconnected and recovered`);
    assert.ok(s.recoveries.every((r) => r === true), `${s.transport}: every recovery complete`);
  }
  for (const s of subs) s.c.disconnect();
});

after(() => {
  for (const c of clients) c.disconnect();
});

test('two nodes on Redis: delta compression continues when a client moves to the other node', async () => {
  const ch = `delta:${prefix}_moves`;
  // The client's socket goes where `at` says: it starts on node 0 and moves to node 1.
  let at = 0;
  const open = new Set();
  class Moving extends WebSocket {
    constructor(_url, protocols) {
      super(`ws://127.0.0.1:${ports[at]}/connection/websocket`, protocols);
      open.add(this);
      this.on('close', () => open.delete(this));
    }
  }
  const c = new Centrifuge('ws://unused/connection/websocket', {
    websocket: Moving,
    token: token('42'),
    minReconnectDelay: 50,
    maxReconnectDelay: 200,
  });
  clients.push(c);
  const sub = c.newSubscription(ch, { delta: 'fossil' });
  const got = [];
  sub.on('publication', (ctx) => got.push(ctx.data));
  sub.subscribe();
  c.connect();
  await sub.ready(10000);
  let text = 'An answer streamed whole, growing by a few words each time:';
  const want = [];
  const publish = async (node, k) => {
    for (let i = 0; i < k; i++) {
      text += ` word${want.length}`;
      const data = { n: want.length, text };
      want.push(data);
      const r = await nodes[node].api('publish', { channel: ch, data, delta: true });
      assert.ok(r.offset > 0);
    }
  };
  // Published through node 1, delivered by node 0 (through Redis).
  await publish(1, 10);
  await waitFor('ten publications', async () => got.length >= 10);
  // The client moves to node 1; what is published while it moves comes back recovered, and live
  // publications on node 1 continue the chain from the last recovered one.
  const back = once(sub, 'subscribed', (x) => x.wasRecovering, 20000);
  at = 1;
  for (const s of open) s.terminate();
  await publish(0, 5);
  const ctx = await back;
  assert.equal(ctx.recovered, true);
  await publish(0, 10);
  await waitFor('every publication', async () => got.length >= want.length);
  assert.deepEqual(got, want);
  const st = sub.deltaStats();
  assert.ok(st.numFullPayloads <= 2, JSON.stringify(st));
  assert.ok(st.numDeltaPayloads >= want.length - 2, JSON.stringify(st));
  c.disconnect();
});

