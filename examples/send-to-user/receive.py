"""Connects as a user with `centrifuge-python` and prints the messages of the personal channel,
including those sent before this connection existed.

Usage: receive.py USER EXPECTED_COUNT
"""

import asyncio
import os
import sys
import time

import jwt
from centrifuge import Client, ClientEventHandler

URL = os.environ.get("SERVER_WS", "ws://127.0.0.1:8000/connection/websocket")
SECRET = os.environ.get("TOKEN_SECRET", "example-secret-change-me")


async def main(user: str, expected: int) -> int:
    got: list[str] = []
    done = asyncio.Event()

    class Events(ClientEventHandler):
        async def on_connected(self, ctx):
            print(f"connected as user {user} (client {ctx.client})")

        async def on_subscribed(self, ctx):
            print(f"subscribed to {ctx.channel}: recovered={ctx.recovered}")

        async def on_publication(self, ctx):
            got.append(ctx.pub.data["text"])
            print(f"message {ctx.pub.offset} on {ctx.channel}: {ctx.pub.data['text']}")
            if len(got) >= expected:
                done.set()

    token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    client = Client(URL, token=token, events=Events())
    await client.connect()
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    except asyncio.TimeoutError:
        print(f"only {len(got)} of {expected} messages arrived", file=sys.stderr)
        return 1
    finally:
        await client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]))))
