"""chat: the backend of the React chat example (seed 002).

It only issues short-lived connection tokens (30 s by default): the page's `getToken` asks for a
fresh one whenever the client needs it (first connect, before expiry, after a reconnect), so
a stale token never surfaces as a 403 and the connection never drops to renew it. Messages go
from the browser straight to Holdfast (client publish into `room:*`, allowed for subscribers).

Environment (besides shared.py's): TOKEN_TTL (seconds).
"""

import os
import pathlib
import sys

from fastapi import HTTPException
from fastapi.responses import FileResponse

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from shared import example_app  # noqa: E402

TOKEN_TTL = int(os.environ.get("TOKEN_TTL", "30"))
app = example_app("chat", HERE / "index.html", token_ttl=TOKEN_TTL)


@app.get("/app.js")
async def bundle():
    built = HERE / "static" / "app.js"
    if not built.exists():
        raise HTTPException(500, "build the page first: examples/chat/build.sh")
    return FileResponse(built, media_type="text/javascript")
