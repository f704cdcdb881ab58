-- Version 11 of the schema: PostgreSQL gained cantata_write_runs (a batch of run
-- creations and checkpoints as one statement). SQLite needs nothing new: its writer
-- thread already commits a batch without a round trip per statement.
SELECT 1;
