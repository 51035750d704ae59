-- The outbox table of a Holdfast `postgresql` consumer (Centrifugo's layout: a table made for
-- Centrifugo works unchanged). A backend inserts a row in the same transaction as its own
-- data; Holdfast runs the row's server API command (`method` + `payload`) once the transaction
-- committed, and deletes the row after the publication is stored. A rolled-back transaction
-- never publishes.
--
--   INSERT INTO holdfast_outbox (method, payload, partition)
--   VALUES ('publish', '{"channel": "notifications:42", "data": {"text": "hi"}}', 0);
--
-- Rows of one partition run in id order; put a channel's rows in one partition
-- (for example hashtext(channel) modulo num_partitions) to keep its publications in order.
CREATE TABLE IF NOT EXISTS holdfast_outbox (
    id BIGSERIAL PRIMARY KEY,
    method TEXT NOT NULL,
    payload JSONB NOT NULL,
    partition INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS holdfast_outbox_partition_id ON holdfast_outbox (partition, id);

-- Optional: wake the consumer at once instead of at its next poll
-- (`partition_notification_channel = "holdfast_outbox"`).
CREATE OR REPLACE FUNCTION holdfast_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('holdfast_outbox', NEW.partition::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS holdfast_outbox_notify ON holdfast_outbox;
CREATE TRIGGER holdfast_outbox_notify AFTER INSERT ON holdfast_outbox
    FOR EACH ROW EXECUTE FUNCTION holdfast_outbox_notify();
