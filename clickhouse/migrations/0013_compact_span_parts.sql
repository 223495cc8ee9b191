-- 0013: an insert of spans writes a compact part (issue 11), as 0012 made it for events.
--
-- A 30,000-span insert is ~32 MB before compression, over ClickHouse's 10 MB default for a
-- "wide" part (a file or more per column: ~60 for spans' 20 columns, their maps' keys and
-- values and the trace id's bloom filter), and creating those files was kernel time in
-- ext4's inode allocation at every insert and merge. Below min_rows_for_wide_part rows a part
-- is compact (one data file and a few small ones); the merges that bring parts above it write
-- the usual wide parts, which range scans read best. Parts stored before this stay as they
-- are.
ALTER TABLE spans MODIFY SETTING min_rows_for_wide_part = 100000;
