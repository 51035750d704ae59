"""FastAPI peer for holdfast-bench: the FastAPI-docs "connection manager" pattern.

Usage: python bench/peers/fastapi/server.py <port>

  /ws?channels=a,b  subscriber: accepted, added to each channel, sent the text
                    frame "ready"; incoming frames are ignored until disconnect.
  /pub              publisher: each text frame is "<channel>\\n<payload>"; the
                    payload is sent, one socket after another, to every
                    subscriber of that channel. A socket whose send fails is
                    dropped.
"""

import sys
import warnings

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect


class ConnectionManager:
    def __init__(self) -> None:
        self.channels: dict[str, set[WebSocket]] = {}

    def subscribe(self, websocket: WebSocket, channels: list[str]) -> None:
        for channel in channels:
            self.channels.setdefault(channel, set()).add(websocket)

    def unsubscribe(self, websocket: WebSocket, channels: list[str]) -> None:
        for channel in channels:
            members = self.channels.get(channel)
            if members is None:
                continue
            members.discard(websocket)
            if not members:
                del self.channels[channel]

    async def broadcast(self, channel: str, payload: str) -> None:
        members = self.channels.get(channel)
        if not members:
            return
        dead: list[WebSocket] = []
        # Copy: the set may change while we await each send.
        for websocket in list(members):
            try:
                await websocket.send_text(payload)
            except Exception:
                dead.append(websocket)
        for websocket in dead:
            members.discard(websocket)
        if not members and self.channels.get(channel) is members:
            del self.channels[channel]


manager = ConnectionManager()
app = FastAPI()


@app.websocket("/ws")
async def subscribe(websocket: WebSocket, channels: str = "") -> None:
    names = [c for c in channels.split(",") if c]
    await websocket.accept()
    manager.subscribe(websocket, names)
    try:
        await websocket.send_text("ready")
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        manager.unsubscribe(websocket, names)


@app.websocket("/pub")
async def publish(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            frame = await websocket.receive_text()
            channel, sep, payload = frame.partition("\n")
            if not sep:
                continue
            await manager.broadcast(channel, payload)
    except WebSocketDisconnect:
        pass


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: server.py <port>", file=sys.stderr)
        sys.exit(2)
    port = int(sys.argv[1])
    # ws="websockets" is the legacy implementation the seeds ran; uvicorn 0.54 warns about it.
    warnings.filterwarnings("ignore", message="The `websockets` implementation is deprecated")
    print(f"fastapi peer starting on 127.0.0.1:{port}", file=sys.stderr)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets")


if __name__ == "__main__":
    main()
