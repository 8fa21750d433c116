-- The paused executions by how long they have waited: the dashboard's
-- "needs attention" asks for those paused for over a minute, longest first
-- (`Store::paused_before`); it listed the twenty newest paused executions
-- and kept the long-paused among them, so that twenty executions paused in
-- the last minute hid every older one. `paused_at` is the `updated_at` of
-- the write that paused the row, kept while it stays paused, and NULL
-- otherwise (every write sets it), so that the index holds paused rows
-- alone. A column of
-- its own rather than an index on `updated_at`: `updated_at` changes at
-- every write, and an index on it would end the HOT updates of the writes
-- that change no indexed column (most of them); `paused_at` stays NULL
-- through those. Added without a default: no table rewrite.
ALTER TABLE sagatx_executions ADD COLUMN paused_at BIGINT;
UPDATE sagatx_executions SET paused_at = updated_at WHERE status = 'paused';
CREATE INDEX sagatx_executions_paused ON sagatx_executions (paused_at, n)
    WHERE paused_at IS NOT NULL;
