//! The log's tables, and the migrations from earlier layouts.

pub(super) const SCHEMA_VERSION: i64 = 3;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    fwd INTEGER NOT NULL DEFAULT 1,
    dev_ts INTEGER NOT NULL,
    UNIQUE (dev_ts, device, boot, seq)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    batch_id INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'readings'
);
CREATE TABLE IF NOT EXISTS dead_letters (
    batch_id INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    refused_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'readings',
    released_ms INTEGER
);
CREATE TABLE IF NOT EXISTS aggregates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS agg_open (
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    window_ms INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device, metric, window_ms, start_ms)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES
    ('schema_version', 3), ('cursor', 0), ('assigned_upto', 0), ('next_batch_id', 1),
    ('agg_cursor', 0), ('agg_assigned_upto', 0), ('agg_done', 0);
";

/// From schema version 1 (before pre-aggregation) to 2.
pub(super) const MIGRATE_1_TO_2: &str = "
CREATE TABLE readings_v2 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    fwd INTEGER NOT NULL DEFAULT 1,
    dev_ts INTEGER NOT NULL,
    UNIQUE (dev_ts, device, boot, seq)
);
INSERT INTO readings_v2 (id, device, boot, seq, ts_ms, received_ms, body, fwd, dev_ts)
    SELECT id, device, boot, seq, ts_ms, received_ms, body, 1, ts_ms FROM readings;
CREATE TEMP TABLE readings_seq AS SELECT seq FROM sqlite_sequence WHERE name = 'readings';
DROP TABLE readings;
ALTER TABLE readings_v2 RENAME TO readings;
-- Ids are never reused: carry the old high-water mark over.
UPDATE sqlite_sequence SET seq = max(seq, coalesce((SELECT seq FROM readings_seq), 0)) WHERE name = 'readings';
DROP TABLE readings_seq;
ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'readings';
ALTER TABLE dead_letters ADD COLUMN kind TEXT NOT NULL DEFAULT 'readings';
UPDATE meta SET value = 2 WHERE key = 'schema_version';
";

/// From schema version 2 to 3: dead letters stay until released, their
/// readings marked `fwd = 4`.
pub(super) const MIGRATE_2_TO_3: &str = "
ALTER TABLE dead_letters ADD COLUMN released_ms INTEGER;
UPDATE readings SET fwd = 4 WHERE fwd IN (1, 3) AND EXISTS (SELECT 1 FROM dead_letters d
    WHERE d.kind <> 'aggregates' AND readings.id BETWEEN d.first_id AND d.last_id);
UPDATE meta SET value = 3 WHERE key = 'schema_version';
";
