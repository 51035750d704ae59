"""`centrifuge-python` (PyPI) against a real holdfast process, JSON and protobuf."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    StreamPosition,
    SubscriptionEventHandler,
)
from cent import Client as Cent, PublishRequest

from harness import API_KEY, token
from netproxy import NetProxy

CLIENT = "centrifuge-python"
ENCODINGS = ["json", "protobuf"]


def chan(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def data(encoding: str, obj):
    return json.dumps(obj).encode() if encoding == "protobuf" else obj


def undata(encoding: str, d):
    return json.loads(d) if encoding == "protobuf" else d


class Recorder(SubscriptionEventHandler):
    """Records subscription events and lets a test await them."""

    def __init__(self):
        self.pubs = []
        self.joins = []
        self.leaves = []
        self.subscribed = []
        self.unsubscribed = []
        self.subscribing = []
        self.changed = asyncio.Condition()

    async def _add(self, lst, item):
        async with self.changed:
            lst.append(item)
            self.changed.notify_all()

    async def on_publication(self, ctx):
        await self._add(self.pubs, ctx.pub)

    async def on_join(self, ctx):
        await self._add(self.joins, ctx.info)

    async def on_leave(self, ctx):
        await self._add(self.leaves, ctx.info)

    async def on_subscribed(self, ctx):
        await self._add(self.subscribed, ctx)

    async def on_unsubscribed(self, ctx):
        await self._add(self.unsubscribed, ctx)

    async def on_subscribing(self, ctx):
        await self._add(self.subscribing, ctx)

    async def wait(self, pred, timeout=10):
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(pred), timeout)


class ClientRecorder(ClientEventHandler):
    def __init__(self):
        self.disconnected = []
        self.server_subs = []
        self.server_pubs = []
        self.changed = asyncio.Condition()

    async def _add(self, lst, item):
        async with self.changed:
            lst.append(item)
            self.changed.notify_all()

    async def on_disconnected(self, ctx):
        await self._add(self.disconnected, ctx)

    async def on_subscribed(self, ctx):
        await self._add(self.server_subs, ctx)

    async def on_publication(self, ctx):
        await self._add(self.server_pubs, ctx)

    async def wait(self, pred, timeout=10):
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(pred), timeout)


def client(url, encoding, user="42", **kw):
    ev = kw.pop("events", None) or ClientRecorder()
    return Client(url, token=kw.pop("tok", None) or token(user), use_protobuf=encoding == "protobuf", events=ev, **kw), ev


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.compat(CLIENT, "connect with token, personal channel in connect subs")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_connect_and_personal_channel(server, encoding):
    async def scenario():
        c, ev = client(server.ws, encoding)
        await c.connect()
        await ev.wait(lambda: any(s.channel == "#42" for s in ev.server_subs))
        pub = Cent(server.api, API_KEY)
        await asyncio.to_thread(pub.publish, PublishRequest(channel="#42", data={"hello": encoding}))
        await ev.wait(lambda: any(undata(encoding, p.pub.data) == {"hello": encoding} for p in ev.server_pubs))
        await c.disconnect()

    run(scenario())


@pytest.mark.compat(CLIENT, "publish and receive")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_publish_receive(server, encoding):
    async def scenario():
        c, _ = client(server.ws, encoding)
        rec = Recorder()
        sub = c.new_subscription(chan("pub"), events=rec)
        await c.connect()
        await sub.subscribe()
        await sub.ready(10)
        await sub.publish(data(encoding, {"n": 1}))
        await rec.wait(lambda: len(rec.pubs) == 1)
        assert undata(encoding, rec.pubs[0].data) == {"n": 1}
        assert rec.pubs[0].offset == 1
        assert rec.pubs[0].info.user == "42"
        await c.disconnect()

    run(scenario())


@pytest.mark.compat(CLIENT, "history with limit, since, reverse")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_history(server, encoding):
    async def scenario():
        ch = chan("hist")
        pub = Cent(server.api, API_KEY)
        for n in range(1, 6):
            await asyncio.to_thread(pub.publish, PublishRequest(channel=ch, data={"n": n}))
        c, _ = client(server.ws, encoding)
        sub = c.new_subscription(ch)
        await c.connect()
        await sub.subscribe()
        await sub.ready(10)
        all_ = await sub.history(limit=-1)
        assert [undata(encoding, p.data)["n"] for p in all_.publications] == [1, 2, 3, 4, 5]
        assert all_.offset == 5
        two = await sub.history(limit=2)
        assert [p.offset for p in two.publications] == [1, 2]
        page = await sub.history(limit=2, since=StreamPosition(offset=2, epoch=all_.epoch))
        assert [p.offset for p in page.publications] == [3, 4]
        rev = await sub.history(limit=2, reverse=True)
        assert [p.offset for p in rev.publications] == [5, 4]
        await c.disconnect()

    run(scenario())


@pytest.mark.compat(CLIENT, "presence")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_presence(server, encoding):
    async def scenario():
        c, _ = client(server.ws, encoding)
        sub = c.new_subscription(chan("pres"))
        await c.connect()
        await sub.subscribe()
        await sub.ready(10)
        p = await sub.presence()
        assert [i.user for i in p.clients.values()] == ["42"]
        s = await sub.presence_stats()
        assert (s.num_clients, s.num_users) == (1, 1)
        await c.disconnect()

    run(scenario())


@pytest.mark.compat(CLIENT, "join and leave between two clients")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_join_leave(server, encoding):
    async def scenario():
        ch = chan("jl")
        a, _ = client(server.ws, encoding, user="a")
        b, _ = client(server.ws, encoding, user="b")
        ra = Recorder()
        sa = a.new_subscription(ch, events=ra)
        sb = b.new_subscription(ch)
        await a.connect()
        await sa.subscribe()
        await sa.ready(10)
        await b.connect()
        await sb.subscribe()
        await ra.wait(lambda: any(j.user == "b" for j in ra.joins))
        await sb.unsubscribe()
        await ra.wait(lambda: any(lv.user == "b" for lv in ra.leaves))
        await a.disconnect()
        await b.disconnect()

    run(scenario())


@pytest.mark.compat(CLIENT, "auto recovery of missed publications")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_auto_recovery(server, encoding):
    async def scenario():
        ch = chan("rec")
        proxy = await NetProxy(server.port).start()
        pub = Cent(server.api, API_KEY)
        c, _ = client(proxy.url(), encoding, min_reconnect_delay=0.05, max_reconnect_delay=0.2)
        rec = Recorder()
        sub = c.new_subscription(ch, events=rec)
        await c.connect()
        await sub.subscribe()
        await sub.ready(10)
        for n in range(1, 4):
            await asyncio.to_thread(pub.publish, PublishRequest(channel=ch, data={"n": n}))
        await rec.wait(lambda: len(rec.pubs) == 3)
        proxy.offline = True
        proxy.drop()
        await rec.wait(lambda: len(rec.subscribing) >= 1)
        for n in range(4, 11):
            await asyncio.to_thread(pub.publish, PublishRequest(channel=ch, data={"n": n}))
        proxy.offline = False
        await rec.wait(lambda: len(rec.subscribed) >= 2)
        assert rec.subscribed[-1].was_recovering and rec.subscribed[-1].recovered
        await rec.wait(lambda: len(rec.pubs) >= 10)
        assert [undata(encoding, p.data)["n"] for p in rec.pubs] == list(range(1, 11))
        assert [p.offset for p in rec.pubs] == list(range(1, 11))
        await c.disconnect()
        await proxy.close()

    run(scenario())


@pytest.mark.compat(CLIENT, "invalid connection token closes with 3500")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_invalid_connection_token(server, encoding):
    async def scenario():
        c, ev = client(server.ws, encoding, tok="not.a.token")
        await c.connect()
        await ev.wait(lambda: len(ev.disconnected) >= 1)
        assert ev.disconnected[-1].code == 3500

    run(scenario())


@pytest.mark.compat(CLIENT, "invalid subscription token is 103")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_invalid_subscription_token(server, encoding):
    async def scenario():
        c, _ = client(server.ws, encoding)
        rec = Recorder()
        sub = c.new_subscription(f"$private:{uuid.uuid4().hex[:8]}", events=rec, token="bad")
        await c.connect()
        await sub.subscribe()
        await rec.wait(lambda: len(rec.unsubscribed) >= 1)
        assert rec.unsubscribed[-1].code == 103
        await c.disconnect()

    run(scenario())


def api(server, method, body):
    """A server API call (cent has no `delta` field)."""
    import urllib.request

    req = urllib.request.Request(
        f"{server.api}/{method}",
        data=json.dumps(body).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        out = json.loads(r.read())
    assert "error" not in out, out
    return out.get("result")


@pytest.mark.compat(CLIENT, "fossil delta compression")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_delta(server, encoding):
    from centrifuge import DeltaType

    async def scenario():
        c, _ = client(server.ws, encoding)
        rec = Recorder()
        sub = c.new_subscription(f"delta:{chan('answer')}", events=rec, delta=DeltaType.FOSSIL)
        await c.connect()
        await sub.subscribe()
        await sub.ready(10)
        text = "An answer that grows, word by word, as a model writes it:"
        want = []
        for i in range(30):
            text += f" wörd{i} ✓"
            want.append({"i": i, "text": text})
        for w in want:
            await asyncio.to_thread(api, server, "publish", {"channel": sub.channel, "data": w, "delta": True})
        await rec.wait(lambda: len(rec.pubs) == len(want))
        assert [undata(encoding, p.data) for p in rec.pubs] == want
        assert sum(1 for p in rec.pubs if p.delta) == len(want) - 1, "every publication after the first is a delta"
        await c.disconnect()

    run(scenario())


@pytest.mark.compat(CLIENT, "tag filter")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_tags_filter(server, encoding):
    from centrifuge import Filter

    async def scenario():
        c, _ = client(server.ws, encoding)
        rec = Recorder()
        f = Filter.all(Filter.is_in("kind", ["a", "b"]), Filter.gt("price", "9.5"))
        sub = c.new_subscription(f"tags:{chan('f')}", events=rec, tags_filter=f)
        await c.connect()
        await sub.subscribe()
        await sub.ready(10)
        cases = [("a", "10"), ("b", "9"), ("c", "100"), ("b", "9.75"), ("a", "abc")]
        for n, (kind, price) in enumerate(cases):
            body = {"channel": sub.channel, "data": {"n": n}, "tags": {"kind": kind, "price": price}}
            await asyncio.to_thread(api, server, "publish", body)
        await rec.wait(lambda: len(rec.pubs) >= 2)
        await asyncio.to_thread(api, server, "publish", {"channel": sub.channel, "data": {"n": 9}, "tags": {"kind": "a", "price": "11"}})
        await rec.wait(lambda: len(rec.pubs) >= 3)
        assert [undata(encoding, p.data)["n"] for p in rec.pubs] == [0, 3, 9]
        await c.disconnect()

    run(scenario())
