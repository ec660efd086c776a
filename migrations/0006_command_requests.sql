-- What each processed command asked (subjects.md, Commands): its verb and the digest of its
-- request (service/flowd/core/requests.py), so that a command id used again for a different
-- request is refused (idempotency_conflict) instead of being taken for a repeat. Rows from
-- before this migration, and ids flowd derives itself, have neither: any reuse of those
-- stays a repeat, as before. The first use's flow id and time are flow_id and created_at.

ALTER TABLE processed_commands ADD COLUMN verb text, ADD COLUMN request_digest text;
