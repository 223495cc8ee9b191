-- 0012: less work for ClickHouse at every insert (issue 10).
--
-- Measured with chDB on the ingest benchmark's events (docs/BENCHMARKS.md): an insert into
-- events wrote a "wide" part, one file or more per column (~280 files for its 70 columns,
-- their null maps and skip indexes), and creating those files was about half the CPU of a
-- 10,000-event insert (kernel time in ext4's file creation). Below min_rows_for_wide_part
-- rows a part is "compact" (one data file and ~10 small ones): an insert of up to 100,000
-- events writes one, and the merges that bring parts above it write the usual wide parts,
-- which range scans read best. Parts stored before this migration stay as they are.
ALTER TABLE events MODIFY SETTING min_rows_for_wide_part = 100000;

-- event_times holds the same rows as event_ids (0010), which has its key in smaller
-- granules: the lookups by id read event_ids now (analytics/queries.py), and one view fewer
-- runs at every insert. event_ids was filled from event_times by 0010, so nothing is lost.
DROP VIEW IF EXISTS event_times_mv;
DROP TABLE IF EXISTS event_times;

-- Nothing reads events by parent id (event_children answers that, by its primary key): the
-- bloom filter only cost hashing at every insert.
ALTER TABLE events DROP INDEX IF EXISTS idx_parent_event_id;
