-- The wait engine's indexes: what each waiting flow can be woken by, and durable signals.
-- Rows are written in the same transaction as the flow change that creates or ends a wait.

CREATE TABLE wait_conditions (
    id             bigserial   PRIMARY KEY,
    flow_id        uuid        NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
    kind           text        NOT NULL CHECK (kind IN ('timer', 'timeout', 'subject', 'signal', 'cancel')),
    due_at         timestamptz,
    subject        text,
    correlation_id text,
    name           text,
    on_timeout     text        NOT NULL DEFAULT 'resume' CHECK (on_timeout IN ('resume', 'fail')),
    claimed_until  timestamptz
);

-- A tick reads only the due rows: an index range scan on due_at, whatever the number of
-- waiting flows.
CREATE INDEX wait_conditions_due_idx ON wait_conditions (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX wait_conditions_subject_idx ON wait_conditions (subject, correlation_id)
    WHERE subject IS NOT NULL;
CREATE INDEX wait_conditions_flow_idx ON wait_conditions (flow_id);

CREATE TABLE flow_signals (
    id          bigserial   PRIMARY KEY,
    flow_id     uuid        NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    payload     jsonb,
    created_at  timestamptz NOT NULL,
    consumed_at timestamptz
);

CREATE INDEX flow_signals_pending_idx ON flow_signals (flow_id, id) WHERE consumed_at IS NULL;
