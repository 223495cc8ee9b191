-- 0011: a span's instrumentation scope, and its trace found without reading the project.
--
-- scope_name / scope_version: the OpenTelemetry instrumentation scope (library) that made the
-- span, as received; the OTLP exporter sink sends them on, so a forwarded span keeps them.
-- spans_trace_id: a bloom filter on trace_id, so the run tree of one trace
-- (/v1/analytics/runs/{trace_id}) skips the granules that cannot hold it (parts written
-- before this migration are read as before until merged).

ALTER TABLE spans
    ADD COLUMN IF NOT EXISTS scope_name LowCardinality(String) DEFAULT '' AFTER service_name,
    ADD COLUMN IF NOT EXISTS scope_version String DEFAULT '' AFTER scope_name;

ALTER TABLE spans ADD INDEX IF NOT EXISTS spans_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 4;
