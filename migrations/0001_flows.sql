-- Flows, their audit log and their steps.

CREATE TABLE flows (
    id                  uuid        PRIMARY KEY,
    controller_id       text        NOT NULL,
    goal                text        NOT NULL,
    owner_session_key   text        NOT NULL,
    requester_origin    text,
    sync_mode           text        NOT NULL CHECK (sync_mode IN ('managed', 'mirrored')),
    status              text        NOT NULL CHECK (status IN
                            ('created', 'running', 'waiting', 'cancelled', 'finished', 'failed')),
    current_step        text,
    state_json          jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(state_json) = 'object'),
    wait_json           jsonb       CHECK (wait_json IS NULL OR jsonb_typeof(wait_json) = 'object'),
    cancel_requested_at timestamptz,
    revision            bigint      NOT NULL CHECK (revision >= 0),
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);

-- First pages of list_by_owner / list_by_status are index range scans in (created_at, id) order.
CREATE INDEX flows_owner_created_idx ON flows (owner_session_key, created_at, id);
CREATE INDEX flows_status_created_idx ON flows (status, created_at, id);
CREATE INDEX flows_created_idx ON flows (created_at, id);
-- Retention (prune) only looks at terminal flows.
CREATE INDEX flows_terminal_updated_idx ON flows (updated_at)
    WHERE status IN ('cancelled', 'finished', 'failed');

CREATE TABLE flow_events (
    flow_id  uuid        NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
    revision bigint      NOT NULL,
    id       uuid        NOT NULL,
    kind     text        NOT NULL,
    payload  jsonb       NOT NULL,
    at       timestamptz NOT NULL,
    PRIMARY KEY (flow_id, revision),
    CONSTRAINT flow_events_id_key UNIQUE (id)
);

CREATE TABLE flow_steps (
    id                uuid        PRIMARY KEY,
    flow_id           uuid        NOT NULL REFERENCES flows (id) ON DELETE CASCADE,
    run_id            text        NOT NULL,
    task              text        NOT NULL,
    status            text        NOT NULL CHECK (status IN
                          ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    child_session_key text,
    result_json       jsonb,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    CONSTRAINT flow_steps_flow_id_run_id_key UNIQUE (flow_id, run_id)
);

CREATE INDEX flow_steps_flow_created_idx ON flow_steps (flow_id, created_at, id);
