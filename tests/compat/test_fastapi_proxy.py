"""Proxies to a real FastAPI backend, with centrifuge-python as the client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
import pathlib

import pytest
from centrifuge import Client, ClientEventHandler, SubscriptionEventHandler

from harness import API_KEY, SECRET, Server, free_port

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def backend():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "backend_app:app", "--port", str(port), "--log-level", "warning"],
        cwd=HERE,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=1)
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("backend did not start")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def proxied(backend):
    config = f"""
[client.token]
hmac_secret_key = "{SECRET}"
[http_api]
key = "{API_KEY}"
[engine]
type = "memory"
[client.proxy.connect]
enabled = true
endpoint = "{backend}/centrifugo/connect"
[rpc.proxy]
endpoint = "{backend}/centrifugo/rpc"
[rpc.without_namespace]
proxy_enabled = true
[channel.proxy.publish]
endpoint = "{backend}/centrifugo/publish"
[channel.without_namespace]
allow_subscribe_for_client = true
publish_proxy_enabled = true
"""
    with Server(config) as s:
        yield s


class Events(ClientEventHandler):
    def __init__(self):
        self.disconnected = asyncio.Queue()

    async def on_disconnected(self, ctx):
        await self.disconnected.put(ctx)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.compat("FastAPI backend", "connect proxy from a session cookie, rpc proxy, publish proxy")
def test_fastapi_backend_decides(proxied):
    async def scenario():
        c = Client(proxied.ws, headers={"Cookie": "sid=sid-alice"})
        await c.connect()
        await c.ready(10)
        r = await c.rpc("add", {"a": 2, "b": 3})
        assert r.data == {"sum": 5, "by": "alice"}
        with pytest.raises(Exception) as e:
            await c.rpc("fail", {})
        assert getattr(e.value, "code", None) == 1002
        got = asyncio.Queue()

        class SubEvents(SubscriptionEventHandler):
            async def on_publication(self, ctx):
                await got.put(ctx.pub.data)

        sub = c.new_subscription("moderated", events=SubEvents())
        await sub.subscribe()
        await sub.ready(10)
        await sub.publish({"text": "what a darn day"})
        assert await asyncio.wait_for(got.get(), 10) == {"text": "what a **** day", "by": "alice"}
        await c.disconnect()

    run(scenario())


@pytest.mark.compat("FastAPI backend", "connect proxy refuses an unknown session (4501)")
def test_fastapi_backend_refuses(proxied):
    async def scenario():
        ev = Events()
        c = Client(proxied.ws, events=ev, headers={"Cookie": "sid=nobody"})
        await c.connect()
        ctx = await asyncio.wait_for(ev.disconnected.get(), 10)
        assert ctx.code == 4501

    run(scenario())
