// The development first page: an anonymous centrifuge-js client of this server (served only with
// --insecure). Builds DOM with textContent only: publications are anyone's text.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  // The CSP forbids style attributes and <style>, not the CSSOM: a few readable defaults.
  const css = (node, props) => node && Object.assign(node.style, props);
  css(document.body, { font: '15px/1.5 system-ui, sans-serif', color: '#1d2733', background: '#f5f7fa', margin: '0' });
  css(document.querySelector('main'), { maxWidth: '860px', margin: '0 auto', padding: '24px 20px 60px' });
  for (const pre of document.querySelectorAll('pre')) css(pre, { background: '#18202b', color: '#e8edf3', padding: '12px 14px', borderRadius: '8px', whiteSpace: 'pre-wrap', overflowWrap: 'anywhere', fontSize: '13px' });
  css($('messages'), { fontFamily: 'ui-monospace, Menlo, Consolas, monospace', fontSize: '13px' });
  css($('message'), { width: '340px', padding: '5px 8px', font: 'inherit' });
  css($('publish'), { padding: '5px 14px', font: 'inherit' });

  const COLORS = { connected: '#17803a', subscribed: '#17803a', connecting: '#a36200', subscribing: '#a36200', disconnected: '#c0262d', unsubscribed: '#c0262d' };
  const show = (node, detailNode, state, detail) => {
    node.textContent = state;
    css(node, { color: COLORS[state] || 'inherit' });
    detailNode.textContent = detail ? `(${detail})` : '';
  };
  const why = (ctx) => (ctx && (ctx.reason || (ctx.error && ctx.error.message))) || '';

  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/connection/websocket';
  $('endpoint').textContent = url;
  const state = $('state'), stateDetail = $('state-detail');
  const subState = $('sub-state'), subDetail = $('sub-detail');
  const result = $('publish-result');

  if (typeof globalThis.Centrifuge !== 'function') {
    show(state, stateDetail, 'disconnected', '/centrifuge.js did not load');
    show(subState, subDetail, 'unsubscribed', '');
    return;
  }

  const client = new Centrifuge(url);
  client.on('connecting', (ctx) => show(state, stateDetail, 'connecting', why(ctx)));
  client.on('connected', (ctx) => show(state, stateDetail, 'connected', `client ${ctx.client} over ${ctx.transport}`));
  client.on('disconnected', (ctx) => show(state, stateDetail, 'disconnected', why(ctx)));
  client.on('error', (ctx) => { stateDetail.textContent = `(error: ${why(ctx)})`; });

  const sub = client.newSubscription('news');
  sub.on('subscribing', (ctx) => show(subState, subDetail, 'subscribing', why(ctx)));
  sub.on('subscribed', () => show(subState, subDetail, 'subscribed', ''));
  sub.on('unsubscribed', (ctx) => show(subState, subDetail, 'unsubscribed', why(ctx)));
  sub.on('error', (ctx) => { subDetail.textContent = `(error: ${why(ctx)})`; });
  const list = $('messages');
  sub.on('publication', (ctx) => {
    const d = ctx.data;
    const li = document.createElement('li');
    li.textContent = d && typeof d.text === 'string' ? d.text : JSON.stringify(d);
    list.append(li);
    while (list.childElementCount > 200) list.firstElementChild.remove();
    $('messages-empty').hidden = true;
  });

  $('publish-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const input = $('message');
    const text = input.value;
    if (!text.trim()) return;
    $('publish').disabled = true;
    result.textContent = 'publishing…';
    try {
      await sub.publish({ text });
      input.value = '';
      result.textContent = 'published';
    } catch (e) {
      result.textContent = `publish failed: ${(e && e.message) || e}`;
    } finally {
      $('publish').disabled = false;
      input.focus();
    }
  });

  sub.subscribe();
  client.connect();
})();
