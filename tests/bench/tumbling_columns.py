"""The result columns both peers of kappa-bench's `spark_tumbling` section
write (spark_tumbling.py, duckdb_tumbling.py), in the order spark.rs reads them."""

COLUMNS = [
    "device",
    "window_start_ms",
    "event_count",
    "avg_temp",
    "max_temp",
    "min_temp",
    "stddev_temp",
    "avg_humidity",
    "avg_pressure",
    "event_types",
]
