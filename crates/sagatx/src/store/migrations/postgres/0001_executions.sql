CREATE TABLE sagatx_meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE sagatx_definitions (
    name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL, created_at BIGINT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE sagatx_executions (
    n BIGSERIAL PRIMARY KEY,
    id UUID NOT NULL UNIQUE,
    saga TEXT NOT NULL,
    status TEXT NOT NULL,
    seq BIGINT NOT NULL,
    due_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    state BYTEA NOT NULL);
CREATE INDEX sagatx_executions_due ON sagatx_executions (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX sagatx_executions_status ON sagatx_executions (status, n);
CREATE INDEX sagatx_executions_saga ON sagatx_executions (saga, n);
CREATE TABLE sagatx_oplog (
    id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, args TEXT NOT NULL,
    created_at BIGINT NOT NULL, finished_at BIGINT, error TEXT);
CREATE INDEX sagatx_oplog_pending ON sagatx_oplog (id) WHERE finished_at IS NULL;
