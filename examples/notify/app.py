"""notify: the backend of the cold-start example (seed 001).

The backend never asks whether a user is connected. It publishes to the user's personal channel
through the Holdfast server API (with `cent`); Holdfast keeps the message in the channel's
history and delivers it when the user's page connects, or at once if it already is. There is no
retry loop, no "no connections for user" state, nothing to wait for.

Environment: HOLDFAST_API (http://host:port), HOLDFAST_WS (ws://…/connection/websocket),
HOLDFAST_API_KEY, HOLDFAST_SECRET.
"""

import os
import pathlib
import time
from contextlib import asynccontextmanager

import jwt
from cent import AsyncClient, PublishRequest
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

HERE = pathlib.Path(__file__).resolve().parent
CENTRIFUGE_JS = HERE.parent / "node_modules" / "centrifuge" / "dist" / "centrifuge.js"
API = os.environ.get("HOLDFAST_API", "http://127.0.0.1:8000")
WS = os.environ.get("HOLDFAST_WS", "ws://127.0.0.1:8000/connection/websocket")
API_KEY = os.environ.get("HOLDFAST_API_KEY", "notify-example-api-key-change-me")
SECRET = os.environ.get("HOLDFAST_SECRET", "notify-example-secret-change-me")

holdfast: AsyncClient


@asynccontextmanager
async def lifespan(_app):
    global holdfast
    holdfast = AsyncClient(f"{API}/api", API_KEY)  # needs the running event loop
    yield
    await holdfast.close()


app = FastAPI(title="notify", lifespan=lifespan)


class Notification(BaseModel):
    text: str = Field(min_length=1, max_length=500)


def valid_user(user: str) -> str:
    if not (0 < len(user) <= 64) or not all(c.isalnum() or c in "-_." for c in user):
        raise HTTPException(400, "user must be 1-64 letters, digits, '-', '_' or '.'")
    return user


@app.get("/")
async def page():
    return FileResponse(HERE / "index.html")


@app.get("/centrifuge.js")
async def centrifuge_js():
    if not CENTRIFUGE_JS.exists():
        raise HTTPException(500, "run `npm ci` in examples/ (run.sh does it)")
    return FileResponse(CENTRIFUGE_JS, media_type="text/javascript")


@app.get("/api/session")
async def session(user: str):
    """What a login would return: the WebSocket URL and a connection token for the user."""
    user = valid_user(user)
    claims = {"sub": user, "exp": int(time.time()) + 600}
    return {"ws": WS, "token": jwt.encode(claims, SECRET, algorithm="HS256")}


@app.post("/api/notify/{user}")
async def notify(user: str, n: Notification):
    """Sends to the user now, connected or not."""
    user = valid_user(user)
    r = await holdfast.publish(
        PublishRequest(channel=f"notify:#{user}", data={"text": n.text, "sent_at": time.time()})
    )
    return {"offset": r.offset, "epoch": r.epoch}
