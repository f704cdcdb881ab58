-- Version 19 of the SQLite schema: a delivery settled `done` after it was dead-lettered
-- takes its dead letters with it. Two copies of one delivery can run at once (a broker
-- redelivers while the first still runs, or a worker's lease runs out): one may
-- dead-letter it and the other complete it. The completion is what happened; a dead
-- letter left behind could be replayed, and the replay would put the handled delivery
-- back to be handled again, its effect applied twice. The trigger fires only for that
-- change of status (dead to done), never on a hop's usual settlement.
CREATE TRIGGER IF NOT EXISTS deliveries_handled_drop_dead_letters
AFTER UPDATE OF status ON deliveries
WHEN OLD.status = 'dead' AND NEW.status = 'done'
BEGIN
    DELETE FROM dead_letters
    WHERE app = NEW.app AND event_id = NEW.event_id AND grp = NEW.grp;
END;

-- The dead letters of deliveries handled since, left by earlier versions.
DELETE FROM dead_letters WHERE EXISTS (
    SELECT 1 FROM deliveries d
    WHERE d.app = dead_letters.app AND d.grp = dead_letters.grp
        AND d.event_id = dead_letters.event_id AND d.status = 'done'
);
