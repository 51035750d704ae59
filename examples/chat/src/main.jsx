import { createRoot } from 'react-dom/client';
import { useEffect, useRef, useState } from 'react';
import { useCentrifuge } from './useCentrifuge.js';
import { useSubscription } from './useSubscription.js';

// What the browser test reads: subscribe calls (must stay 1), token fetches, client ids seen.
window.chatStats = { subscribeCalls: 0, tokens: 0, clients: new Set(), disconnects: 0, duplicates: 0 };

const params = new URLSearchParams(location.search);
const user = params.get('user') || 'alice';
const room = 'room:' + (params.get('room') || 'lobby');

function Clock() {
  // Re-renders the whole app four times a second, as real apps do for many reasons.
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), 250);
    return () => clearInterval(t);
  }, []);
  return now;
}

function App() {
  const now = Clock();
  const { client, state, info } = useCentrifuge(user);
  const [messages, setMessages] = useState([]);
  const seen = useRef(new Set());
  const logRef = useRef(null);
  // A new inline callback on every render: with the ref-based hook this costs nothing.
  const sub = useSubscription(client, room, {
    onPublication: (ctx) => {
      if (seen.current.has(ctx.offset)) window.chatStats.duplicates += 1;
      seen.current.add(ctx.offset);
      setMessages((m) => [...m, { offset: ctx.offset, text: ctx.data.text, who: ctx.info?.user ?? '?' }]);
    },
  });
  useEffect(() => {
    logRef.current?.scrollTo(0, logRef.current.scrollHeight);
  }, [messages.length]);
  const [draft, setDraft] = useState('');
  const send = (text) => sub.publish({ text });
  window.chatSend = send;
  const label = { connected: 'connected', connecting: 'reconnecting…', disconnected: 'disconnected' }[state] ?? state;
  return (
    <>
      <header>
        <h1>chat</h1>
        <span className="muted">
          {room} · you are <b>{user}</b>
        </span>
        <div className="state" data-state={state} id="state">
          <span className="dot" />
          <span>{label}</span>
          <span className="muted" id="tokens">
            · tokens {info.tokens} · {new Date(now).toLocaleTimeString()}
          </span>
        </div>
      </header>
      <main>
        <div className="log" ref={logRef} id="log">
          {messages.map((m) => (
            <div key={m.offset} className={'msg' + (m.who === user ? ' mine' : '')} data-offset={m.offset}>
              <span className="who">{m.who}</span>
              <span className="text">{m.text}</span>
              <span className="off">#{m.offset}</span>
            </div>
          ))}
        </div>
        <form
          onSubmit={(e) => {
            e.preventDefault();
            if (draft.trim()) send(draft.trim());
            setDraft('');
          }}
        >
          <input value={draft} onChange={(e) => setDraft(e.target.value)} placeholder="Message" autoComplete="off" />
          <button disabled={sub.state !== 'subscribed'}>Send</button>
        </form>
        <p className="muted">
          Subscription: {sub.state}. Messages sent while you are offline arrive when you are back, once, in order.
        </p>
      </main>
    </>
  );
}

createRoot(document.getElementById('root')).render(<App />);
