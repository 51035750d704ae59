// Starts the real holdfast binary with a test configuration; tokens, API calls and a recorder of
// compatibility results (written to artifacts/compat/<suite>.json for docs/COMPAT.md).
import { execFile, spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, writeFileSync, mkdirSync, existsSync, readdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import WebSocket from 'ws';
import { EventSource } from 'eventsource';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const BIN = process.env.HOLDFAST_BINARY_PATH || join(ROOT, 'target', 'debug', 'holdfast');
export const SECRET = 'compat-secret';
export const API_KEY = 'compat-api-key';

export const CONFIG = `
[client]
# The browser page is served by the test's own web server on another local port.
allowed_origins = ["http://127.0.0.1:*"]

[client.token]
hmac_secret_key = "${SECRET}"

[client.subscribe_to_user_personal_channel]
enabled = true

[http_api]
key = "${API_KEY}"

# The centrifuge client's fallbacks when WebSocket is blocked.
[http_stream]
enabled = true

[sse]
enabled = true

[engine]
type = "memory"

[channel.without_namespace]
presence = true
join_leave = true
force_push_join_leave = true
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
allow_subscribe_for_anonymous = true
allow_publish_for_subscriber = true
allow_publish_for_anonymous = true
allow_presence_for_subscriber = true
allow_history_for_subscriber = true

[[channel.namespaces]]
name = "smallhistory"
history_size = 2
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true

[[channel.namespaces]]
name = "private"

[[channel.namespaces]]
name = "delta"
allowed_delta_types = ["fossil"]
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
`;

export async function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
    s.on('error', rej);
  });
}

export async function startServer(config = CONFIG, extraArgs = [], fixedPort = undefined) {
  if (!existsSync(BIN)) throw new Error(`${BIN} not found: cargo build --bin holdfast`);
  const port = fixedPort ?? (await freePort());
  const dir = mkdtempSync(join(tmpdir(), 'holdfast-js-'));
  const cfg = join(dir, 'config.toml');
  writeFileSync(cfg, config);
  const proc = spawn(BIN, ['serve', '--config', cfg, '--address', '127.0.0.1', '--port', String(port), ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  let killed = false;
  proc.stdout.on('data', (d) => (log += d));
  proc.stderr.on('data', (d) => (log += d));
  // A server killed by a signal other than the test's own SIGTERM (or kill()) is a crash: show
  // its log.
  proc.on('exit', (code, sig) => {
    if (sig && sig !== 'SIGTERM' && !killed) console.error(`holdfast died (${sig}):\n${log.slice(-6000)}`);
  });
  const http = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`holdfast exited:\n${log}`);
    try {
      const r = await fetch(`${http}/ready`);
      if (r.status === 200) break;
    } catch {}
    if (Date.now() > deadline) throw new Error(`holdfast not ready:\n${log}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    http,
    ws: `ws://127.0.0.1:${port}/connection/websocket`,
    log: () => log,
    /** SIGKILL, as a crash: no shutdown at all. Resolves when the process is gone. */
    async kill() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      killed = true;
      const done = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGKILL');
      await done;
    },
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
      const done = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      // A shutdown that hangs fails the suite with the server's log instead of hanging it.
      let timer;
      const late = new Promise((_, rej) => {
        timer = setTimeout(() => {
          proc.kill('SIGKILL');
          rej(new Error(`holdfast did not stop within 20 s of SIGTERM:\n${log.slice(-6000)}`));
        }, 20000);
      });
      try {
        return await Promise.race([done, late]);
      } finally {
        clearTimeout(timer);
      }
    },
    async api(method, body) {
      const r = await fetch(`${http}/api/${method}`, {
        method: 'POST',
        headers: { 'X-API-Key': API_KEY, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      const j = await r.json();
      if (j.error) throw Object.assign(new Error(`API ${method}: ${JSON.stringify(j.error)}`), j.error);
      return j.result;
    },
  };
}

const run = promisify(execFile);

/**
 * A throwaway PostgreSQL: `initdb` into a temporary directory, `pg_ctl start` on a free port
 * (as the `postgres` user when the tests run as root: the server refuses to run as root), trust
 * authentication for `postgres`. `stop()` stops it the hard way and removes the directory.
 */
export async function startPostgres() {
  const versions = readdirSync('/usr/lib/postgresql').sort((a, b) => b.localeCompare(a, undefined, { numeric: true }));
  const bin = versions.map((v) => `/usr/lib/postgresql/${v}/bin`).find((d) => existsSync(`${d}/initdb`));
  if (!bin) throw new Error('PostgreSQL not installed (apt-get install postgresql)');
  const root = process.getuid?.() === 0;
  const asPg = (prog, args) => (root ? run('runuser', ['-u', 'postgres', '--', `${bin}/${prog}`, ...args]) : run(`${bin}/${prog}`, args));
  const dir = mkdtempSync(join(tmpdir(), 'holdfast-pg-'));
  if (root) await run('chown', ['postgres', dir]);
  const data = join(dir, 'data');
  await asPg('initdb', ['-D', data, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8']);
  const port = await freePort();
  const opts = `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off`;
  await asPg('pg_ctl', ['-D', data, '-l', join(dir, 'log'), '-o', opts, '-w', '-t', '30', 'start']);
  const dsn = `postgresql://postgres@127.0.0.1:${port}/postgres`;
  return {
    port,
    dsn,
    /** Runs SQL with psql; the rows as arrays of strings. */
    async query(sql) {
      const { stdout } = await run(`${bin}/psql`, ['-X', '-q', '-t', '-A', '-F', '\t', '-v', 'ON_ERROR_STOP=1', '-d', dsn, '-c', sql]);
      return stdout.split('\n').filter((l) => l !== '').map((l) => l.split('\t'));
    },
    async stop() {
      await asPg('pg_ctl', ['-D', data, '-m', 'immediate', '-w', 'stop']).catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const b64url = (b) => Buffer.from(b).toString('base64url');

/** An HS256 token: sub = user, ttl seconds (undefined = no exp), extra claims merged. */
export function token(user, ttl, extra = {}) {
  const claims = { sub: user, ...extra };
  if (ttl !== undefined) claims.exp = Math.floor(Date.now() / 1000) + ttl;
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/**
 * A network the test controls, for every transport the client uses (a WebSocket constructor,
 * `fetch` for HTTP-streaming and `/emulation`, an EventSource for SSE): `offline` refuses new
 * connections and requests, `drop()` cuts everything open (the transport is lost, no close
 * frame, streams end with a network error).
 */
export function controlledNetwork() {
  const sockets = new Set();
  const requests = new Set();
  const net = { offline: false };
  class ControlledWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(net.offline ? 'ws://127.0.0.1:9/offline' : url, protocols);
      sockets.add(this);
      this.on('close', () => sockets.delete(this));
    }
  }
  net.WebSocket = ControlledWebSocket;
  // The client fires `/emulation` requests and forgets them (their failure is not handled), so a
  // lost one resolves as a 503 here instead of an unhandled rejection that would fail the test.
  net.fetch = (url, opts = {}) => {
    const req = net.request(url, opts);
    return String(url).endsWith('/emulation') ? req.catch(() => new Response(null, { status: 503 })) : req;
  };
  net.request = async (url, opts = {}) => {
    if (net.offline) throw new TypeError('fetch failed: network offline');
    const ctl = new AbortController();
    opts.signal?.addEventListener('abort', () => ctl.abort(opts.signal.reason));
    requests.add(ctl);
    try {
      const resp = await fetch(url, { ...opts, signal: ctl.signal });
      if (!resp.body) requests.delete(ctl);
      return resp;
    } catch (e) {
      requests.delete(ctl);
      throw e;
    }
  };
  net.EventSource = class extends EventSource {
    constructor(url, opts = {}) {
      super(url, { ...opts, fetch: net.fetch });
    }
  };
  net.drop = () => {
    for (const s of sockets) s.terminate();
    for (const r of requests) r.abort(new TypeError('network dropped'));
    requests.clear();
  };
  return net;
}

/** Resolves with the first event `name` of `emitter` whose context matches `pred`. */
export function once(emitter, name, pred = () => true, timeoutMs = 10000) {
  return new Promise((res, rej) => {
    const t = setTimeout(() => {
      emitter.removeListener(name, h);
      rej(new Error(`timed out waiting for ${name}`));
    }, timeoutMs);
    const h = (ctx) => {
      if (!pred(ctx)) return;
      clearTimeout(t);
      emitter.removeListener(name, h);
      res(ctx);
    };
    emitter.on(name, h);
  });
}

/** Collects compatibility results and writes them to artifacts/compat/<suite>.json. */
export class Recorder {
  constructor(suite, client) {
    this.suite = suite;
    this.client = client;
    this.rows = [];
  }
  add(feature, encoding, status) {
    this.rows.push({ client: this.client, feature, encoding, status });
  }
  write() {
    const dir = join(ROOT, 'artifacts', 'compat');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, `${this.suite}.json`), JSON.stringify(this.rows, null, 2));
  }
}
