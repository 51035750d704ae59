"""The `cent` server-API SDK (PyPI) against a real holdfast process."""

import asyncio
import uuid

import pytest
from cent import (
    BroadcastRequest,
    ChannelsRequest,
    Client,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    StreamPosition,
)
from cent.exceptions import CentApiResponseError, CentUnauthorizedError
from centrifuge import Client as WsClient
from centrifuge import SubscriptionEventHandler

from harness import API_KEY, token


def chan(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cent(server):
    return Client(server.api, API_KEY)


@pytest.mark.compat("cent", "publish, history with limit/since/reverse")
def test_publish_and_history(cent):
    ch = chan("cent")
    results = [cent.publish(PublishRequest(channel=ch, data={"n": n})) for n in range(1, 6)]
    assert [r.offset for r in results] == [1, 2, 3, 4, 5]
    epoch = results[0].epoch
    assert len(epoch) == 8 and all(r.epoch == epoch for r in results)
    h = cent.history(HistoryRequest(channel=ch, limit=-1))
    assert [p.data for p in h.publications] == [{"n": n} for n in range(1, 6)]
    assert (h.offset, h.epoch) == (5, epoch)
    page = cent.history(HistoryRequest(channel=ch, limit=2, since=StreamPosition(offset=2, epoch=epoch)))
    assert [p.offset for p in page.publications] == [3, 4]
    rev = cent.history(HistoryRequest(channel=ch, limit=2, reverse=True))
    assert [p.offset for p in rev.publications] == [5, 4]


@pytest.mark.compat("cent", "idempotent publish")
def test_idempotent_publish(cent):
    ch = chan("idem")
    a = cent.publish(PublishRequest(channel=ch, data={"x": 1}, idempotency_key="k"))
    b = cent.publish(PublishRequest(channel=ch, data={"x": 1}, idempotency_key="k"))
    assert (a.offset, a.epoch) == (b.offset, b.epoch)
    assert len(cent.history(HistoryRequest(channel=ch, limit=-1)).publications) == 1


@pytest.mark.compat("cent", "presence, presence_stats, channels")
def test_presence_of_a_real_client(server, cent):
    ch = chan("presence")

    async def scenario():
        ws = WsClient(server.ws, token=token("42"))
        subscribed = asyncio.Event()

        class Events(SubscriptionEventHandler):
            async def on_subscribed(self, ctx):
                subscribed.set()

        sub = ws.new_subscription(ch, events=Events())
        await ws.connect()
        await sub.subscribe()
        await asyncio.wait_for(subscribed.wait(), 10)
        p = await asyncio.to_thread(cent.presence, PresenceRequest(channel=ch))
        stats = await asyncio.to_thread(cent.presence_stats, PresenceStatsRequest(channel=ch))
        chans = await asyncio.to_thread(cent.channels, ChannelsRequest(pattern=ch))
        await ws.disconnect()
        return p, stats, chans

    p, stats, chans = asyncio.run(scenario())
    assert [c.user for c in p.presence.values()] == ["42"]
    assert (stats.num_clients, stats.num_users) == (1, 1)
    assert chans.channels[ch].num_clients == 1


@pytest.mark.compat("cent", "broadcast, info, error codes")
def test_broadcast_info_and_errors(cent):
    chs = [chan("b"), chan("b")]
    res = cent.broadcast(BroadcastRequest(channels=chs, data={"all": True}))
    assert [r.result.offset for r in res.responses] == [1, 1]
    info = cent.info(InfoRequest())
    assert len(info.nodes) == 1 and info.nodes[0].uid
    with pytest.raises(CentApiResponseError) as e:
        cent.publish(PublishRequest(channel="nonexistent:x", data={}))
    assert e.value.code == 102


@pytest.mark.compat("cent", "wrong API key is unauthorized")
def test_wrong_key_is_unauthorized(server):
    with pytest.raises(CentUnauthorizedError):
        Client(server.api, "wrong-key").publish(PublishRequest(channel="x", data={}))
