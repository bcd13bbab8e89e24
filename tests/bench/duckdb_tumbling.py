#!/usr/bin/env python3
"""The DuckDB side of kappa-bench's `spark_tumbling` section: a ceiling.

    python3 duckdb_tumbling.py EVENTS_CSV RESULT_JSON

The same events and the same view as the Spark run (`device_metrics`: per
device, 5-minute tumbling windows, 8 aggregates), computed as one in-process
batch GROUP BY by DuckDB over a table already in memory. A batch engine sees
every event at once and keeps no state between them, so its rate is a
ceiling for a streaming engine on the same machine, not a peer.

What is timed: the query alone, from `execute()` to the last row fetched
(loading the CSV into the in-memory table is not). CPU is this process's
own (user + system, all of DuckDB's threads) over the same interval. The
query runs twice; the second ("warm") is the figure kappa-bench reports.
"""

import json
import os
import resource
import sys
import time

from tumbling_columns import COLUMNS

import duckdb


QUERY = """
SELECT device,
       (ts_ms // 300000) * 300000 AS window_start_ms,
       count(*) AS event_count,
       avg(temperature) AS avg_temp,
       max(temperature) AS max_temp,
       min(temperature) AS min_temp,
       stddev_samp(temperature) AS stddev_temp,
       avg(humidity) AS avg_humidity,
       avg(pressure) AS avg_pressure,
       list(DISTINCT type) AS event_types
FROM events
GROUP BY device, window_start_ms
"""


def cpu_seconds():
    """User + system CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    csv_path, result_path = sys.argv[1], sys.argv[2]
    con = duckdb.connect(":memory:")
    con.execute(
        "CREATE TABLE events AS SELECT * FROM read_csv(?, header = true, columns = {"
        "'device': 'VARCHAR', 'user': 'VARCHAR', 'type': 'VARCHAR', 'ts_ms': 'BIGINT', "
        "'temperature': 'DOUBLE', 'humidity': 'DOUBLE', 'pressure': 'DOUBLE'})",
        [csv_path],
    )
    events = con.execute("SELECT count(*) FROM events").fetchone()[0]
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    runs = {}
    rows = []
    for name in ("cold", "warm"):
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        rows = con.execute(QUERY).fetchall()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        runs[name] = {"wall_seconds": wall, "cpu_seconds": cpu, "input_rows": events}
    out = {
        "version": duckdb.__version__,
        "threads": threads,
        "cores": os.cpu_count(),
        "columns": COLUMNS,
        "rows": [list(r) for r in rows],
        **runs,
    }
    with open(result_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
