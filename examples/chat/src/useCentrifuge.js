// One Centrifuge client for the page's lifetime, with a fresh short-lived token from the
// backend whenever the client needs one (first connect, before expiry, after reconnects).
import { Centrifuge } from 'centrifuge';
import { useEffect, useState } from 'react';

export function useCentrifuge(user) {
  const [client, setClient] = useState(null);
  const [state, setState] = useState('connecting');
  const [info, setInfo] = useState({ tokens: 0, client: '' });
  useEffect(() => {
    let tokens = 0;
    const getToken = async () => {
      const r = await fetch('/api/session?user=' + encodeURIComponent(user));
      if (!r.ok) throw new Error('token endpoint: HTTP ' + r.status);
      const { token } = await r.json();
      tokens += 1;
      window.chatStats.tokens = tokens;
      setInfo((i) => ({ ...i, tokens }));
      return token;
    };
    let c;
    let cancelled = false;
    fetch('/api/session?user=' + encodeURIComponent(user))
      .then((r) => r.json())
      .then(({ ws }) => {
        if (cancelled) return;
        // Reconnects back off exponentially with jitter (0.5 s up to 10 s) on their own.
        c = new Centrifuge(ws, { getToken, minReconnectDelay: 500, maxReconnectDelay: 10000 });
        c.on('state', (ctx) => setState(ctx.newState));
        c.on('connected', (ctx) => {
          window.chatStats.clients.add(ctx.client);
          setInfo((i) => ({ ...i, client: ctx.client }));
        });
        c.on('disconnected', () => (window.chatStats.disconnects += 1));
        c.connect();
        window.chatClient = c;
        setClient(c);
      });
    return () => {
      cancelled = true;
      c?.disconnect();
    };
  }, [user]);
  return { client, state, info };
}
