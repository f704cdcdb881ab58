-- The store's identity: a broker stream records which store owns it, so two stores
-- (two environments) sharing an app name on one NATS server never share a stream.
CREATE TABLE IF NOT EXISTS store_identity (
    id text PRIMARY KEY
);
INSERT INTO store_identity (id)
    SELECT md5(random()::text || clock_timestamp()::text)
    WHERE NOT EXISTS (SELECT 1 FROM store_identity);

-- Events that came from the broker (stored only to list their dead letters): the
-- outbox relay never sends them back, and a re-drive leaves them alone.
ALTER TABLE events ADD COLUMN IF NOT EXISTS external boolean NOT NULL DEFAULT false;
