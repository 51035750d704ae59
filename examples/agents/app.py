"""agents: a multi-agent chat backend (seeds 003 and 004).

A user's message arrives by RPC through Holdfast's rpc proxy (`POST /holdfast/rpc`): the backend
answers at once ("accepted") and runs the agents in a task that streams their progress as
publications to the user's personal channel `agents:#<user>` with `cent`. Every browser of the
user is subscribed to that channel by the server, so a second or fifth browser opened mid-answer
shows the same conversation (history first, then live), and none can orphan another: the
backend never holds a WebSocket. An agent that fails is reported in the conversation as an error
message, and the next question works as usual.

Environment (besides shared.py's): AGENT_STEP (seconds of simulated work per step).
"""

import asyncio
import logging
import os
import pathlib
import sys
import time
import uuid

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


async def run_agents(user: str, turn: str, text: str) -> None:
    """One answer: each agent's steps, then the answer, or an error message. Never raises."""
    try:
        await post(user, kind="user", turn=turn, text=text)
        for agent, steps in AGENTS:
            for step in steps:
                await asyncio.sleep(STEP)  # the agent's (simulated) work
                if agent == "researcher" and "fail" in text.lower():
                    raise RuntimeError("the source server answered 503")
                await post(user, kind="progress", turn=turn, agent=agent, text=step)
        await post(user, kind="answer", turn=turn, text=f"Here is what the agents found about: {text}")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # reported to the user; the conversation goes on
        log.warning("turn %s failed: %s", turn, e)
        try:
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
