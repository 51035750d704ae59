// Holdfast admin: a single page, hash routing, plain DOM (no innerHTML: channel names, user ids
// and publication data are attacker-controlled). Talks to /admin/settings, /admin/auth,
// /admin/api/{method} and /admin/trace, all relative to this script's directory.
'use strict';
(() => {
  const BASE = new URL('.', (document.currentScript && document.currentScript.src) || location.href);
  const TOKEN_KEY = 'holdfast-admin-token';
  const PAGE_SIZE = 20;
  const TRACE_MAX = 500;
  const $ = (id) => document.getElementById(id);
  const main = $('main');
  const nav = $('nav');

  const app = { settings: null, token: sessionStorage.getItem(TOKEN_KEY), leave: [] };

  // ---------- DOM helpers ----------
  /** el('a', {href, class, text, onclick, data: {...}}, ...children); strings become text nodes. */
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = String(v);
      else if (k === 'data') Object.assign(e.dataset, v);
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'value') e.value = v;
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }
  const code = (text) => el('code', { class: 'mono' }, text);
  const userLink = (u) => (u === '' || u == null ? el('span', { class: 'muted' }, '(anonymous)') : el('a', { class: 'mono', href: '#/user/' + encodeURIComponent(u) }, u));
  const chanLink = (c) => el('a', { class: 'mono', href: '#/channel/' + encodeURIComponent(c) }, c);
  const json = (v) => (v === undefined ? '' : JSON.stringify(v));
  const num = (n) => (typeof n === 'number' ? n.toLocaleString('en-US') : n == null ? '–' : String(n));
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  const clock = (ms) => {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  };
  function duration(sec) {
    sec = Math.max(0, Math.floor(Number(sec) || 0));
    const d = Math.floor(sec / 86400), h = Math.floor((sec % 86400) / 3600), m = Math.floor((sec % 3600) / 60), s = sec % 60;
    return d ? `${d}d ${h}h ${m}m` : h ? `${h}h ${m}m ${s}s` : m ? `${m}m ${s}s` : `${s}s`;
  }
  function since(unixSec) {
    if (!unixSec) return '–';
    const d = new Date(unixSec * 1000);
    const stamp = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return `${stamp} (${duration(Date.now() / 1000 - unixSec)} ago)`;
  }
  /** A message near an action: kind = ok | error | '' */
  function say(node, text, kind = '') {
    node.textContent = text;
    node.className = 'msg' + (kind ? ' ' + kind : '');
  }
  const sayError = (node, e) => say(node, e && e.message ? e.message : String(e), 'error');
  /** A table (headers: strings or [text, class]) with rows {cells, data}; `empty` when none. */
  function table(headers, rows, empty) {
    if (!rows.length) return el('p', { class: 'empty' }, empty);
    const th = headers.map((h) => (Array.isArray(h) ? el('th', { scope: 'col', class: h[1] }, h[0]) : el('th', { scope: 'col' }, h)));
    const body = rows.map((r) => el('tr', { data: r.data }, r.cells.map((c) => (c instanceof Node && c.tagName === 'TD' ? c : el('td', {}, c)))));
    return el('table', {}, el('thead', {}, el('tr', {}, th)), el('tbody', {}, body));
  }
  const td = (cls, ...c) => el('td', { class: cls }, ...c);
  /** Re-renders `box` only when the data changed (keeps focus and selection while refreshing). */
  function differ() {
    let last;
    return (data) => {
      const k = JSON.stringify(data);
      if (k === last) return false;
      last = k;
      return true;
    };
  }

  // ---------- server calls ----------
  class ApiError extends Error {
    constructor(message, code = 0, status = 0) {
      super(message);
      this.code = code;
      this.status = status;
    }
  }
  async function request(path, body, signal) {
    const headers = { 'Content-Type': 'application/json' };
    if (app.token) headers.Authorization = 'token ' + app.token;
    const r = await fetch(new URL(path, BASE), { method: 'POST', headers, body: JSON.stringify(body || {}), signal, cache: 'no-store' });
    if (r.status === 401) {
      expired();
      throw new ApiError('not logged in (session expired or the server restarted): log in again', 0, 401);
    }
    return r;
  }
  async function errorText(r) {
    try {
      const j = await r.json();
      const e = j && j.error;
      if (typeof e === 'string') return e;
      if (e && e.message) return `${e.message} (code ${e.code})`;
    } catch {}
    return `HTTP ${r.status} ${r.statusText}`.trim();
  }
  async function api(method, params = {}) {
    const r = await request('api/' + encodeURIComponent(method), params);
    if (!r.ok) throw new ApiError(await errorText(r), 0, r.status);
    const j = await r.json();
    if (j.error) throw new ApiError(`${j.error.message || 'error'} (code ${j.error.code})`, j.error.code, r.status);
    return j.result || {};
  }

  // ---------- session ----------
  function setToken(t) {
    app.token = t;
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    else sessionStorage.removeItem(TOKEN_KEY);
  }
  function expired() {
    if (app.settings && app.settings.insecure) return;
    setToken(null);
    showLogin('Your session ended (expired, or the server restarted): log in again.');
  }
  function leavePage() {
    for (const f of app.leave.splice(0)) {
      try {
        f();
      } catch {}
    }
  }
  /** Runs `fn` now and every `ms` while the page is shown; one call at a time. */
  function every(ms, fn) {
    let busy = false;
    const tick = async () => {
      if (busy) return;
      busy = true;
      try {
        await fn();
      } finally {
        busy = false;
      }
    };
    const t = setInterval(tick, ms);
    app.leave.push(() => clearInterval(t));
    tick();
  }

  function showLogin(message) {
    leavePage();
    nav.hidden = true;
    $('logout').hidden = true;
    const pw = el('input', { id: 'password', type: 'password', autocomplete: 'current-password', required: true });
    const err = el('p', { id: 'login-error', class: 'msg error', role: 'alert' });
    const note = message ? el('p', { class: 'warn' }, message) : null;
    const btn = el('button', { type: 'submit', class: 'primary' }, 'Log in');
    const form = el('form', { id: 'login-form', class: 'login', novalidate: true }, el('h1', {}, 'Holdfast admin'), note, el('label', { for: 'password' }, 'Password'), pw, btn, err);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      say(err, '');
      if (!pw.value) return say(err, 'Enter the admin password.', 'error');
      btn.disabled = true;
      try {
        const r = await fetch(new URL('auth', BASE), {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ password: pw.value }),
          cache: 'no-store',
        });
        if (r.ok) {
          const j = await r.json();
          if (!j.token) throw new Error('no token in the answer');
          setToken(j.token);
          pw.value = '';
          return route(true);
        }
        let text = await errorText(r);
        if (r.status === 401) text = 'Wrong password.';
        else if (r.status === 429 && r.headers.get('Retry-After')) text += ` (retry after ${r.headers.get('Retry-After')} s)`;
        say(err, text, 'error');
        pw.select();
      } catch (e) {
        say(err, 'Login failed: ' + e.message, 'error');
      } finally {
        btn.disabled = false;
      }
    });
    main.replaceChildren(form);
    pw.focus();
  }

  // ---------- router ----------
  function route(moveFocus) {
    leavePage();
    if (!app.settings) return;
    if (!app.settings.insecure && !app.token) return showLogin();
    nav.hidden = false;
    $('logout').hidden = !!app.settings.insecure;
    const h = location.hash.replace(/^#/, '') || '/';
    let page = 'none';
    main.replaceChildren();
    try {
      let m;
      if (h === '/') (page = 'nodes'), pageNodes();
      else if (h === '/channels') (page = 'channels'), pageChannels();
      else if ((m = /^\/channel\/(.+)$/.exec(h))) (page = 'channel'), pageChannel(decodeURIComponent(m[1]));
      else if ((m = /^\/user\/(.+)$/.exec(h))) (page = 'user'), pageUser(decodeURIComponent(m[1]));
      else if (h === '/user/')
        main.append(
          el('h1', {}, 'Anonymous connections'),
          el('p', {}, 'Anonymous connections have no user id: find them by channel (presence) instead.'),
        );
      else if (h === '/health') (page = 'health'), pageHealth();
      else if (h === '/config') (page = 'config'), pageConfig();
      else main.append(el('h1', {}, 'Not found'), el('p', {}, 'No such page. ', el('a', { href: '#/' }, 'Back to nodes')));
    } catch (e) {
      main.replaceChildren(el('h1', {}, 'Bad address'), el('p', { class: 'error' }, e.message));
    }
    for (const a of nav.querySelectorAll('a[data-page]')) {
      const cur = a.dataset.page === page || (page === 'channel' && a.dataset.page === 'channels');
      if (cur) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    if (moveFocus) {
      const h1 = main.querySelector('h1');
      if (h1) {
        h1.tabIndex = -1;
        h1.focus({ preventScroll: true });
      }
    }
  }

  // ---------- pages ----------
  function pageNodes() {
    const msg = el('p', { class: 'msg', role: 'status' });
    const box = el('div', { id: 'nodes' });
    const upd = el('p', { class: 'muted' });
    main.append(el('h1', {}, 'Nodes'), msg, box, upd);
    every(2000, async () => {
      try {
        const r = await api('info');
        say(msg, '');
        const nodes = (r.nodes || []).slice().sort((a, b) => String(a.name).localeCompare(String(b.name)));
        const rows = nodes.map((n) => ({
          data: { uid: n.uid },
          cells: [
            td('', el('span', { class: 'mono' }, n.name), n.name === app.settings.node ? el('span', { class: 'muted' }, ' (this node)') : null),
            td('mono', n.uid),
            td('mono', n.version),
            td('num num-clients', num(n.num_clients)),
            td('num num-users', num(n.num_users)),
            td('num num-channels', num(n.num_channels)),
            td('num num-subs', num(n.num_subs)),
            td('num', duration(n.uptime)),
          ],
        }));
        const heads = ['Name', 'UID', 'Version', ['Clients', 'num'], ['Users', 'num'], ['Channels', 'num'], ['Subscriptions', 'num'], ['Uptime', 'num']];
        box.replaceChildren(table(heads, rows, 'no nodes answered'));
        upd.textContent = `${nodes.length} node${nodes.length === 1 ? '' : 's'} · refreshed every 2 s · last at ${clock(Date.now())}`;
      } catch (e) {
        sayError(msg, e);
      }
    });
  }

  function globMatcher(text) {
    const t = text.trim().toLowerCase();
    if (!t) return () => true;
    if (!/[*?]/.test(t)) return (name) => name.toLowerCase().includes(t);
    const re = new RegExp('^' + t.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.') + '$');
    return (name) => re.test(name.toLowerCase());
  }

  function pageChannels() {
    const filter = el('input', { id: 'channel-filter', type: 'search', placeholder: 'substring or glob*', autocomplete: 'off', spellcheck: 'false' });
    const count = el('span', { class: 'muted' });
    const msg = el('p', { class: 'msg', role: 'status' });
    const box = el('div', { id: 'channels' });
    main.append(
      el('h1', {}, 'Channels'),
      el('p', { class: 'muted' }, 'Channels with at least one subscriber on this node, refreshed every 3 s.'),
      el('div', { class: 'row' }, el('label', { for: 'channel-filter' }, 'Filter'), filter, count),
      msg,
      box,
    );
    let channels = [];
    const changed = differ();
    const MAX_ROWS = 1000;
    const render = () => {
      const match = globMatcher(filter.value);
      const shown = channels.filter(([name]) => match(name));
      const rows = shown.slice(0, MAX_ROWS).map(([name, info]) => ({
        data: { channel: name },
        cells: [td('', chanLink(name)), td('num', num(info && info.num_clients))],
      }));
      const empty = channels.length ? 'no channel matches the filter' : 'no channels with subscribers on this node';
      box.replaceChildren(table(['Channel', ['Subscribers', 'num']], rows, empty));
      count.textContent = `${shown.length} of ${channels.length} channel${channels.length === 1 ? '' : 's'}` + (shown.length > MAX_ROWS ? ` (first ${MAX_ROWS} shown)` : '');
    };
    filter.addEventListener('input', render);
    every(3000, async () => {
      try {
        const r = await api('channels');
        say(msg, '');
        const list = Object.entries(r.channels || {}).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
        if (!changed(list)) return;
        channels = list;
        render();
      } catch (e) {
        sayError(msg, e);
      }
    });
  }

  function pageChannel(channel) {
    if (!channel) throw new Error('no channel name in the address');
    main.append(el('h1', {}, 'Channel ', code(channel)));
    const body = el('div', { id: 'channel-body' }, el('p', { class: 'muted' }, 'Loading…'));
    main.append(body);
    // A map channel (its namespace's subscription_type) answers map_stats; any other 107.
    api('map_stats', { channel })
      .then(
        () => mapChannel(channel, body),
        (e) => {
          if (e.code !== 107) throw e;
          body.replaceChildren();
          streamChannel(channel, body);
        },
      )
      .catch((e) => body.replaceChildren(el('p', { class: 'error' }, e.message)));
    main.append(traceSection({ channel }, 'channel'));
  }

  /** The data of a publication or map entry as text (binary payloads are base64). */
  const shown = (p) => (p.b64data !== undefined ? 'base64: ' + p.b64data : json(p.data));
  const writer = (info) => (info && info.user !== undefined ? userLink(info.user) : el('span', { class: 'muted' }, 'API'));

  /** A map channel: its state paged by key, its recent changes, and a console to write keys. */
  function mapChannel(channel, box) {
    box.replaceChildren();
    // State
    const stats = el('p', { id: 'map-stats', class: 'muted' });
    const smsg = el('p', { class: 'msg', role: 'status' });
    const sbox = el('div', { id: 'map-state' });
    const first = el('button', { id: 'map-first', type: 'button' }, '« First keys');
    const next = el('button', { id: 'map-next', type: 'button', disabled: true }, 'Next keys ›');
    const st = { cursor: '', next: '', page: 1 };
    const sChanged = differ();
    const loadState = async () => {
      try {
        const [s, r] = await Promise.all([api('map_stats', { channel }), api('map_read_state', { channel, cursor: st.cursor, limit: PAGE_SIZE })]);
        say(smsg, '');
        stats.textContent = `${num(s.num_keys)} key${s.num_keys === 1 ? '' : 's'} · page ${st.page} · stream top ${r.offset} · epoch ${r.epoch}`;
        st.next = r.cursor || '';
        next.disabled = !st.next;
        const entries = r.entries || [];
        if (!sChanged(entries)) return;
        const rows = entries.map((e) => ({
          data: { key: e.key },
          cells: [td('mono', e.key), td('data', el('div', {}, shown(e))), td('num mono', String(e.offset)), td('', writer(e.info)), td('mono', (e.info && e.info.client) || '')],
        }));
        sbox.replaceChildren(table(['Key', 'Data', ['Offset', 'num'], 'User', 'Client'], rows, st.page === 1 ? 'the map is empty' : 'no more keys'));
      } catch (e) {
        sChanged(null);
        sbox.replaceChildren();
        sayError(smsg, e);
      }
    };
    first.addEventListener('click', () => {
      Object.assign(st, { cursor: '', page: 1 });
      loadState();
    });
    next.addEventListener('click', () => {
      if (!st.next) return;
      Object.assign(st, { cursor: st.next, page: st.page + 1 });
      loadState();
    });
    box.append(
      el('section', { class: 'card', 'aria-labelledby': 'h-map-state' },
        el('h2', { id: 'h-map-state' }, 'Map state'), stats, el('div', { class: 'row' }, first, next), smsg, sbox),
    );
    every(3000, loadState);

    // Recent changes (the change stream, newest first)
    const cmsg = el('p', { class: 'msg', role: 'status' });
    const cbox = el('div', { id: 'map-stream' });
    const cChanged = differ();
    const loadChanges = async () => {
      try {
        const r = await api('map_read_stream', { channel, limit: PAGE_SIZE, reverse: true });
        say(cmsg, '');
        const pubs = r.entries || [];
        if (!cChanged(pubs)) return;
        const rows = pubs.map((p) => ({
          data: { offset: String(p.offset), change: p.removed ? 'removed' : 'set' },
          cells: [td('num mono', String(p.offset)), td('mono', p.key), td('', p.removed ? 'removed' : 'set'), td('data', el('div', {}, p.removed ? '' : shown(p))), td('', writer(p.info))],
        }));
        cbox.replaceChildren(table([['Offset', 'num'], 'Key', 'Change', 'Data', 'User'], rows, 'no changes in the stream'));
      } catch (e) {
        cChanged(null);
        cbox.replaceChildren();
        sayError(cmsg, e);
      }
    };
    box.append(el('section', { class: 'card', 'aria-labelledby': 'h-map-stream' }, el('h2', { id: 'h-map-stream' }, 'Recent changes'), cmsg, cbox));
    every(3000, loadChanges);

    // Write console
    const key = el('input', { id: 'map-key', type: 'text', spellcheck: 'false', autocomplete: 'off', placeholder: 'key' });
    const data = el('textarea', { id: 'map-data', spellcheck: 'false', placeholder: '{"status": "running"}' });
    const set = el('button', { id: 'map-publish', type: 'button', class: 'primary' }, 'Set key');
    const remove = el('button', { id: 'map-remove', type: 'button' }, 'Remove key');
    const result = el('output', { id: 'map-result', class: 'msg', for: 'map-key map-data', 'aria-live': 'polite' });
    const write = async (removed) => {
      if (!key.value) return say(result, 'A key is needed.', 'error');
      const params = { channel, key: key.value };
      if (!removed) {
        try {
          params.data = JSON.parse(data.value);
        } catch (e) {
          return say(result, 'Not valid JSON: ' + e.message, 'error');
        }
      }
      set.disabled = remove.disabled = true;
      try {
        const r = await api(removed ? 'map_remove' : 'map_publish', params);
        if (r.suppressed) say(result, `Nothing written (${r.suppress_reason || 'suppressed'}).`, 'error');
        else say(result, `${removed ? 'Removed' : 'Set'} at offset ${r.offset} (epoch ${r.epoch}).`, 'ok');
        loadState();
        loadChanges();
      } catch (e) {
        sayError(result, e);
      } finally {
        set.disabled = remove.disabled = false;
      }
    };
    set.addEventListener('click', () => write(false));
    remove.addEventListener('click', () => write(true));
    box.append(
      el('section', { class: 'card', 'aria-labelledby': 'h-map-write' },
        el('h2', { id: 'h-map-write' }, 'Write a key'),
        el('label', { for: 'map-key' }, 'Key'), key,
        el('label', { for: 'map-data' }, 'Data (JSON)'), data,
        el('div', { class: 'row' }, set, remove),
        result),
    );
  }

  /** A stream channel: presence, history and the publish console. */
  function streamChannel(channel, main) {
    // Presence
    const stats = el('p', { id: 'presence-stats', class: 'muted' });
    const pmsg = el('p', { class: 'msg', role: 'status' });
    const pbox = el('div', { id: 'presence' });
    const pChanged = differ();
    const loadPresence = async () => {
      try {
        const [p, s] = await Promise.all([api('presence', { channel }), api('presence_stats', { channel })]);
        say(pmsg, '');
        stats.textContent = `${num(s.num_clients)} client${s.num_clients === 1 ? '' : 's'}, ${num(s.num_users)} user${s.num_users === 1 ? '' : 's'}`;
        const list = Object.entries(p.presence || {}).sort((a, b) => (a[0] < b[0] ? -1 : 1));
        if (!pChanged(list)) return;
        const rows = list.map(([id, c]) => ({
          data: { client: id },
          cells: [td('mono', c.client || id), td('', userLink(c.user)), td('data', json(c.conn_info)), td('data', json(c.chan_info))],
        }));
        pbox.replaceChildren(table(['Client', 'User', 'Connection info', 'Channel info'], rows, 'nobody is subscribed'));
      } catch (e) {
        stats.textContent = '';
        pChanged(null);
        pbox.replaceChildren();
        sayError(pmsg, e);
      }
    };
    main.append(el('section', { class: 'card', 'aria-labelledby': 'h-presence' }, el('h2', { id: 'h-presence' }, 'Presence'), stats, pmsg, pbox));
    every(3000, loadPresence);

    // History
    const older = el('button', { id: 'history-older', type: 'button', disabled: true }, 'Older ›');
    const newest = el('button', { id: 'history-newest', type: 'button' }, '« Newest');
    const pos = el('span', { id: 'history-pos', class: 'muted' });
    const hmsg = el('p', { class: 'msg', role: 'status' });
    const hbox = el('div', { id: 'history' });
    const hist = { pubs: [], epoch: '', atNewest: true, top: 0 };
    const renderHistory = () => {
      const rows = hist.pubs.map((p) => {
        const info = p.info || {};
        return {
          data: { offset: String(p.offset) },
          cells: [
            td('num mono', String(p.offset)),
            td('data', el('div', {}, json(p.data))),
            td('', info.user !== undefined ? userLink(info.user) : el('span', { class: 'muted' }, 'API')),
            td('mono', info.client || ''),
            td('data', p.tags ? json(p.tags) : ''),
          ],
        };
      });
      hbox.replaceChildren(table([['Offset', 'num'], 'Data', 'User', 'Client', 'Tags'], rows, 'no publications in history'));
      const last = hist.pubs[hist.pubs.length - 1];
      older.disabled = !last || hist.pubs.length < PAGE_SIZE || last.offset <= 1;
      pos.textContent = hist.pubs.length
        ? `offsets ${hist.pubs[0].offset}–${last.offset} · stream top ${hist.top} · epoch ${hist.epoch}`
        : hist.epoch ? `stream top ${hist.top} · epoch ${hist.epoch}` : '';
    };
    const loadNewest = async () => {
      try {
        const r = await api('history', { channel, limit: PAGE_SIZE, reverse: true });
        Object.assign(hist, { pubs: r.publications || [], epoch: r.epoch || '', top: r.offset || 0, atNewest: true });
        say(hmsg, '');
        renderHistory();
      } catch (e) {
        hbox.replaceChildren();
        older.disabled = true;
        sayError(hmsg, e);
      }
    };
    const loadOlder = async () => {
      const oldest = hist.pubs[hist.pubs.length - 1];
      if (!oldest) return;
      older.disabled = true;
      try {
        const r = await api('history', { channel, limit: PAGE_SIZE, reverse: true, since: { offset: oldest.offset, epoch: hist.epoch } });
        const pubs = (r.publications || []).filter((p) => p.offset < oldest.offset);
        if (!pubs.length) {
          say(hmsg, 'No older publications in history.');
          return;
        }
        Object.assign(hist, { pubs, epoch: r.epoch || hist.epoch, top: r.offset || hist.top, atNewest: false });
        say(hmsg, '');
        renderHistory();
      } catch (e) {
        if (e.code === 112) {
          await loadNewest();
          say(hmsg, 'That position is gone from history (expired, trimmed or the stream was reset): showing the newest.', 'error');
        } else {
          older.disabled = false;
          sayError(hmsg, e);
        }
      }
    };
    older.addEventListener('click', loadOlder);
    newest.addEventListener('click', loadNewest);
    main.append(
      el('section', { class: 'card', 'aria-labelledby': 'h-history' }, el('h2', { id: 'h-history' }, 'History'), el('div', { class: 'row' }, newest, older, pos), hmsg, hbox),
    );
    loadNewest();

    // Publish console
    const data = el('textarea', { id: 'publish-data', spellcheck: 'false', placeholder: '{"text": "hello"}' });
    const send = el('button', { id: 'publish-send', type: 'button', class: 'primary' }, 'Publish');
    const result = el('output', { id: 'publish-result', class: 'msg', for: 'publish-data', 'aria-live': 'polite' });
    const publish = async () => {
      let value;
      try {
        value = JSON.parse(data.value);
      } catch (e) {
        return say(result, 'Not valid JSON: ' + e.message, 'error');
      }
      send.disabled = true;
      say(result, 'publishing…');
      try {
        const r = await api('publish', { channel, data: value });
        say(result, r.offset ? `Published at offset ${r.offset} (epoch ${r.epoch}).` : 'Published (no history in this channel).', 'ok');
        if (hist.atNewest) loadNewest();
      } catch (e) {
        sayError(result, e);
      } finally {
        send.disabled = false;
      }
    };
    send.addEventListener('click', publish);
    data.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        publish();
      }
    });
    main.append(
      el('section', { class: 'card', 'aria-labelledby': 'h-publish' },
        el('h2', { id: 'h-publish' }, 'Publish'),
        el('label', { for: 'publish-data' }, 'Data (JSON)'), data,
        el('div', { class: 'row' }, send, el('span', { class: 'muted' }, 'Ctrl+Enter publishes from the text box.')),
        result),
    );
  }

  function pageUser(user) {
    main.append(el('h1', {}, 'User ', user === '' ? el('span', { class: 'muted' }, '(anonymous)') : code(user)));
    const msg = el('p', { id: 'user-result', class: 'msg', role: 'status' });
    const box = el('div', { id: 'connections' });
    const refresh = el('button', { type: 'button' }, 'Refresh');
    const changed = differ();
    const load = async (force) => {
      try {
        const r = await api('connections', { user });
        const list = Object.entries(r.connections || {}).sort((a, b) => (a[1].connected_at || 0) - (b[1].connected_at || 0));
        if (!changed(list) && !force) return;
        box.replaceChildren(table(['Client', 'Transport', 'Client name', 'IP', 'Connected since', 'Subscriptions', 'Actions'], list.map(([id, c]) => connRow(id, c)), 'no connections of this user on this node'));
      } catch (e) {
        sayError(msg, e);
      }
    };
    const act = async (button, method, params, done) => {
      button.disabled = true;
      try {
        await api(method, params);
        say(msg, done, 'ok');
        await load(true);
      } catch (e) {
        button.disabled = false;
        sayError(msg, e);
      }
    };
    function connRow(id, c) {
      const chans = Object.keys((c.state && c.state.channels) || {}).sort();
      const subs = chans.length
        ? el('ul', { class: 'subs' }, chans.map((ch) => {
            const b = el('button', { type: 'button', class: 'small danger unsubscribe', data: { client: id, channel: ch }, 'aria-label': `Unsubscribe client ${id} from ${ch}` }, 'Unsubscribe');
            b.addEventListener('click', () => act(b, 'unsubscribe', { user, channel: ch, client: id }, `Unsubscribed client ${id} from ${ch}.`));
            return el('li', {}, chanLink(ch), b);
          }))
        : el('span', { class: 'muted' }, 'none');
      const d = el('button', { type: 'button', class: 'small danger disconnect', data: { client: id }, 'aria-label': `Disconnect client ${id}` }, 'Disconnect');
      d.addEventListener('click', () => act(d, 'disconnect', { user, client: id }, `Disconnected client ${id}.`));
      const name = [c.app_name, c.app_version].filter(Boolean).join(' ');
      return {
        data: { client: id },
        cells: [
          td('mono', id),
          td('', c.transport || '', c.protocol ? el('span', { class: 'muted' }, ` (${c.protocol})`) : null),
          td('mono', name || el('span', { class: 'muted' }, '–')),
          td('mono', c.ip || ''),
          td('', since(c.connected_at)),
          td('', subs),
          td('', d),
        ],
      };
    }
    refresh.addEventListener('click', () => load(true));
    main.append(
      el('section', { class: 'card', 'aria-labelledby': 'h-conns' },
        el('div', { class: 'row' }, el('h2', { id: 'h-conns', class: 'grow' }, 'Connections on this node'), refresh), msg, box),
      traceSection({ user }, 'user'),
    );
    every(3000, () => load(false));
  }

  function pageHealth() {
    const msg = el('p', { class: 'msg', role: 'status' });
    const status = el('span', { id: 'engine-status', class: 'badge' });
    const kv = el('dl', { class: 'kv' });
    const consumers = el('div', { id: 'consumers' });
    main.append(
      el('h1', {}, 'Health'),
      msg,
      el('section', { class: 'card', 'aria-labelledby': 'h-node' }, el('h2', { id: 'h-node' }, 'This node'), el('p', {}, 'Engine: ', status), kv),
      el('section', { class: 'card', 'aria-labelledby': 'h-cons' }, el('h2', { id: 'h-cons' }, 'Consumers'), consumers),
    );
    const cls = (s) => (s === 'ok' || s === 'running' || s === 'up' ? 'ok' : s === 'degraded' || s === 'starting' ? 'warn' : 'bad');
    every(3000, async () => {
      try {
        const h = await api('health');
        say(msg, '');
        status.textContent = h.engine || 'unknown';
        status.className = 'badge ' + cls(h.engine);
        const pairs = [
          ['Status', h.status], ['Engine problem', h.engine_problem], ['Node', h.node], ['Name', h.name], ['Version', h.version],
          ['Uptime', h.uptime_seconds !== undefined ? duration(h.uptime_seconds) : undefined],
          ['Connections', num(h.connections)], ['Users', num(h.users)], ['Channels', num(h.channels)], ['Subscriptions', num(h.subscriptions)],
          ['Publications', num(h.publications)], ['Errors', num(h.errors)], ['Slow disconnects', num(h.slow_disconnects)],
        ];
        kv.replaceChildren(...pairs.filter((p) => p[1] !== undefined).flatMap(([k, v]) => [el('dt', {}, k), el('dd', { class: k === 'Engine problem' ? 'error' : '' }, v)]));
        const rows = (h.consumers || []).map((c) => ({
          data: { consumer: c.name },
          cells: [
            td('mono', c.name), td('', c.type), td('', el('span', { class: 'badge ' + cls(c.status) }, c.status)),
            td('num', num(c.workers_up)), td('num', num(c.processed)), td('num', num(c.errors)), td('num', num(c.poison)),
            td('num', num(c.lag)), td('num', c.lag_seconds != null ? `${c.lag_seconds} s` : '–'), td('data', c.last_error || ''),
          ],
        }));
        consumers.replaceChildren(table(['Name', 'Type', 'Status', ['Workers up', 'num'], ['Processed', 'num'], ['Errors', 'num'], ['Poison', 'num'], ['Lag', 'num'], ['Lag (s)', 'num'], 'Last error'], rows, 'no consumers configured'));
      } catch (e) {
        status.textContent = 'unknown';
        status.className = 'badge bad';
        sayError(msg, e);
      }
    });
  }

  function pageConfig() {
    const msg = el('p', { class: 'msg', role: 'status' });
    const pre = el('pre', { id: 'config', tabindex: '0', 'aria-label': 'Effective configuration' });
    const refresh = el('button', { type: 'button' }, 'Refresh');
    const load = async () => {
      try {
        const r = await api('config');
        say(msg, '');
        pre.textContent = JSON.stringify(r, null, 2);
      } catch (e) {
        sayError(msg, e);
      }
    };
    refresh.addEventListener('click', load);
    main.append(
      el('div', { class: 'row' }, el('h1', { class: 'grow' }, 'Configuration'), refresh),
      el('p', { class: 'muted' }, 'The effective configuration of this node; secrets are shown as "********".'),
      msg,
      pre,
    );
    load();
  }

  // ---------- live trace ----------
  function traceSection(target, what) {
    const start = el('button', { id: 'trace-start', type: 'button', class: 'primary' }, 'Start trace');
    const stop = el('button', { id: 'trace-stop', type: 'button', disabled: true }, 'Stop');
    const clear = el('button', { id: 'trace-clear', type: 'button' }, 'Clear');
    const status = el('span', { id: 'trace-status', class: 'msg', role: 'status' });
    const list = el('ul', { id: 'trace', class: 'trace', 'aria-label': 'Trace events, newest first', data: { state: 'stopped' } });
    let ctl = null;
    const setState = (state, text, kind = '') => {
      list.dataset.state = state;
      say(status, text, kind);
      start.disabled = state !== 'stopped';
      stop.disabled = state === 'stopped';
    };
    const details = (ev) => {
      switch (ev.type) {
        case 'publication':
          return [what === 'user' && ev.channel !== undefined ? [chanLink(ev.channel), ' '] : null, `offset ${ev.offset ?? '–'} `, el('span', {}, ev.data ?? ''), ev.binary ? el('span', { class: 'muted' }, ' (binary)') : null, ev.truncated ? el('span', { class: 'muted' }, ' … (truncated)') : null];
        case 'join': case 'leave': case 'subscribe': case 'unsubscribe':
          return [what === 'user' ? [chanLink(ev.channel || ''), ' '] : ['user ', userLink(ev.user), ' '], 'client ', ev.client || ''];
        case 'connect':
          return ['user ', userLink(ev.user), ' client ', ev.client || '', ` ${ev.transport || ''}`, ev.name ? ` ${ev.name}` : ''];
        case 'disconnect':
          return ['user ', userLink(ev.user), ' client ', ev.client || '', ` code ${ev.code}`, ev.reason ? ` (${ev.reason})` : ''];
        case 'dropped':
          return [`${ev.count} event${ev.count === 1 ? '' : 's'} dropped (trace rate limit: 100 events/s)`];
        default:
          return [json(ev)];
      }
    };
    const add = (ev) => {
      const type = String(ev.type);
      const safe = /^[a-z_]+$/.test(type) ? type : 'other';
      const li = el('li', { data: { type } },
        el('span', { class: 't' }, clock(typeof ev.time === 'number' ? ev.time : Date.now())),
        el('span', { class: 'ev ev-' + safe }, type),
        el('span', { class: 'd' }, details(ev)));
      list.prepend(li);
      while (list.childElementCount > TRACE_MAX) list.lastElementChild.remove();
    };
    const run = async () => {
      const mine = new AbortController();
      ctl = mine;
      setState('starting', 'starting…');
      try {
        const r = await request('trace', target, mine.signal);
        if (!r.ok) throw new Error(await errorText(r));
        if (!r.body) throw new Error('this browser cannot read a streamed answer');
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = '';
        const line = (text) => {
          text = text.trim();
          if (!text) return;
          let ev;
          try {
            ev = JSON.parse(text);
          } catch {
            return;
          }
          if (!ev || typeof ev !== 'object' || ev.type === 'ping') return;
          if (ev.type === 'started') setState('running', `Tracing ${what} ${what === 'channel' ? target.channel : target.user || '(anonymous)'}…`, 'ok');
          else add(ev);
        };
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf('\n')) >= 0) {
            line(buf.slice(0, i));
            buf = buf.slice(i + 1);
          }
          if (buf.length > 1 << 20) throw new Error('trace line too long');
        }
        line(buf + dec.decode());
        if (ctl === mine) setState('stopped', 'The server ended the trace.');
      } catch (e) {
        if (ctl !== mine) return;
        if (mine.signal.aborted) setState('stopped', 'Stopped.');
        else setState('stopped', 'Trace failed: ' + e.message, 'error');
      } finally {
        if (ctl === mine) ctl = null;
      }
    };
    start.addEventListener('click', () => {
      if (!ctl) run();
    });
    stop.addEventListener('click', () => ctl && ctl.abort());
    clear.addEventListener('click', () => list.replaceChildren());
    app.leave.push(() => {
      if (ctl) ctl.abort();
      ctl = null;
    });
    return el('section', { class: 'card', 'aria-labelledby': 'h-trace' },
      el('h2', { id: 'h-trace' }, 'Live trace'),
      el('p', { class: 'muted' }, what === 'channel'
        ? 'Publications, joins, leaves, subscribes and unsubscribes in this channel as they happen (at most 100 events/s; newest first; last 500 kept).'
        : 'Connects, disconnects, subscribes and unsubscribes of this user as they happen (at most 100 events/s; newest first; last 500 kept).'),
      el('div', { class: 'row' }, start, stop, clear, status),
      list);
  }

  // ---------- boot ----------
  $('logout').addEventListener('click', () => {
    setToken(null);
    showLogin();
  });
  $('user-go-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('user-go').value.trim();
    if (!v) return;
    const target = '#/user/' + encodeURIComponent(v);
    if (location.hash === target) route(true);
    else location.hash = target;
    $('user-go').value = '';
  });
  window.addEventListener('hashchange', () => route(true));

  async function boot() {
    try {
      const r = await fetch(new URL('settings', BASE), { cache: 'no-store' });
      if (!r.ok) throw new Error(await errorText(r));
      app.settings = await r.json();
    } catch (e) {
      const retry = el('button', { type: 'button' }, 'Retry');
      retry.addEventListener('click', boot);
      main.replaceChildren(el('h1', {}, 'Holdfast admin'), el('p', { class: 'error' }, 'Cannot load the admin settings: ' + e.message), retry);
      return;
    }
    const s = app.settings;
    $('node-info').textContent = [s.node, s.version && 'v' + s.version].filter(Boolean).join(' · ');
    $('node-info').title = 'This admin page talks to node ' + (s.node || '?');
    if (s.insecure) {
      $('banner').textContent = 'Insecure mode: this admin UI needs no password. Never run like this in production.';
      $('banner').hidden = false;
    }
    route(false);
  }
  boot();
})();
