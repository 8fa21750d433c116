CREATE TABLE definitions (
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    body        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE TABLE executions (
    n           INTEGER PRIMARY KEY,
    id          BLOB    NOT NULL UNIQUE,
    saga        TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    due_at      INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    state       BLOB    NOT NULL
);
CREATE INDEX executions_due ON executions (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX executions_status ON executions (status, n);
CREATE INDEX executions_saga ON executions (saga, n);
