"""From accepted events to the sinks: the write-ahead spool on disk (`spool.py`, its fsyncs in
a helper process: `fsync_process.py`, `fsync_child.py`), the writer that moves it to every sink
in batches (`writer.py`), and the dead letters of batches a sink refused for good
(`dead_letters.py`). docs/DURABILITY.md is the user's account of it."""
