CREATE TABLE oplog (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    args        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    error       TEXT
);
CREATE INDEX oplog_pending ON oplog (id) WHERE finished_at IS NULL;
