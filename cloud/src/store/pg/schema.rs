//! The PostgreSQL store's layout: the tables, and the migration from the
//! previous layout. `{s}` stands for the quoted schema name.

/// The layout this code reads and writes; `store_meta.schema_version`.
pub(super) const SCHEMA_VERSION: i64 = 2;

/// From layout 1 (every view in the main pipeline, no promotions) to 2:
/// the columns 2 added to tables 1 had; its new tables come from [`DDL`].
/// The views of a layout-1 store all ran in `main`, which was live.
pub(super) const MIGRATE_1_TO_2: &str = r#"
ALTER TABLE {s}.views ADD COLUMN IF NOT EXISTS pipeline text COLLATE "C" NOT NULL DEFAULT 'main';
ALTER TABLE {s}.views ADD COLUMN IF NOT EXISTS retired boolean NOT NULL DEFAULT false;
ALTER TABLE {s}.partitions ADD COLUMN IF NOT EXISTS caught_up boolean NOT NULL DEFAULT false;
INSERT INTO {s}.pipelines (pipeline, state, created_ms)
    SELECT 'main', 'live', min(created_ms) FROM {s}.views HAVING count(*) > 0
    ON CONFLICT (pipeline) DO NOTHING;
INSERT INTO {s}.alias_history (name, version, at_ms) SELECT name, version, 0 FROM {s}.view_aliases;
UPDATE {s}.store_meta SET value = 2 WHERE key = 'schema_version';
"#;

/// `{s}` stands for the quoted schema name.
pub(super) const DDL: &str = r#"
CREATE TABLE IF NOT EXISTS {s}.views (
    view_id text COLLATE "C" PRIMARY KEY, name text COLLATE "C" NOT NULL, version int8 NOT NULL,
    definition text NOT NULL, created_ms int8 NOT NULL,
    pipeline text COLLATE "C" NOT NULL DEFAULT 'main', retired boolean NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS {s}.pipelines (
    pipeline text COLLATE "C" PRIMARY KEY, state text NOT NULL, detail text NOT NULL DEFAULT '',
    created_ms int8 NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.view_aliases (name text COLLATE "C" PRIMARY KEY, version int8 NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.alias_history (
    seq int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text COLLATE "C" NOT NULL, version int8 NOT NULL,
    at_ms int8 NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.view_rows (
    view_id text COLLATE "C" NOT NULL, key text COLLATE "C" NOT NULL, window_start int8 NOT NULL,
    window_end int8, row text NOT NULL,
    PRIMARY KEY (view_id, key, window_start));
CREATE TABLE IF NOT EXISTS {s}.view_state (
    view_id text COLLATE "C" NOT NULL, part int8 NOT NULL, key text COLLATE "C" NOT NULL,
    window_start int8 NOT NULL, state bytea NOT NULL,
    PRIMARY KEY (view_id, part, key, window_start));
CREATE TABLE IF NOT EXISTS {s}.view_partials (
    view_id text COLLATE "C" NOT NULL, key text COLLATE "C" NOT NULL, window_start int8 NOT NULL,
    part int8 NOT NULL, window_end int8, state bytea NOT NULL,
    PRIMARY KEY (view_id, key, window_start, part));
CREATE TABLE IF NOT EXISTS {s}.view_meta (
    view_id text COLLATE "C" NOT NULL, part int8 NOT NULL, closed_through int8,
    PRIMARY KEY (view_id, part));
CREATE TABLE IF NOT EXISTS {s}.dedup (
    pipeline text COLLATE "C" NOT NULL, part int8 NOT NULL, device text COLLATE "C" NOT NULL,
    boot int8 NOT NULL, state bytea NOT NULL,
    PRIMARY KEY (pipeline, device, boot));
CREATE INDEX IF NOT EXISTS dedup_by_partition ON {s}.dedup (pipeline, part);
CREATE TABLE IF NOT EXISTS {s}.partitions (
    pipeline text COLLATE "C" NOT NULL, part int8 NOT NULL, next_offset int8 NOT NULL, max_ts int8,
    epoch int8 NOT NULL, caught_up boolean NOT NULL DEFAULT false,
    PRIMARY KEY (pipeline, part));
CREATE TABLE IF NOT EXISTS {s}.late_events (
    view_id text COLLATE "C" NOT NULL, part int8 NOT NULL, log_offset int8 NOT NULL, window_start int8 NOT NULL,
    device text COLLATE "C" NOT NULL, boot int8 NOT NULL, seq int8 NOT NULL, ts_ms int8 NOT NULL,
    watermark_ms int8 NOT NULL, reason text NOT NULL,
    PRIMARY KEY (view_id, part, log_offset, window_start));
CREATE INDEX IF NOT EXISTS late_events_by_time ON {s}.late_events (ts_ms);
CREATE TABLE IF NOT EXISTS {s}.members (
    id int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY, grp text COLLATE "C" NOT NULL,
    backend_pid int4 NOT NULL, backend_start timestamptz, lease_until timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS members_by_group ON {s}.members (grp);
"#;
