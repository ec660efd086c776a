-- One flowd `update` command (FlowManager.update_state on a running flow, daemon mode with
-- idempotency record and outbox) as separate statements in one transaction: the rows
-- flowd's one-statement commit writes, in the form of the store's general path (_commit_tx in
-- service/flowd/store/postgres.py). command_one_statement.sql is the statement flowd sends.
--
--   pgbench -n -f bench/sql/command.sql -c 10 -j 2 -T 30 -M prepared \
--           -D nflows=10000 -D clients=10 "$DSN"
--
-- Seeded by bench/flowbench/pgbench.py: flows 1..nflows, id = lpad(to_hex(n), 32, '0')::uuid,
-- status running. Client c only touches flows n with (n - 1) % clients = c (like flowd's per-flow
-- lanes: two connections never race for one flow, so the compare-and-set always wins).
-- JSON literals keep a space after every ':' so pgbench does not read `:true` as a variable.

\set fid 1 + ((:client_id + :clients * random(0, :nflows / :clients - 1)) % :nflows)

-- No FlowManager.get: the manager's flow cache holds the flow this replica last wrote, so
-- a command on a known flow goes straight to the compare-and-set write. pgbench cannot keep
-- a revision per flow, so the compare is `revision = revision`: the same index lookup and
-- the same filter on the row as flowd's `revision = $2`.

-- PostgresFlowStore.commit: one transaction
BEGIN;

-- _claim: INSERT_PROCESSED (the idempotency record with the applied outcome)
INSERT INTO processed_commands (command_id, flow_id, outcome)
VALUES ('pgbench-' || gen_random_uuid(), lpad(to_hex(:fid::bigint), 32, '0')::uuid,
        '{"status": "applied", "flow_id": "00000000-0000-0000-0000-000000000001", "revision": 2, "events": ["00000000-0000-0000-0000-000000000002"]}'::jsonb)
ON CONFLICT (command_id) DO NOTHING;

-- UPDATE_FLOW: compare-and-set on the revision
UPDATE flows SET status = 'running', current_step = 'test',
    state_json = '{"progress": 0.5, "attempt": 1, "labels": ["bench", "e2e"], "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}'::jsonb,
    wait_json = NULL, cancel_requested_at = NULL,
    revision = revision + 1, updated_at = now()
WHERE id = lpad(to_hex(:fid::bigint), 32, '0')::uuid AND revision = revision
RETURNING revision AS f_revision \gset

-- INSERT_EVENTS (unnest of one-element arrays, as flowd sends them)
INSERT INTO flow_events (id, flow_id, revision, kind, payload, at)
SELECT * FROM unnest(ARRAY[gen_random_uuid()], ARRAY[lpad(to_hex(:fid::bigint), 32, '0')::uuid],
                     ARRAY[:f_revision::bigint], ARRAY['state_updated'],
                     ARRAY['{"patch": {"progress": 0.5, "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}, "next_step": "test"}'::jsonb],
                     ARRAY[now()]);

-- _index_waits: an update_state has conditions = None, so no DELETE_CONDITIONS.

-- _queue: INSERT_OUTBOX, the event message (~1 kB body, like the real one)
INSERT INTO outbox (topic, msg_id, command_id, body)
SELECT * FROM unnest(ARRAY['evt.' || lpad(to_hex(:fid::bigint), 32, '0') || '.state_updated'], ARRAY[gen_random_uuid()::text],
                     ARRAY['pgbench-cmd'],
                     ARRAY['{"event_id": "00000000-0000-0000-0000-000000000002", "flow_id": "00000000-0000-0000-0000-000000000001", "kind": "state_updated", "revision": 2, "at": "2026-11-25T01:02:03.456789+00:00", "command_id": "sat-1-update", "final": true, "payload": {"patch": {"progress": 0.5, "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}, "next_step": "test"}, "flow": {"id": "00000000-0000-0000-0000-000000000001", "controller_id": "bench-controller", "goal": "benchmark flow 1: build, test and ship release 2.0", "owner_session_key": "owner-1", "requester_origin": null, "sync_mode": "managed", "status": "running", "current_step": "test", "state_json": {"progress": 0.5, "attempt": 1, "labels": ["bench", "e2e"], "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}, "wait_json": null, "cancel_requested_at": null, "revision": 2, "created_at": "2026-11-25T01:02:03.456789+00:00", "updated_at": "2026-11-25T01:02:03.456789+00:00"}}'::json])
RETURNING id AS outbox_id \gset

-- The relay's share, amortised: flowd's relay deletes published rows in batches of up to
-- 256 (one transaction: try-lock, SELECT, DELETE … = ANY), so per message it costs about one
-- index-scan delete and no commit of its own. Approximated as a DELETE of this row by id,
-- inside this transaction (a separate autocommit DELETE would add a WAL flush per command
-- that flowd does not pay).
DELETE FROM outbox WHERE id = :outbox_id;

COMMIT;
