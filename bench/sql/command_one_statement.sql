-- One flowd `update` command as the store writes it since commit da1a5b3 ("one statement
-- per change"), on a flow in the manager's cache (no read first): COMMIT_UPDATE (its one
-- event and outbox row as scalars), one statement and one
-- implicit transaction (mirrors service/flowd/store/postgres.py; update this file when
-- that statement changes). Same seed, same clients, same JSON sizes as command.sql.
--
--   pgbench -n -f bench/sql/command_one_statement.sql -c 10 -j 2 -T 30 -M prepared \
--           -D nflows=10000 -D clients=10 "$DSN"

\set fid 1 + ((:client_id + :clients * random(0, :nflows / :clients - 1)) % :nflows)

-- No FlowManager.get: the manager's flow cache holds the flow this replica last wrote, so
-- a command on a known flow goes straight to the compare-and-set write. pgbench cannot keep
-- a revision per flow, so the compare is `revision = revision`: the same index lookup and
-- the same filter on the row as flowd's `revision = $2`.

-- COMMIT_UPDATE with an update_state's values ($22, "conditions cleared", is false), plus
-- the relay's amortised share as one more CTE: delete one published outbox row (the relay
-- deletes its batch in a transaction of its own; one row per command, no extra commit here).
WITH cmd AS (SELECT 'pgbench-' || gen_random_uuid() AS id
), upd AS (
    UPDATE flows SET status = 'running', current_step = 'test',
        state_json = '{"progress": 0.5, "attempt": 1, "labels": ["bench", "e2e"], "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}'::jsonb,
        wait_json = NULL, cancel_requested_at = NULL,
        revision = revision + 1, updated_at = now()
    WHERE id = lpad(to_hex(:fid::bigint), 32, '0')::uuid AND revision = revision
      AND NOT EXISTS (SELECT 1 FROM processed_commands, cmd WHERE command_id = cmd.id)
    RETURNING id, revision
), claim AS (
    INSERT INTO processed_commands (command_id, flow_id, outcome)
    SELECT cmd.id, upd.id,
           '{"status": "applied", "flow_id": "00000000-0000-0000-0000-000000000001", "revision": 2, "events": ["00000000-0000-0000-0000-000000000002"]}'::jsonb
    FROM upd, cmd
), ev AS (
    INSERT INTO flow_events (id, flow_id, revision, kind, payload, at)
    SELECT gen_random_uuid(), lpad(to_hex(:fid::bigint), 32, '0')::uuid, upd.revision,
           'state_updated',
           '{"patch": {"progress": 0.5, "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}, "next_step": "test"}'::jsonb,
           now()
    FROM upd
), ob AS (
    INSERT INTO outbox (topic, msg_id, command_id, body)
    SELECT 'evt.' || lpad(to_hex(:fid::bigint), 32, '0') || '.state_updated',
           gen_random_uuid()::text, 'pgbench-cmd',
           '{"event_id": "00000000-0000-0000-0000-000000000002", "flow_id": "00000000-0000-0000-0000-000000000001", "kind": "state_updated", "revision": 2, "at": "2026-11-25T01:02:03.456789+00:00", "command_id": "sat-1-update", "final": true, "payload": {"patch": {"progress": 0.5, "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}, "next_step": "test"}, "flow": {"id": "00000000-0000-0000-0000-000000000001", "controller_id": "bench-controller", "goal": "benchmark flow 1: build, test and ship release 2.0", "owner_session_key": "owner-1", "requester_origin": null, "sync_mode": "managed", "status": "running", "current_step": "test", "state_json": {"progress": 0.5, "attempt": 1, "labels": ["bench", "e2e"], "stage": "build", "artifacts": ["app-2.0.tar.gz", "sbom.json"], "note": "compiled 128 modules, 0 warnings"}, "wait_json": null, "cancel_requested_at": null, "revision": 2, "created_at": "2026-11-25T01:02:03.456789+00:00", "updated_at": "2026-11-25T01:02:03.456789+00:00"}}'::json
    FROM upd
), wc AS (
    DELETE FROM wait_conditions WHERE flow_id = lpad(to_hex(:fid::bigint), 32, '0')::uuid AND false
        AND EXISTS (SELECT 1 FROM upd)
), relay AS (
    DELETE FROM outbox
    WHERE id = (SELECT id FROM outbox ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
)
SELECT (SELECT count(*) FROM upd) AS written,
       (SELECT revision FROM flows WHERE id = lpad(to_hex(:fid::bigint), 32, '0')::uuid) AS seen,
       EXISTS (SELECT 1 FROM processed_commands, cmd WHERE command_id = cmd.id) AS duplicate;
