"""notify-outbox: the notify example with publishing that cannot be lost.

The backend never calls Holdfast. It writes its own row and the notification in ONE PostgreSQL
transaction: the notification is a row of the outbox table (deploy/postgresql/outbox.sql), which
Holdfast's `postgresql` consumer publishes to the user's channel `notify:#<user>` and then
deletes. A transaction that rolls back never notifies; one that commits always does, exactly
once, even when Holdfast is down or killed at that moment (it publishes when it is back).

DATABASE_URL names the database (run.sh starts a throwaway one).
"""

import json
import os
import pathlib
import sys
from contextlib import asynccontextmanager

import asyncpg
from fastapi import HTTPException
from pydantic import BaseModel, Field

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from shared import check_name, example_app  # noqa: E402

OUTBOX_DDL = (HERE.parent.parent / "deploy" / "postgresql" / "outbox.sql").read_text()
APP_DDL = """
CREATE TABLE IF NOT EXISTS notifications (
    id BIGSERIAL PRIMARY KEY,
    user_id TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""


@asynccontextmanager
async def database(app):
    """A connection pool in app.state.db; the tables are created when missing."""
    pool = await asyncpg.create_pool(
        os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    async with pool.acquire() as db:
        await db.execute(APP_DDL + OUTBOX_DDL)
    app.state.db = pool
    yield
    await pool.close()


app = example_app("notify-outbox", HERE / "index.html", resources=database)


class Notification(BaseModel):
    text: str = Field(min_length=1, max_length=500)
    fail: bool = False  # fail after both inserts: the transaction rolls back


@app.post("/api/notify/{user}")
async def notify(user: str, n: Notification):
    """Stores the notification and queues it for the user in one transaction."""
    channel = f"notify:#{check_name(user)}"
    async with app.state.db.acquire() as db, db.transaction():
        row = await db.fetchrow(
            "INSERT INTO notifications (user_id, text) VALUES ($1, $2) RETURNING id, created_at",
            user, n.text,
        )
        data = {"id": row["id"], "text": n.text, "sent_at": row["created_at"].timestamp()}
        await db.execute(
            "INSERT INTO holdfast_outbox (method, payload, partition) VALUES ('publish', $1::jsonb, 0)",
            json.dumps({"channel": channel, "data": data}),
        )
        if n.fail:
            # Whatever goes wrong after the inserts: the exception rolls both rows back.
            raise HTTPException(409, f"rolled back: notification {row['id']} was never sent")
    return {"id": row["id"]}
