"""The analytics API: stats, timeseries, logs, one event, runs; and the hourly rollup."""
