-- Outbox bodies are only ever written once and published byte for byte: keep them as json
-- (text checked for syntax) instead of jsonb, so neither PostgreSQL nor the relay parses and
-- re-serialises every message (the relay publishes the stored text as it is).

ALTER TABLE outbox ALTER COLUMN body TYPE json USING body::json;
