"""A small FastAPI backend answering Holdfast's proxies (what an application writes).

Run alone with: uvicorn backend_app:app --port 9000  (from tests/compat, in its venv)
"""

from fastapi import FastAPI, Request

app = FastAPI()
SESSIONS = {"sid-alice": "alice", "sid-bob": "bob"}


@app.post("/centrifugo/connect")
async def connect(request: Request):
    # The user comes from the application's own session cookie: no token needed.
    sid = request.cookies.get("sid", "")
    user = SESSIONS.get(sid)
    if user is None:
        return {"disconnect": {"code": 4501, "reason": "unauthorized"}}
    return {"result": {"user": user, "info": {"name": user.title()}, "data": {"hello": user}}}


@app.post("/centrifugo/rpc")
async def rpc(request: Request):
    body = await request.json()
    method = body["method"]
    if method == "add":
        d = body.get("data") or {}
        return {"result": {"data": {"sum": d.get("a", 0) + d.get("b", 0), "by": body["user"]}}}
    if method == "fail":
        return {"error": {"code": 1002, "message": "backend says no"}}
    return {"error": {"code": 404, "message": "unknown method"}}


@app.post("/centrifugo/publish")
async def publish(request: Request):
    body = await request.json()
    text = (body.get("data") or {}).get("text", "")
    # Moderation: the backend rewrites what is published.
    return {"result": {"data": {"text": text.replace("darn", "****"), "by": body["user"]}}}
