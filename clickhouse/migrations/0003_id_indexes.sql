-- 0003: bloom-filter skip indexes, so that lookups by event id, run id and parent id read a
-- few granules instead of the project's whole key range (event detail, run tree, children).

ALTER TABLE events ADD INDEX IF NOT EXISTS idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 1;
ALTER TABLE events ADD INDEX IF NOT EXISTS idx_run_id run_id TYPE bloom_filter(0.01) GRANULARITY 1;
ALTER TABLE events ADD INDEX IF NOT EXISTS idx_parent_event_id parent_event_id TYPE bloom_filter(0.01) GRANULARITY 1;
ALTER TABLE events MATERIALIZE INDEX idx_event_id;
ALTER TABLE events MATERIALIZE INDEX idx_run_id;
ALTER TABLE events MATERIALIZE INDEX idx_parent_event_id;
