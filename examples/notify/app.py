"""notify: the backend of the cold-start example (seed 001).

The backend never asks whether a user is connected. It publishes to the user's personal channel
through the Holdfast server API (with `cent`); Holdfast keeps the message in the channel's
history and delivers it when the user's page connects, or at once if it already is. There is no
retry loop, no "no connections for user" state, nothing to wait for.
"""

import pathlib
import sys
import time

from cent import PublishRequest
from pydantic import BaseModel, Field

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from shared import check_name, example_app  # noqa: E402

app = example_app("notify", HERE / "index.html")


class Notification(BaseModel):
    text: str = Field(min_length=1, max_length=500)



@app.post("/api/notify/{user}")
async def notify(user: str, n: Notification):
    """Sends to the user now, connected or not."""
    r = await app.state.holdfast.publish(
        PublishRequest(
            channel=f"notify:#{check_name(user)}", data={"text": n.text, "sent_at": time.time()}
        )
    )
    return {"offset": r.offset, "epoch": r.epoch}
