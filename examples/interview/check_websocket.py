"""The seed's own check, against Holdfast: a plain `websockets` client connects to the server's
WebSocket, authenticates, pings and gets its answers, with asyncio in debug mode; any asyncio
error or warning fails the check.

    python check_websocket.py http://127.0.0.1:8080 interview-id
"""

import asyncio
import json
import logging
import sys
import urllib.request

import websockets

problems = []


class Collect(logging.Handler):
    def emit(self, record):
        problems.append(self.format(record))


logging.getLogger("asyncio").addHandler(Collect(level=logging.WARNING))


async def main(backend: str, interview: str) -> None:
    with urllib.request.urlopen(f"{backend}/api/session?user=checker") as r:
        session = json.load(r)
    async with websockets.connect(session["ws"], subprotocols=["centrifuge-json"]) as ws:
        print("Connected!")
        await ws.send(json.dumps({"id": 1, "connect": {"token": session["token"]}}))
        reply = json.loads(await ws.recv())
        assert "connect" in reply, reply
        print(f"connect: client {reply['connect']['client']}")
        pong = await ws.ping()  # WebSocket ping → pong
        latency = await asyncio.wait_for(pong, 5)
        print(f"ping: answered in {latency * 1000:.2f} ms")
        await ws.send(json.dumps({"id": 2, "history": {"channel": f"interview:{interview}", "limit": -1}}))
        reply = json.loads(await ws.recv())
        assert "history" in reply, reply
        print(f"history: {len(reply['history'].get('publications', []))} entries")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]), debug=True)
    if problems:
        print("asyncio problems:", *problems, sep="\n", file=sys.stderr)
        sys.exit(1)
    print("no asyncio errors")
