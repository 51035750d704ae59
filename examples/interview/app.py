"""interview: the backend of the interview example (seed 000).

Questions (from the interviewer view) and answers (from the candidate view) go through this
backend, which checks the role and publishes them to the interview's channel with `cent`. Views
load the transcript from the channel's history and subscribe from its end, so a refresh or a
network drop continues exactly where the view was. The backend holds no WebSocket and no session
state: there is nothing here to restore, leak or get wrong with asyncio.
"""

import pathlib
import sys
import time
from typing import Literal

from cent import PublishRequest
from pydantic import BaseModel, Field

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from shared import check_name, example_app  # noqa: E402

app = example_app("interview", HERE / "index.html")


class Entry(BaseModel):
    role: Literal["interviewer", "candidate"]
    user: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1, max_length=2000)



@app.post("/api/interviews/{interview}/entries")
async def add_entry(interview: str, e: Entry):
    """The interviewer asks, the candidate answers; both views receive it."""
    kind = "question" if e.role == "interviewer" else "answer"
    r = await app.state.holdfast.publish(
        PublishRequest(
            channel=f"interview:{check_name(interview, 'interview')}",
            data={"kind": kind, "by": e.user, "text": e.text, "at": time.time()},
        )
    )
    return {"offset": r.offset}
