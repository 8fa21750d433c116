-- From schema 6 on, `executions.state` may hold an entry compressed
-- against dictionary 1 (store/pack.rs, docs/journal-format.md) instead of
-- its JSON; older entries stay JSON and read as before. The version bump
-- itself is the point: a build that knows only schema 5 would take a
-- compressed entry for damaged JSON, and refuses the file instead.
INSERT INTO meta (key, value) VALUES ('state_encoding', CAST('json, or 0x01 + lz4 against dictionary 1' AS BLOB))
    ON CONFLICT (key) DO NOTHING;
