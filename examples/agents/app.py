"""agents: a multi-agent chat backend (seeds 003 and 004).

A user's message arrives by RPC through Holdfast's rpc proxy (`POST /holdfast/rpc`): the backend
answers at once ("accepted") and runs the agents in a task that streams their progress as
publications to the user's personal channel `agents:#<user>` with `cent`. Every browser of the
user is subscribed to that channel by the server, so a second or fifth browser opened mid-answer
shows the same conversation (history first, then live), and none can orphan another: the
backend never holds a WebSocket. An agent that fails is reported in the conversation as an error
message, and the next question works as usual. Each agent's live status (state, step, progress,
last update) is a key of the map channel `status:#<user>`, written with the server API's
`map_publish`: every browser shows the current state on open and each change after it.

Environment (besides shared.py's): AGENT_STEP (seconds of simulated work per step).
"""

import asyncio
import logging
import os
import pathlib
import sys
import time
import uuid

import httpx
from cent import PublishRequest
from fastapi import Request
from fastapi.responses import HTMLResponse

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from shared import example_app  # noqa: E402

STEP = float(os.environ.get("AGENT_STEP", "0.4"))
AGENTS = [
    ("planner", ["reading the question", "splitting it into tasks"]),
    ("researcher", ["looking for sources", "checking facts"]),
    ("writer", ["drafting", "polishing"]),
]

log = logging.getLogger("agents")
running: set[asyncio.Task] = set()
app = example_app("agents", HERE / "index.html", on_shutdown=lambda: [t.cancel() for t in running])


async def post(user: str, **data) -> None:
    await app.state.holdfast.publish(
        PublishRequest(channel=f"agents:#{user}", data={**data, "at": time.time()})
    )


async def status(user: str, agent: str, **data) -> None:
    """Sets `agent`'s entry in the user's status map (server API `map_publish`)."""
    s = app.state.settings
    async with httpx.AsyncClient(timeout=5) as http:
        r = await http.post(
            f"{s.api}/api/map_publish",
            headers={"X-API-Key": s.api_key},
            json={"channel": f"status:#{user}", "key": agent, "data": {**data, "at": time.time()}},
        )
    r.raise_for_status()
    if "error" in r.json():
        raise RuntimeError(f"map_publish: {r.json()['error']}")


async def run_agents(user: str, turn: str, text: str) -> None:
    """One answer: each agent's steps, then the answer, or an error message. Never raises."""
    current = None
    try:
        await post(user, kind="user", turn=turn, text=text)
        for agent, _ in AGENTS:
            await status(user, agent, state="waiting", turn=turn, step="", progress=0)
        for agent, steps in AGENTS:
            current = agent
            for i, step in enumerate(steps):
                await status(user, agent, state="working", turn=turn, step=step, progress=i / len(steps))
                await asyncio.sleep(STEP)  # the agent's (simulated) work
                if agent == "researcher" and "fail" in text.lower():
                    raise RuntimeError("the source server answered 503")
                await post(user, kind="progress", turn=turn, agent=agent, text=step)
            await status(user, agent, state="done", turn=turn, step=steps[-1], progress=1)
        await post(user, kind="answer", turn=turn, text=f"Here is what the agents found about: {text}")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # reported to the user; the conversation goes on
        log.warning("turn %s failed: %s", turn, e)
        try:
            if current:
                await status(user, current, state="failed", turn=turn, step=str(e), progress=0)
            await post(user, kind="error", turn=turn, text=f"The agents could not finish: {e}. Ask again.")
        except Exception:
            log.exception("could not report the failure of turn %s", turn)


@app.get("/follow")
async def follow():
    """A read-only page that follows the conversation with a plain EventSource (uni_sse)."""
    return HTMLResponse((HERE / "follow.html").read_text())


@app.post("/holdfast/rpc")
async def rpc(request: Request):
    """Holdfast's rpc proxy: {"method", "data", "user", ...} → {"result": {"data"}} or {"error"}."""
    body = await request.json()
    if body.get("method") != "ask":
        return {"error": {"code": 404, "message": "unknown method"}}
    user = body.get("user") or ""
    text = str((body.get("data") or {}).get("text", "")).strip()
    if not user:
        return {"error": {"code": 401, "message": "sign in first"}}
    if not 0 < len(text) <= 2000:
        return {"error": {"code": 400, "message": "a question of 1-2000 characters"}}
    turn = uuid.uuid4().hex[:8]
    task = asyncio.create_task(run_agents(user, turn, text))
    running.add(task)
    task.add_done_callback(running.discard)
    return {"result": {"data": {"accepted": turn}}}
