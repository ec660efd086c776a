-- Idempotency: every processed command id with its outcome, written in the same transaction
-- as the command's effect. Transactional outbox: messages to publish, written in the same
-- transaction as the change they announce, deleted by the relay once JetStream acked them.

CREATE TABLE processed_commands (
    command_id text        PRIMARY KEY,
    flow_id    uuid,
    outcome    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX processed_commands_created_idx ON processed_commands (created_at);

CREATE TABLE outbox (
    id         bigserial   PRIMARY KEY,
    topic      text        NOT NULL,
    msg_id     text        NOT NULL,
    command_id text,
    body       jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
