CREATE FUNCTION sagatx_now_ms() RETURNS BIGINT LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;
-- The processes that share the database, with their heartbeat: a process's
-- leases run out when it has not been seen for its lease time.
CREATE TABLE sagatx_processes (
    owner UUID PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    lease_ms BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL);
-- Who drives an execution, and under which claim.
ALTER TABLE sagatx_executions
    ADD COLUMN lease_owner UUID,
    ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0;
CREATE INDEX sagatx_executions_owner ON sagatx_executions (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX sagatx_executions_orphans ON sagatx_executions (n)
    WHERE lease_owner IS NULL AND status IN ('created', 'running', 'compensating');
CREATE TABLE sagatx_inbox (
    id BIGSERIAL PRIMARY KEY,
    execution_id UUID NOT NULL,
    command TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    taken BOOLEAN NOT NULL DEFAULT false,
    outcome TEXT);
CREATE INDEX sagatx_inbox_pending ON sagatx_inbox (execution_id) WHERE NOT taken;
