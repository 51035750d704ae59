// centrifuge (npm) in Node against the real holdfast binary: JSON and protobuf over WebSocket,
// and the client's fallbacks forced alone: HTTP-streaming (JSON and protobuf) and SSE (JSON).
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { EventSource } from 'eventsource';
import * as jsonSdk from 'centrifuge';
import * as protoSdk from 'centrifuge/build/protobuf';
import { Recorder, controlledNetwork, once, startServer, token } from './harness.mjs';

const rec = new Recorder('js-node', 'centrifuge-js (Node)');
let srv;
let insecure;

before(async () => {
  srv = await startServer();
  insecure = await startServer(undefined, ['--insecure']);
});

after(async () => {
  rec.write();
  await srv?.stop();
  await insecure?.stop();
});

let n = 0;
const uniq = (p) => `${p}_${process.pid}_${++n}`;

// [transport, encoding, SDK build]; the report's column is the encoding over WebSocket, or
// "<transport> (<encoding>)" for the emulated transports.
const MATRIX = [
  ['websocket', 'json', jsonSdk],
  ['websocket', 'protobuf', protoSdk],
  ['http_stream', 'json', jsonSdk],
  ['http_stream', 'protobuf', protoSdk],
  ['sse', 'json', jsonSdk],
];

for (const [transport, encoding, sdk] of MATRIX) {
  const { Centrifuge, UnauthorizedError } = sdk;
  const column = transport === 'websocket' ? encoding : `${transport} (${encoding})`;
  const clients = [];
  // Protobuf clients carry payloads as bytes; these JSON payloads travel as their UTF-8 text.
  const toData = (o) => (encoding === 'json' ? o : new TextEncoder().encode(JSON.stringify(o)));
  const fromData = (d) => (encoding === 'json' ? d : JSON.parse(new TextDecoder().decode(d)));
  // Protobuf clients give uint64 offsets as Long objects.
  const num = (x) => (x && typeof x.toNumber === 'function' ? x.toNumber() : x);
  // A client of `server` on this transport only; `net` (controlledNetwork) carries it.
  const make = (server, { net, ...opts } = {}) => {
    const endpoint =
      transport === 'websocket'
        ? server.ws
        : [{ transport, endpoint: `${server.http}/connection/${transport}` }];
    const c = new Centrifuge(endpoint, {
      websocket: net ? net.WebSocket : WebSocket,
      eventsource: net ? net.EventSource : EventSource,
      ...(net ? { fetch: net.fetch } : {}),
      emulationEndpoint: `${server.http}/emulation`,
      ...opts,
    });
    clients.push(c);
    return c;
  };
  // A test that also records a row of the compatibility matrix.
  const feature = (name, fn) =>
    test(`${name} [${column}]`, async () => {
      try {
        await fn();
        rec.add(name, column, 'pass');
      } catch (e) {
        rec.add(name, column, 'fail');
        throw e;
      } finally {
        for (const c of clients.splice(0)) c.disconnect();
      }
    });

  describe(`centrifuge-js ${column}`, () => {
    feature('connect with token', async () => {
      const c = make(srv, { token: token('42', 600) });
      c.connect();
      const ctx = await once(c, 'connected');
      assert.equal(ctx.client.length, 36);
      assert.equal(ctx.transport, transport);
    });

    feature('anonymous connect (insecure mode)', async () => {
      const c = make(insecure);
      c.connect();
      const ctx = await once(c, 'connected');
      assert.ok(ctx.client);
    });

    feature('subscribe and unsubscribe', async () => {
      const c = make(srv, { token: token('42') });
      const sub = c.newSubscription(uniq('sub'));
      const subscribed = once(sub, 'subscribed');
      sub.subscribe();
      c.connect();
      const ctx = await subscribed;
      assert.equal(ctx.recoverable, true);
      assert.equal(ctx.positioned, true);
      const unsub = once(sub, 'unsubscribed');
      sub.unsubscribe();
      assert.equal((await unsub).code, 0);
    });

    feature('publish and receive', async () => {
      const ch = uniq('pub');
      const c = make(srv, { token: token('42') });
      const sub = c.newSubscription(ch);
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      const got = once(sub, 'publication');
      await sub.publish(toData({ text: 'hello' }));
      const p = await got;
      assert.deepEqual(fromData(p.data), { text: 'hello' });
      assert.equal(p.info.user, '42');
      assert.equal(num(p.offset), 1);
      const fromApi = once(sub, 'publication');
      await srv.api('publish', { channel: ch, data: { from: 'api' } });
      assert.deepEqual(fromData((await fromApi).data), { from: 'api' });
    });

    feature('presence and presence stats', async () => {
      const ch = uniq('presence');
      const c = make(srv, { token: token('42') });
      const sub = c.newSubscription(ch);
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      const p = await sub.presence();
      const clients = Object.values(p.clients);
      assert.equal(clients.length, 1);
      assert.equal(clients[0].user, '42');
      const s = await sub.presenceStats();
      assert.deepEqual([s.numClients, s.numUsers], [1, 1]);
    });

    feature('history', async () => {
      const ch = uniq('history');
      for (let i = 1; i <= 5; i++) await srv.api('publish', { channel: ch, data: { i } });
      const c = make(srv, { token: token('42') });
      const sub = c.newSubscription(ch);
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      const all = await sub.history({ limit: -1 });
      assert.deepEqual(all.publications.map((p) => fromData(p.data).i), [1, 2, 3, 4, 5]);
      assert.equal(num(all.offset), 5);
      const page = await sub.history({ limit: 2, since: { offset: 2, epoch: all.epoch } });
      assert.deepEqual(page.publications.map((p) => num(p.offset)), [3, 4]);
      const rev = await sub.history({ limit: 2, reverse: true });
      assert.deepEqual(rev.publications.map((p) => num(p.offset)), [5, 4]);
    });

    feature('rpc without handler is 108', async () => {
      const c = make(srv, { token: token('42') });
      c.connect();
      await c.ready(10000);
      await assert.rejects(c.rpc('getPrice', { id: 1 }), (e) => e.code === 108);
    });

    feature('subscription token', async () => {
      const ch = `private:${uniq('tok')}`;
      const c = make(srv, { token: token('42') });
      const sub = c.newSubscription(`$${ch}`, { token: token('42', 600, { channel: `$${ch}` }) });
      sub.subscribe();
      c.connect();
      const ctx = await once(sub, 'subscribed');
      assert.equal(ctx.channel, `$${ch}`);
    });

    feature('token refresh via getToken (109)', async () => {
      let calls = 0;
      const c = make(srv, {
        token: token('42', -5),
        getToken: async () => {
          calls++;
          return token('42', 600);
        },
      });
      c.connect();
      await once(c, 'connected');
      assert.equal(calls, 1, 'expired token answered 109, the SDK fetched a new one');
      // A connection whose token expires refreshes it in place, without reconnecting.
      let refreshed;
      const refreshedCall = new Promise((r) => (refreshed = r));
      let n2 = 0;
      const d = make(srv, {
        token: token('43', 2),
        getToken: async () => {
          n2++;
          refreshed();
          return token('43', 600);
        },
      });
      let disconnects = 0;
      d.on('disconnected', () => disconnects++);
      d.on('connecting', () => disconnects++);
      d.connect();
      await once(d, 'connected');
      const before = disconnects;
      await refreshedCall;
      const sub = d.newSubscription(uniq('after-refresh'));
      sub.subscribe();
      await sub.ready(10000);
      assert.equal(n2, 1);
      assert.equal(disconnects, before, 'refreshed without reconnecting');
    });

    feature('connection unauthorized', async () => {
      const c = make(srv, {
        getToken: async () => {
          throw new UnauthorizedError('no');
        },
      });
      c.connect();
      const ctx = await once(c, 'disconnected');
      assert.equal(ctx.code, 1, 'disconnected: unauthorized');
      assert.equal(c.state, 'disconnected');
    });

    feature('subscription unauthorized', async () => {
      const c = make(srv, { token: token('42') });
      const sub = c.newSubscription(`$private:${uniq('u')}`, {
        getToken: async () => {
          throw new UnauthorizedError('no');
        },
      });
      sub.subscribe();
      c.connect();
      const ctx = await once(sub, 'unsubscribed');
      assert.equal(ctx.code, 1, 'unsubscribed: unauthorized');
    });

    feature('invalid subscription token is 103', async () => {
      const c = make(srv, { token: token('42') });
      const ch = `$private:${uniq('bad')}`;
      const sub = c.newSubscription(ch, { token: 'not-a-token' });
      sub.subscribe();
      c.connect();
      const ctx = await once(sub, 'unsubscribed');
      assert.equal(ctx.code, 103, 'unsubscribed with permission denied');
    });

    feature('recovery after the transport is dropped', async () => {
      const ch = uniq('recover');
      const net = controlledNetwork();
      const c = make(srv, { token: token('42'), net, minReconnectDelay: 50, maxReconnectDelay: 200 });
      const sub = c.newSubscription(ch);
      const got = [];
      sub.on('publication', (p) => got.push(fromData(p.data).i));
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      for (let i = 1; i <= 3; i++) await srv.api('publish', { channel: ch, data: { i } });
      while (got.length < 3) await once(sub, 'publication');
      net.offline = true;
      const lost = once(sub, 'subscribing');
      net.drop();
      await lost;
      for (let i = 4; i <= 8; i++) await srv.api('publish', { channel: ch, data: { i } });
      const back = once(sub, 'subscribed');
      net.offline = false;
      const ctx = await back;
      assert.equal(ctx.wasRecovering, true);
      assert.equal(ctx.recovered, true);
      while (got.length < 8) await once(sub, 'publication');
      await srv.api('publish', { channel: ch, data: { i: 9 } });
      while (got.length < 9) await once(sub, 'publication');
      assert.deepEqual(got, [1, 2, 3, 4, 5, 6, 7, 8, 9], 'missed publications exactly once, in order');
    });

    feature('unrecoverable position', async () => {
      const ch = `smallhistory:${uniq('small')}`;
      const net = controlledNetwork();
      const c = make(srv, { token: token('42'), net, minReconnectDelay: 50, maxReconnectDelay: 200 });
      const sub = c.newSubscription(ch);
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      net.offline = true;
      const lost = once(sub, 'subscribing');
      net.drop();
      await lost;
      for (let i = 1; i <= 5; i++) await srv.api('publish', { channel: ch, data: { i } });
      const back = once(sub, 'subscribed');
      net.offline = false;
      const ctx = await back;
      assert.equal(ctx.wasRecovering, true);
      assert.equal(ctx.recovered, false, 'told: the window was exceeded');
      const live = once(sub, 'publication');
      await srv.api('publish', { channel: ch, data: { i: 6 } });
      assert.equal(fromData((await live).data).i, 6, 'live delivery continues');
    });

    feature('server-side subscriptions and personal channel', async () => {
      const ch = uniq('server');
      const c = make(srv, { token: token('77', undefined, { channels: [ch] }) });
      const subscribed = [];
      c.on('subscribed', (ctx) => subscribed.push(ctx.channel));
      c.connect();
      await once(c, 'connected');
      assert.deepEqual(subscribed.sort(), ['#77', ch].sort());
      const p1 = once(c, 'publication', (p) => p.channel === '#77');
      await srv.api('publish', { channel: '#77', data: { to: 'you' } });
      assert.deepEqual(fromData((await p1).data), { to: 'you' });
      const p2 = once(c, 'publication', (p) => p.channel === ch);
      await srv.api('publish', { channel: ch, data: { to: 'all' } });
      assert.deepEqual(fromData((await p2).data), { to: 'all' });
    });

    feature('join and leave', async () => {
      const ch = uniq('jl');
      const a = make(srv, { token: token('a') });
      const sa = a.newSubscription(ch, { joinLeave: true });
      sa.subscribe();
      a.connect();
      await sa.ready(10000);
      const b = make(srv, { token: token('b') });
      const sb = b.newSubscription(ch);
      const joined = once(sa, 'join', (j) => j.info.user === 'b');
      sb.subscribe();
      b.connect();
      const j = await joined;
      assert.equal(j.info.user, 'b');
      const left = once(sa, 'leave', (l) => l.info.user === 'b');
      sb.unsubscribe();
      assert.equal((await left).info.user, 'b');
    });
  });
}
