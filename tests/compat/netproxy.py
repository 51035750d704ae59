"""A TCP proxy the tests control like a network: `offline` refuses new connections and
`drop()` cuts the open ones (the transport is lost without a close frame)."""

from __future__ import annotations

import asyncio


class NetProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.offline = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> "NetProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.offline:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.transport.abort()
                self._writers.discard(w)

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def drop(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.drop()
        if self._server:
            self._server.close()
