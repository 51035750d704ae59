// Map subscriptions with centrifuge-js (`newMapSubscription`) against the real holdfast binary,
// JSON and protobuf: the paged snapshot (`sync`), updates and removals (`update`), client writes,
// key expiry, and after a network drop a catch-up from the change stream (recoverable mode) or a
// fresh snapshot (ephemeral mode, or a client too far behind). The judge is a mirror kept from the
// client's own events, compared with the server's `map_read_state`. Every test runs twice: on
// one node with the memory map broker, and on two nodes sharing a real redis-server (the Redis
// map broker): clients on one node, writes through the other's API, and after a network drop
// the client comes back on the other node.
import { after, before, describe, test } from 'node:test';
import { spawn, execFileSync } from 'node:child_process';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import * as jsonSdk from 'centrifuge';
import * as protoSdk from 'centrifuge/build/protobuf';
import { API_KEY, Recorder, SECRET, controlledNetwork, freePort, once, startServer, token } from './harness.mjs';

const rec = new Recorder('js-map', 'centrifuge-js (Node)');

const CONFIG = `
[client.token]
hmac_secret_key = "${SECRET}"

[http_api]
key = "${API_KEY}"

[channel.without_namespace]
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "state"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "persistent"
stream_size = 10
min_page_size = 1
allow_publish_for_subscriber = true
allow_remove_for_subscriber = true

[[channel.namespaces]]
name = "agents"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "recoverable"
key_ttl = "2s"
min_page_size = 1

[[channel.namespaces]]
name = "room"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "ephemeral"
key_ttl = "60s"
min_page_size = 1
`;

/** A redis-server without persistence on a free port: { port, stop() }. */
async function startRedis() {
  const port = await freePort();
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const deadline = Date.now() + 10000;
  for (;;) {
    try {
      if (execFileSync('redis-cli', ['-p', String(port), 'ping']).toString().trim() === 'PONG') break;
    } catch {}
    if (Date.now() > deadline) throw new Error('redis-server did not start');
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    stop: () => new Promise((r) => (proc.exitCode !== null ? r() : (proc.once('exit', r), proc.kill('SIGKILL')))),
  };
}

// The API node (writes, server state) and the node clients connect to first; one and the same
// with the memory engine.
const setups = {
  memory: { label: '', api: null, client: null },
  redis: { label: ' (Redis map broker, two nodes)', api: null, client: null, redis: null },
};
before(async () => {
  setups.memory.api = setups.memory.client = await startServer(`${CONFIG}\n[engine]\ntype = "memory"\n`);
  const redis = await startRedis();
  const cfg = `${CONFIG}\n[engine]\ntype = "redis"\n[engine.redis]\naddress = "redis://127.0.0.1:${redis.port}"\nprefix = "js-map-${process.pid}"\n`;
  Object.assign(setups.redis, { redis, api: await startServer(cfg), client: await startServer(cfg) });
});
after(async () => {
  rec.write();
  await Promise.all([setups.memory.api?.stop(), setups.redis.api?.stop(), setups.redis.client?.stop()]);
  await setups.redis.redis?.stop();
});

let n = 0;
const uniq = (p) => `${p}_${process.pid}_${++n}`;

/** The server's state of a map channel: key → data. */
async function serverState(srv, channel) {
  const out = {};
  let cursor = '';
  for (;;) {
    const r = await srv.api('map_read_state', { channel, cursor, limit: 1000 });
    for (const e of r.entries ?? []) out[e.key] = e.data;
    if (!r.cursor) return out;
    cursor = r.cursor;
  }
}

/** Waits until `cond()` holds (polling every 20 ms), or fails after `ms`. */
async function until(cond, what, ms = 10000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const ENCODINGS = [
  ['json', jsonSdk],
  ['protobuf', protoSdk],
];

for (const [setupName, setup] of Object.entries(setups)) for (const [encoding, sdk] of ENCODINGS) {
  const { Centrifuge } = sdk;
  // Writes and state reads go to the API node; clients connect to the client node.
  const srv = { api: (method, body) => setup.api.api(method, body) };
  const toData = (o) => (encoding === 'json' ? o : new TextEncoder().encode(JSON.stringify(o)));
  const fromData = (d) => (encoding === 'json' ? d : JSON.parse(new TextDecoder().decode(d)));
  const clients = [];
  const make = (opts = {}) => {
    const c = new Centrifuge(setup.client.ws, {
      websocket: WebSocket,
      token: token('42'),
      ...opts,
    });
    clients.push(c);
    return c;
  };
  /** A map subscription and the mirror its events keep. */
  const mirrored = (c, channel, opts = {}) => {
    const sub = c.newMapSubscription(channel, { pageSize: 2, ...opts });
    const m = { sub, state: {}, syncs: 0, updates: 0, recovered: [] };
    sub.on('sync', (ctx) => {
      m.syncs++;
      m.state = {};
      for (const e of ctx.entries) m.state[e.key] = fromData(e.data);
    });
    sub.on('update', (ctx) => {
      m.updates++;
      if (ctx.removed) delete m.state[ctx.key];
      else m.state[ctx.key] = fromData(ctx.data);
    });
    sub.on('subscribed', (ctx) => m.recovered.push(!!ctx.recovered));
    return m;
  };
  const equalsServer = async (m, channel, what) => {
    let want;
    const deadline = Date.now() + 10000;
    for (;;) {
      want = await serverState(srv, channel);
      if (JSON.stringify(sortKeys(m.state)) === JSON.stringify(sortKeys(want))) return;
      if (Date.now() > deadline) assert.deepEqual(m.state, want, what);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  /** A client on a network the test controls, with its map mirror synced. When the network
   * comes back after a drop it reaches the API node (another node with Redis). */
  const syncedOnNet = async (channel) => {
    const net = controlledNetwork();
    class Redirected extends net.WebSocket {
      constructor(url, protocols) {
        super(net.back ? setup.api.ws : url, protocols);
      }
    }
    const c = make({ websocket: Redirected, minReconnectDelay: 50, maxReconnectDelay: 200 });
    const m = mirrored(c, channel);
    m.sub.subscribe();
    c.connect();
    await once(m.sub, 'sync');
    return Object.assign(m, { net, c });
  };
  /** Cuts the mirror's network, runs `meanwhile`, brings the network back; resolves with the
   * subscription's next `event`. */
  const dropWhile = async (m, event, meanwhile) => {
    m.net.offline = true;
    const down = once(m.c, 'connecting');
    m.net.drop();
    await down;
    await meanwhile();
    const back = once(m.sub, event, () => true, 20000);
    m.net.back = true;
    m.net.offline = false;
    return back;
  };
  const sortKeys = (o) => Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : 1)));
  const feature = (name, fn) =>
    test(`${name}${setup.label} [${encoding}]`, async () => {
      try {
        await fn();
        rec.add(name + setup.label, encoding, 'pass');
      } catch (e) {
        rec.add(name + setup.label, encoding, 'fail');
        throw e;
      } finally {
        for (const c of clients.splice(0)) c.disconnect();
      }
    });

  describe(`map subscriptions, centrifuge-js ${encoding}${setup.label}`, () => {
    feature('map: paged snapshot (sync), then updates and removals', async () => {
      const ch = `state:${uniq('board')}`;
      for (let i = 0; i < 7; i++) await srv.api('map_publish', { channel: ch, key: `k${i}`, data: { v: i } });
      const c = make();
      const m = mirrored(c, ch);
      const synced = once(m.sub, 'sync');
      m.sub.subscribe();
      c.connect();
      const ctx = await synced;
      assert.equal(ctx.entries.length, 7, 'the whole state, paged two keys at a time');
      assert.deepEqual(m.state.k3, { v: 3 });
      await srv.api('map_publish', { channel: ch, key: 'k3', data: { v: 33 } });
      await srv.api('map_remove', { channel: ch, key: 'k4' });
      await srv.api('map_publish', { channel: ch, key: 'new', data: { v: 'n' } });
      await until(() => m.updates === 3, 'three updates');
      assert.deepEqual(m.state.k3, { v: 33 });
      assert.equal(m.state.k4, undefined);
      await equalsServer(m, ch, 'mirror after live updates');
      const stats = await srv.api('map_stats', { channel: ch });
      assert.equal(stats.num_keys, 7);
    });

    feature('map: client writes and removes keys where the namespace allows', async () => {
      const ch = `state:${uniq('status')}`;
      const c = make();
      const m = mirrored(c, ch);
      m.sub.subscribe();
      c.connect();
      await m.sub.ready(10000);
      await m.sub.publish('agent-1', toData({ status: 'running', progress: 10 }));
      await m.sub.publish('agent-2', toData({ status: 'idle' }));
      await m.sub.remove('agent-2');
      await until(() => m.updates === 3, 'own writes come back as updates');
      assert.deepEqual(m.state, { 'agent-1': { status: 'running', progress: 10 } });
      await equalsServer(m, ch, 'mirror after client writes');
      // Not allowed in a namespace without allow_publish_*: refused, nothing written.
      const other = `agents:${uniq('locked')}`;
      const s2 = c.newMapSubscription(other);
      s2.subscribe();
      await s2.ready(10000);
      await assert.rejects(s2.publish('x', toData({})), (e) => e.code === 103);
      assert.equal((await srv.api('map_stats', { channel: other })).num_keys, 0);
    });

    feature('map: expired keys reach subscribers as removals (key_ttl)', async () => {
      const ch = `agents:${uniq('ttl')}`;
      const c = make();
      const m = mirrored(c, ch);
      m.sub.subscribe();
      c.connect();
      await m.sub.ready(10000);
      await srv.api('map_publish', { channel: ch, key: 'a', data: { s: 1 } });
      await until(() => m.state.a !== undefined, 'the key arrives');
      const removed = once(m.sub, 'update', (u) => u.key === 'a' && u.removed, 8000);
      await removed;
      assert.deepEqual(m.state, {});
      assert.equal((await srv.api('map_stats', { channel: ch })).num_keys, 0);
    });

    feature('map: recoverable mode catches up from the stream after a network drop', async () => {
      const ch = `state:${uniq('recover')}`;
      for (let i = 0; i < 3; i++) await srv.api('map_publish', { channel: ch, key: `k${i}`, data: { v: i } });
      const m = await syncedOnNet(ch);
      const ctx = await dropWhile(m, 'subscribed', async () => {
        await srv.api('map_publish', { channel: ch, key: 'k0', data: { v: 100 } });
        await srv.api('map_remove', { channel: ch, key: 'k1' });
        await srv.api('map_publish', { channel: ch, key: 'k9', data: { v: 9 } });
      });
      assert.equal(ctx.recovered, true, 'caught up from the change stream');
      assert.equal(m.syncs, 1, 'no second snapshot');
      await equalsServer(m, ch, 'mirror after the catch-up');
    });

    feature('map: a client too far behind the stream gets a fresh snapshot', async () => {
      const ch = `state:${uniq('behind')}`;
      await srv.api('map_publish', { channel: ch, key: 'a', data: { v: 0 } });
      const m = await syncedOnNet(ch);
      await dropWhile(m, 'sync', async () => {
        // More changes than the stream keeps (stream_size = 10).
        for (let i = 0; i < 25; i++) await srv.api('map_publish', { channel: ch, key: `k${i % 4}`, data: { v: i } });
      });
      assert.equal(m.syncs, 2, 'a second snapshot');
      await equalsServer(m, ch, 'mirror after the snapshot');
    });

    feature('map: ephemeral mode takes a fresh snapshot after a network drop', async () => {
      const ch = `room:${uniq('who')}`;
      await srv.api('map_publish', { channel: ch, key: 'alice', data: { stage: 'intro' } });
      const m = await syncedOnNet(ch);
      await dropWhile(m, 'sync', async () => {
        await srv.api('map_publish', { channel: ch, key: 'bob', data: { stage: 'coding' } });
        await srv.api('map_remove', { channel: ch, key: 'alice' });
      });
      assert.deepEqual(m.state, { bob: { stage: 'coding' } });
      await equalsServer(m, ch, 'mirror after the snapshot');
    });

    feature('map: a stream subscription to a map channel is refused with 107', async () => {
      const ch = `state:${uniq('wrongtype')}`;
      const c = make();
      const sub = c.newSubscription(ch);
      const failed = once(sub, 'unsubscribed', () => true, 10000);
      sub.subscribe();
      c.connect();
      const ctx = await failed;
      assert.equal(ctx.code, 107);
    });
  });
}
