// Subscribes while the component is mounted. Callbacks live in a ref: a re-render with new
// inline callbacks updates the ref and never resubscribes (the seed's "useEffect dependency
// hell" that reconnected on every render). Only the client or the channel changing does.
import { useEffect, useRef, useState } from 'react';

export function useSubscription(client, channel, handlers) {
  const handlersRef = useRef(handlers);
  useEffect(() => {
    handlersRef.current = handlers;
  });
  const [state, setState] = useState('unsubscribed');
  useEffect(() => {
    if (!client) return undefined;
    const sub = client.getSubscription(channel) ?? client.newSubscription(channel);
    window.chatStats.subscribeCalls += 1;
    sub.on('state', (ctx) => setState(ctx.newState));
    sub.on('publication', (ctx) => handlersRef.current.onPublication?.(ctx));
    sub.on('subscribed', (ctx) => handlersRef.current.onSubscribed?.(ctx));
    sub.on('error', (ctx) => handlersRef.current.onError?.(ctx));
    sub.subscribe();
    return () => {
      sub.removeAllListeners();
      sub.unsubscribe();
      client.removeSubscription(sub);
    };
  }, [client, channel]);
  return { state, publish: (data) => client?.getSubscription(channel)?.publish(data) };
}
