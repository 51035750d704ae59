// What today's centrifuge-js asks for beyond plain streams, against the real holdfast binary:
// fossil delta compression (also after recovery and a restart of the disk engine), tag filters,
// channel compaction, latest-state publishing and state invalidation. JSON and protobuf over
// WebSocket; the client's own decoder and delta statistics are the judge.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';
import * as jsonSdk from 'centrifuge';
import * as protoSdk from 'centrifuge/build/protobuf';
import { API_KEY, Recorder, SECRET, controlledNetwork, freePort, once, startServer, token } from './harness.mjs';

const rec = new Recorder('js-features', 'centrifuge-js (Node)');

const config = (engine) => `
[client.token]
hmac_secret_key = "${SECRET}"

[http_api]
key = "${API_KEY}"

${engine}

[channel.without_namespace]
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "delta"
allowed_delta_types = ["fossil"]
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "deltapub"
allowed_delta_types = ["fossil"]
delta_publish = true
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "tags"
allow_tags_filter = true
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "compact"
allow_channel_compaction = true
join_leave = true
force_push_join_leave = true
presence = true
allow_subscribe_for_client = true
`;

let srv;
let diskPort;
let diskDir;
before(async () => {
  srv = await startServer(config('[engine]\ntype = "memory"'));
  diskPort = await freePort();
  diskDir = mkdtempSync(join(tmpdir(), 'holdfast-delta-disk-'));
});
after(async () => {
  rec.write();
  await srv?.stop();
});

const diskConfig = () => config(`[engine]\ntype = "disk"\n\n[engine.disk]\npath = "${diskDir}"`);

let n = 0;
const uniq = (p) => `${p}_${process.pid}_${++n}`;

// A seeded generator: the same "answers" every run.
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}
const WORDS = ['the', 'answer', 'grows', 'by', 'a', 'few', 'words', 'héllo', 'wörld', '✓', '日本', 'token', 'stream'];
/** Payloads shaped like an AI answer streamed whole: each the previous plus a few words, with an
 * occasional edit in the middle. */
function answers(count, seed) {
  const r = rng(seed);
  const out = [];
  // Long enough from the first that a delta is smaller than the payload.
  let text = 'Here is what I found about your question, in a few paragraphs:';
  for (let i = 0; i < count; i++) {
    const k = 1 + Math.floor(r() * 4);
    for (let j = 0; j < k; j++) text += ` ${WORDS[Math.floor(r() * WORDS.length)]}`;
    if (i % 7 === 6 && text.length > 20) {
      const at = Math.floor(r() * (text.length - 10));
      text = text.slice(0, at) + 'EDIT' + text.slice(at + 4);
    }
    out.push({ i, text, done: i === count - 1 });
  }
  return out;
}

const ENCODINGS = [
  ['json', jsonSdk],
  ['protobuf', protoSdk],
];

for (const [encoding, sdk] of ENCODINGS) {
  const { Centrifuge } = sdk;
  const toData = (o) => (encoding === 'json' ? o : new TextEncoder().encode(JSON.stringify(o)));
  const fromData = (d) => (encoding === 'json' ? d : JSON.parse(new TextDecoder().decode(d)));
  const num = (x) => (x && typeof x.toNumber === 'function' ? x.toNumber() : x);
  const clients = [];
  const make = (url, opts = {}) => {
    const c = new Centrifuge(url, { websocket: WebSocket, ...opts });
    clients.push(c);
    return c;
  };
  const feature = (name, fn) =>
    test(`${name} [${encoding}]`, async () => {
      try {
        await fn();
        rec.add(name, encoding, 'pass');
      } catch (e) {
        rec.add(name, encoding, 'fail');
        throw e;
      } finally {
        for (const c of clients.splice(0)) c.disconnect();
      }
    });
  /** Publications of `sub` until `count` arrived. */
  const collect = (sub, count, timeoutMs = 15000) =>
    new Promise((res, rej) => {
      const got = [];
      const t = setTimeout(() => rej(new Error(`got ${got.length} of ${count} publications`)), timeoutMs);
      sub.on('publication', (ctx) => {
        got.push(ctx);
        if (got.length === count) {
          clearTimeout(t);
          res(got);
        }
      });
    });

  describe(`protocol features, centrifuge-js ${encoding}`, () => {
    feature('fossil delta compression', async () => {
      const ch = `delta:${uniq('answer')}`;
      const c = make(srv.ws, { token: token('42') });
      const sub = c.newSubscription(ch, { delta: 'fossil' });
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      assert.equal(sub._delta_negotiated, true, 'the subscribe result says delta: true');
      const want = answers(40, 7);
      const got = collect(sub, want.length);
      for (const a of want) await srv.api('publish', { channel: ch, data: a, delta: true });
      const pubs = await got;
      assert.deepEqual(pubs.map((p) => fromData(p.data)), want);
      const st = sub.deltaStats();
      assert.equal(st.numFullPayloads, 1, 'only the first publication in full');
      assert.equal(st.numDeltaPayloads, want.length - 1);
      assert.ok(st.compressionRatio > 0.5, `compression ratio ${st.compressionRatio}`);
    });

    feature('delta only where the publisher allows it (API delta, delta_publish)', async () => {
      const ch = `delta:${uniq('mixed')}`;
      const c = make(srv.ws, { token: token('42') });
      const sub = c.newSubscription(ch, { delta: 'fossil' });
      const pubCh = `deltapub:${uniq('always')}`;
      const sub2 = c.newSubscription(pubCh, { delta: 'fossil' });
      sub.subscribe();
      sub2.subscribe();
      c.connect();
      await Promise.all([sub.ready(10000), sub2.ready(10000)]);
      const want = answers(6, 3);
      const got = collect(sub, 6);
      const got2 = collect(sub2, 6);
      for (const [i, a] of want.entries()) {
        await srv.api('publish', { channel: ch, data: a, delta: i % 2 === 1 });
        await srv.api('publish', { channel: pubCh, data: a });
      }
      assert.deepEqual((await got).map((p) => fromData(p.data)), want);
      assert.deepEqual((await got2).map((p) => fromData(p.data)), want);
      assert.equal(sub.deltaStats().numDeltaPayloads, 3, 'publications without delta go in full');
      assert.equal(sub2.deltaStats().numDeltaPayloads, 5, 'delta_publish makes every publication eligible');
    });

    feature('delta not negotiated where the namespace does not allow it', async () => {
      const ch = uniq('nodelta');
      const c = make(srv.ws, { token: token('42') });
      const sub = c.newSubscription(ch, { delta: 'fossil' });
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      assert.equal(sub._delta_negotiated, false);
      const got = once(sub, 'publication');
      await srv.api('publish', { channel: ch, data: { plain: true }, delta: true });
      assert.deepEqual(fromData((await got).data), { plain: true });
    });

    feature('delta after recovery and a restart (disk engine)', async () => {
      let disk = await startServer(diskConfig(), [], diskPort);
      try {
        const ch = `delta:${uniq('restart')}`;
        const want = answers(32, 11);
        const net = controlledNetwork();
        const c = make(disk.ws, { token: token('42'), websocket: net.WebSocket, minReconnectDelay: 50, maxReconnectDelay: 200 });
        const sub = c.newSubscription(ch, { delta: 'fossil' });
        const got = collect(sub, want.length, 30000);
        sub.subscribe();
        c.connect();
        await sub.ready(10000);
        const held = async (k) => {
          while (sub.deltaStats().numPublications < k) await new Promise((r) => setTimeout(r, 20));
        };
        for (const a of want.slice(0, 8)) await disk.api('publish', { channel: ch, data: a, delta: true });
        await held(8);
        // The server restarts while the client is kept away; what is published meanwhile comes
        // back as a recovered delta chain in the subscribe reply.
        net.offline = true;
        const down = once(c, 'connecting');
        await disk.stop();
        await down;
        disk = await startServer(diskConfig(), [], diskPort);
        for (const a of want.slice(8, 16)) await disk.api('publish', { channel: ch, data: a, delta: true });
        let back = once(sub, 'subscribed', (ctx) => ctx.wasRecovering, 20000);
        net.offline = false;
        let ctx = await back;
        assert.equal(ctx.recovered, true);
        // Live publications continue from the last recovered one.
        for (const a of want.slice(16, 24)) await disk.api('publish', { channel: ch, data: a, delta: true });
        await held(24);
        // A reconnect that recovers nothing: the client's base is the publication at its
        // position, so the next one is a delta again.
        back = once(sub, 'subscribed', (x) => x.wasRecovering, 20000);
        net.drop();
        ctx = await back;
        assert.equal(ctx.recovered, true);
        for (const a of want.slice(24)) await disk.api('publish', { channel: ch, data: a, delta: true });
        const pubs = await got;
        assert.deepEqual(pubs.map((p) => fromData(p.data)), want);
        assert.deepEqual(pubs.map((p) => num(p.offset)), want.map((_, i) => i + 1));
        const st = sub.deltaStats();
        // In full: the first publication, and the first of the recovered chain; all else deltas.
        assert.equal(st.numFullPayloads, 2, JSON.stringify(st));
        assert.equal(st.numDeltaPayloads, want.length - 2);
      } finally {
        await disk.stop();
      }
    });

    feature('tag filters: every operator', async () => {
      const c = make(srv.ws, { token: token('42') });
      const tagged = [
        { n: 0, tags: { kind: 'a', price: '10', name: 'alpha' } },
        { n: 1, tags: { kind: 'b', price: '9.5', name: 'beta' } },
        { n: 2, tags: { kind: 'c', price: '-1.50', name: 'gamma' } },
        { n: 3, tags: { name: 'delta' } },
      ];
      const leaf = (key, cmp, val, vals) => ({ key, cmp, ...(val !== undefined ? { val } : {}), ...(vals ? { vals } : {}) });
      const cases = [
        [leaf('kind', 'eq', 'a'), [0]],
        [leaf('kind', 'neq', 'a'), [1, 2, 3]],
        [leaf('kind', 'in', undefined, ['a', 'c']), [0, 2]],
        [leaf('kind', 'nin', undefined, ['a', 'c']), [1, 3]],
        [leaf('kind', 'ex'), [0, 1, 2]],
        [leaf('kind', 'nex'), [3]],
        [leaf('name', 'sw', 'al'), [0]],
        [leaf('name', 'ew', 'ta'), [1, 3]],
        [leaf('name', 'ct', 'mm'), [2]],
        [leaf('price', 'gt', '9.5'), [0]],
        [leaf('price', 'gte', '9.5'), [0, 1]],
        [leaf('price', 'lt', '9.5'), [2]],
        [leaf('price', 'lte', '-1.5'), [2]],
        [{ op: 'and', nodes: [leaf('kind', 'ex'), { op: 'not', nodes: [leaf('kind', 'eq', 'b')] }] }, [0, 2]],
        [{ op: 'or', nodes: [leaf('kind', 'eq', 'b'), leaf('name', 'eq', 'delta')] }, [1, 3]],
      ];
      const ns = uniq('ops');
      const subs = cases.map(([tf], i) => {
        const s = c.newSubscription(`tags:${ns}_${i}`, { tagsFilter: tf });
        s.got = [];
        s.on('publication', (ctx) => s.got.push(fromData(ctx.data).n));
        s.subscribe();
        return s;
      });
      c.connect();
      await Promise.all(subs.map((s) => s.ready(10000)));
      for (const [i] of cases.entries()) {
        for (const t of tagged) await srv.api('publish', { channel: `tags:${ns}_${i}`, data: { n: t.n }, tags: t.tags });
      }
      // Publications arrive in order: a publication let through wrongly shows up among the first
      // ones, so the first `want.length` received must be exactly the expected ones.
      const enough = () => cases.every(([, want], i) => subs[i].got.length >= want.length);
      const deadline = Date.now() + 10000;
      while (!enough() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      for (const [i, [tf, want]] of cases.entries()) {
        assert.deepEqual(subs[i].got, want, `filter ${JSON.stringify(tf)}`);
      }
    });

    feature('tag filters: recovery filtered, position kept', async () => {
      const ch = `tags:${uniq('recover')}`;
      const net = controlledNetwork();
      const c = make(srv.ws, { token: token('42'), websocket: net.WebSocket, minReconnectDelay: 50, maxReconnectDelay: 200 });
      const sub = c.newSubscription(ch, { tagsFilter: { key: 'kind', cmp: 'eq', val: 'keep' } });
      const got = [];
      sub.on('publication', (ctx) => got.push(fromData(ctx.data).n));
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      await srv.api('publish', { channel: ch, data: { n: 1 }, tags: { kind: 'keep' } });
      await srv.api('publish', { channel: ch, data: { n: 2 }, tags: { kind: 'drop' } });
      while (got.length < 1) await new Promise((r) => setTimeout(r, 20));
      net.offline = true;
      net.drop();
      await once(sub, 'subscribing');
      for (let i = 3; i <= 8; i++) await srv.api('publish', { channel: ch, data: { n: i }, tags: { kind: i % 2 ? 'keep' : 'drop' } });
      net.offline = false;
      const ctx = await once(sub, 'subscribed', (x) => x.wasRecovering);
      assert.equal(ctx.recovered, true);
      await srv.api('publish', { channel: ch, data: { n: 9 }, tags: { kind: 'keep' } });
      while (got.at(-1) !== 9) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(got, [1, 3, 5, 7, 9]);
      // The position moved past the filtered publications: nothing was lost or repeated.
      assert.equal(num(sub._offset), 9);
    });

    feature('tag filters: bad filters refused with 107', async () => {
      const c = make(srv.ws, { token: token('42') });
      c.connect();
      const refused = async (channel, tf) => {
        const sub = c.newSubscription(channel, { tagsFilter: tf });
        const gone = once(sub, 'unsubscribed');
        sub.subscribe();
        const e = await gone;
        c.removeSubscription(sub);
        return { code: e.code, message: e.reason };
      };
      let e = await refused(`tags:${uniq('bad')}`, { key: 'kind', cmp: 'eq' });
      assert.equal(e.code, 107);
      assert.match(e.message, /eq requires val/);
      let deep = { key: 'k', cmp: 'ex' };
      for (let i = 0; i < 20; i++) deep = { op: 'not', nodes: [deep] };
      e = await refused(`tags:${uniq('deep')}`, deep);
      assert.equal(e.code, 107);
      assert.match(e.message, /deeper than 16/);
      e = await refused(`tags:${uniq('vals')}`, { key: 'k', cmp: 'in', vals: Array.from({ length: 2000 }, (_, i) => `v${i}`) });
      assert.equal(e.code, 107);
      e = await refused(uniq('notallowed'), { key: 'k', cmp: 'ex' });
      assert.equal(e.code, 107);
      assert.match(e.message, /not allowed/);
      // The connection is undisturbed.
      const sub = c.newSubscription(`tags:${uniq('after')}`);
      sub.subscribe();
      await sub.ready(10000);
    });

    feature('channel compaction', async () => {
      const ch = `compact:${uniq('c')}`;
      const c = make(srv.ws, { token: token('42') });
      const sub = c.newSubscription(ch);
      const other = c.newSubscription(uniq('plain'));
      sub.subscribe();
      other.subscribe();
      c.connect();
      await Promise.all([sub.ready(10000), other.ready(10000)]);
      // centrifuge-js compares protobuf int64 ids by identity, so its protobuf build never gets one.
      if (encoding === 'json') assert.ok(num(sub._id) > 0, 'a compaction id in the subscribe result');
      else assert.equal(num(sub._id), 0);
      assert.equal(num(other._id), 0, 'no id outside namespaces that allow compaction');
      const joined = once(sub, 'join');
      const c2 = make(srv.ws, { token: token('43') });
      c2.newSubscription(ch).subscribe();
      c2.connect();
      assert.equal((await joined).info.user, '43');
      const got = once(sub, 'publication');
      await srv.api('publish', { channel: ch, data: { compact: true } });
      assert.deepEqual(fromData((await got).data), { compact: true });
    });

    feature('latest-state publishing (version, version_epoch)', async () => {
      const ch = uniq('state');
      const c = make(srv.ws, { token: token('42') });
      const sub = c.newSubscription(ch);
      const got = [];
      sub.on('publication', (ctx) => got.push(fromData(ctx.data).v));
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      const r1 = await srv.api('publish', { channel: ch, data: { v: 2 }, version: 2 });
      assert.equal(r1.suppressed, undefined);
      const r2 = await srv.api('publish', { channel: ch, data: { v: 1 }, version: 1 });
      assert.equal(r2.suppressed, true);
      assert.equal(r2.offset, r1.offset, 'a suppressed publish reports the current position');
      const r3 = await srv.api('publish', { channel: ch, data: { v: 2 }, version: 2 });
      assert.equal(r3.suppressed, true, 'an equal version is not newer');
      await srv.api('publish', { channel: ch, data: { v: 1 }, version: 1, version_epoch: 'restarted' });
      await srv.api('publish', { channel: ch, data: { v: 3 }, version: 3, version_epoch: 'restarted' });
      while (got.length < 3) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(got, [2, 1, 3]);
    });

    feature('state invalidation: unsubscribe 2502 and disconnect 3014', async () => {
      const ch = uniq('inval');
      let tokens = 0;
      const c = make(srv.ws, {
        getToken: async () => {
          tokens++;
          return token('42');
        },
      });
      const sub = c.newSubscription(ch, { delta: 'fossil' });
      sub.subscribe();
      c.connect();
      await sub.ready(10000);
      // Listening before publishing: the publication can arrive before the API answers.
      const first = once(sub, 'publication');
      await srv.api('publish', { channel: ch, data: { n: 1 } });
      await first;
      const resub = once(sub, 'subscribing', (x) => x.code === 2502);
      const back = once(sub, 'subscribed');
      await srv.api('unsubscribe', { user: '42', channel: ch, invalidate: true });
      await resub;
      const ctx = await back;
      // The client dropped its position: it asks for epoch "_" and is told it did not recover.
      assert.equal(ctx.wasRecovering, true);
      assert.equal(ctx.recovered, false);
      const before = tokens;
      const reconnecting = once(c, 'connecting', (x) => x.code === 3014);
      const connected = once(c, 'connected');
      await srv.api('disconnect', { user: '42', disconnect: { code: 3014, reason: 'state invalidated' } });
      await reconnecting;
      await connected;
      assert.equal(tokens, before + 1, 'a fresh token was asked for');
      await sub.ready(10000);
    });
  });
}
