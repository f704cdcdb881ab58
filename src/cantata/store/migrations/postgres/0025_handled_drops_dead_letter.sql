-- Version 25 of the PostgreSQL schema: a delivery settled `done` after it was
-- dead-lettered takes its dead letters with it. Two copies of one delivery can run at
-- once (a broker redelivers while the first still runs, or a worker's lease runs out):
-- one may dead-letter it and the other complete it. The completion is what happened;
-- a dead letter left behind could be replayed, and the replay would put the handled
-- delivery back to be handled again, its effect applied twice. The trigger fires only
-- for that change of status (dead to done), never on a hop's usual settlement. A
-- replay locks the delivery before it takes the dead letter (postgres_events), the
-- order a settlement locks them in.
CREATE FUNCTION cantata_drop_handled_dead_letters() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM dead_letters
    WHERE app = NEW.app AND event_id = NEW.event_id AND grp = NEW.grp;
    RETURN NULL;
END
$$;
CREATE TRIGGER deliveries_handled_drop_dead_letters AFTER UPDATE OF status ON deliveries
FOR EACH ROW WHEN (OLD.status = 'dead' AND NEW.status = 'done')
EXECUTE FUNCTION cantata_drop_handled_dead_letters();

-- The dead letters of deliveries handled since, left by earlier versions.
DELETE FROM dead_letters l USING deliveries d
WHERE d.app = l.app AND d.grp = l.grp AND d.event_id = l.event_id AND d.status = 'done';
