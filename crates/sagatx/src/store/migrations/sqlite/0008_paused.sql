-- The paused executions by how long they have waited: the dashboard's
-- "needs attention" asks for those paused for over a minute, longest first
-- (`Store::paused_before`). It listed the twenty newest paused executions
-- and kept the long-paused among them, so that twenty executions paused in
-- the last minute hid every older one. A table of its own, written by the
-- writer only when an execution's status changes to or from `paused`:
-- an index on `executions` that every write touched (its `updated_at`
-- changes at every write) cost the writer about 1,600 instructions a
-- write, a column of it with a partial index about 500; this costs the
-- writes that neither pause nor resume nothing.
CREATE TABLE paused (
    n     INTEGER PRIMARY KEY,  -- executions.n
    since INTEGER NOT NULL      -- the updated_at of the write that paused it
);
CREATE INDEX paused_since ON paused (since, n);
INSERT INTO paused (n, since) SELECT n, updated_at FROM executions WHERE status = 'paused';
-- Executions deleted by hand (pruning) leave with their row here.
CREATE TRIGGER paused_delete AFTER DELETE ON executions BEGIN
    DELETE FROM paused WHERE n = old.n;
END;
