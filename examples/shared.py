"""What the example backends share: settings from the environment, the `cent` client's lifespan,
connection tokens, input checks, and the static files every page loads (`/centrifuge.js` from
npm, `/shared.css`).

    app = example_app("notify")      # FastAPI app with those routes
    settings = app.state.settings    # .api, .ws, .api_key, .secret
    await app.state.holdfast.publish(PublishRequest(...))
"""

import os
import pathlib
import time
from contextlib import asynccontextmanager, nullcontext

import jwt
from cent import AsyncClient
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

EXAMPLES = pathlib.Path(__file__).resolve().parent
CENTRIFUGE_JS = EXAMPLES / "node_modules" / "centrifuge" / "dist" / "centrifuge.js"


class Settings:
    """HOLDFAST_API, HOLDFAST_WS, HOLDFAST_API_KEY, HOLDFAST_SECRET (defaults: the example's
    config.toml on port 8000)."""

    def __init__(self, name: str):
        self.api = os.environ.get("HOLDFAST_API", "http://127.0.0.1:8000")
        self.ws = os.environ.get("HOLDFAST_WS", "ws://127.0.0.1:8000/connection/websocket")
        self.api_key = os.environ.get("HOLDFAST_API_KEY", f"{name}-example-api-key-change-me")
        self.secret = os.environ.get("HOLDFAST_SECRET", f"{name}-example-secret-change-me")


def check_name(value: str, what: str = "user") -> str:
    """User and room names: 1-64 letters, digits, '-', '_' or '.' (HTTP 400 otherwise)."""
    if not (0 < len(value) <= 64) or not all(c.isalnum() or c in "-_." for c in value):
        raise HTTPException(400, f"{what} must be 1-64 letters, digits, '-', '_' or '.'")
    return value


def connection_token(settings: Settings, user: str, ttl: int = 600, **claims) -> str:
    """An HS256 connection token for `user`, valid `ttl` seconds."""
    body = {"sub": check_name(user), "exp": int(time.time()) + ttl, **claims}
    return jwt.encode(body, settings.secret, algorithm="HS256")


def example_app(
    name: str, page: pathlib.Path, on_shutdown=None, token_ttl: int = 600, resources=None
) -> FastAPI:
    """The app: `/` serves `page`, `/api/session?user=` returns what a login would (the WebSocket
    URL and a connection token valid `token_ttl` seconds); the `cent` client lives in
    app.state.holdfast. `resources(app)`, an async context manager, is entered at startup and
    left at shutdown (a database pool, say)."""
    settings = Settings(name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.holdfast = AsyncClient(f"{settings.api}/api", settings.api_key)  # needs the loop
        async with resources(app) if resources else nullcontext():
            yield
        if on_shutdown:
            on_shutdown()
        await app.state.holdfast.close()

    app = FastAPI(title=name, lifespan=lifespan)
    app.state.settings = settings

    @app.get("/")
    async def index():
        return FileResponse(page)

    @app.get("/centrifuge.js")
    async def centrifuge_js():
        if not CENTRIFUGE_JS.exists():
            raise HTTPException(500, "run `npm ci` in examples/ (run.sh does it)")
        return FileResponse(CENTRIFUGE_JS, media_type="text/javascript")

    @app.get("/shared.css")
    async def shared_css():
        return FileResponse(EXAMPLES / "shared.css", media_type="text/css")

    @app.get("/api/session")
    async def session(user: str):
        token = connection_token(settings, user, token_ttl)
        return {"ws": settings.ws, "token": token, "ttl": token_ttl}

    return app
