-- The summary's counts by saga and status, kept as they change instead of
-- counted over every execution at each request (a GROUP BY over the whole
-- table, every 2 s for each open dashboard).
--
-- Insert-only: every statement that writes executions adds one row per
-- (saga, status) whose count it moved, with the change (+n / -n); the
-- summary is the sum by (saga, status), and a process's heartbeat folds the
-- rows into one per group from time to time. No row is updated in place, so
-- writers in several processes never wait on one another's counts.
CREATE TABLE sagatx_counts (saga TEXT NOT NULL, status TEXT NOT NULL, n BIGINT NOT NULL);

-- One aggregated insert per statement (the writer's bulk statements write
-- hundreds of executions), none when no status changed (most transitions
-- move a saga on without changing its status).
CREATE FUNCTION sagatx_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sagatx_counts (saga, status, n)
        SELECT saga, status, count(*) FROM sagatx_new GROUP BY saga, status;
    RETURN NULL;
END $$;

CREATE FUNCTION sagatx_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sagatx_counts (saga, status, n)
        SELECT saga, status, sum(d) FROM (
            SELECT saga, status, 1 AS d FROM sagatx_new
            UNION ALL
            SELECT saga, status, -1 AS d FROM sagatx_old) c
        GROUP BY saga, status HAVING sum(d) <> 0;
    RETURN NULL;
END $$;

CREATE FUNCTION sagatx_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sagatx_counts (saga, status, n)
        SELECT saga, status, -count(*) FROM sagatx_old GROUP BY saga, status;
    RETURN NULL;
END $$;

-- Creating a trigger locks the table against writers until this migration
-- commits: the counts below are exact, and every later write is counted.
CREATE TRIGGER sagatx_count_inserted AFTER INSERT ON sagatx_executions
    REFERENCING NEW TABLE AS sagatx_new
    FOR EACH STATEMENT EXECUTE FUNCTION sagatx_count_inserted();
CREATE TRIGGER sagatx_count_updated AFTER UPDATE ON sagatx_executions
    REFERENCING OLD TABLE AS sagatx_old NEW TABLE AS sagatx_new
    FOR EACH STATEMENT EXECUTE FUNCTION sagatx_count_updated();
CREATE TRIGGER sagatx_count_deleted AFTER DELETE ON sagatx_executions
    REFERENCING OLD TABLE AS sagatx_old
    FOR EACH STATEMENT EXECUTE FUNCTION sagatx_count_deleted();

INSERT INTO sagatx_counts (saga, status, n)
    SELECT saga, status, count(*) FROM sagatx_executions GROUP BY saga, status;

-- It served only the GROUP BY above, and cost two index entries at every
-- change of status.
DROP INDEX sagatx_executions_saga_status;
