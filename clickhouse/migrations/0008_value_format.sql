-- 0008: free-form fields come back exactly as they were sent. Before, a string sent in a JSON
-- field (tool_input '{"a": 1}') was stored as it is, so it could not be told from an object
-- stored as JSON text; and a prompt sent as text could not be told from a list of chat
-- messages stored as JSON. value_format says how a row's fields are written
-- (watchllm_ext/store/rows.py):
--   0  stored before this migration: read as before (JSON-looking text is parsed);
--   1  in metadata, response_metadata, tool_input, tool_output, expected and actual (here and
--      in the event's tool_calls rows) a string that would parse as JSON is stored as a JSON
--      string, any other string as it is, any other value as JSON, so a reader parses what
--      parses and keeps the rest as text; prompt is text;
--   2  as 1, and prompt holds the list of chat messages as JSON.

ALTER TABLE events ADD COLUMN IF NOT EXISTS value_format UInt8 DEFAULT 0 AFTER metric_actual;
