-- Outbox rows the relay cannot publish, whatever it retries (too big for the NATS server or
-- the events stream, a subject NATS refuses), are parked: kept with when and why, never
-- deleted by the relay. Until an operator retries or skips it (flowctl outbox), the relay
-- holds back the later rows of its flow (the token after evt. / out., lower-cased), so that
-- flow's events stay gapless and in order, while every other flow's go on.

ALTER TABLE outbox ADD COLUMN parked_at timestamptz, ADD COLUMN parked_reason text;

-- Only parked rows are indexed (normally none): the relay's next-batch query asks it, per
-- candidate row, whether the row's flow has a parked row.
CREATE INDEX outbox_parked_flow_idx ON outbox (lower(split_part(topic, '.', 2)))
    WHERE parked_at IS NOT NULL;
