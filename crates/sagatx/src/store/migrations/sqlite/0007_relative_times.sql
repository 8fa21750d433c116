-- From schema 7 on, `executions.state` may hold an entry compressed with
-- its times written as milliseconds after the row's `created_at` (first
-- byte 0x02; store/pack.rs, docs/journal-format.md). Entries of schema 6
-- and before read as before; nothing is rewritten. A build that knows only
-- schema 6 would take such an entry for damaged JSON, and refuses the file
-- instead. `created_at` is from now on also set by every update, with the
-- state it goes with.
UPDATE meta SET value = CAST('json, or 0x01 + lz4 against dictionary 1, or 0x02 + the same with times after created_at' AS BLOB)
    WHERE key = 'state_encoding';
