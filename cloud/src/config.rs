//! Cloud configuration: a TOML file; see `deploy/cloud/single-node.toml`.
//!
//! Unknown keys are refused and every problem is reported at once, with its
//! key path, before anything starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use kappa_runtime::config::ConfigError;

/// Environment variables `KAPPA_CLOUD__SECTION__KEY=value` override config keys.
pub const ENV_PREFIX: &str = "KAPPA_CLOUD";
use kappa_runtime::config::{self, Validate};
use serde::Deserialize;

pub use crate::alerts::config::AlertsConfig;
use crate::alerts::deliver::WebhookConfig;
use crate::alerts::spec::{RuleSpec, parse_rules};
pub use crate::api::config::{ApiConfig, HttpConfig, TlsConfig};
pub use crate::archive::config::ArchiveConfig;
pub use crate::eventlog::config::{Durability, LogBackend, LogConfig};
pub use crate::ingest::config::IngestConfig;
pub use crate::processor::config::ProcessorConfig;
use crate::views::defaults::default_views_toml;
use crate::views::spec::{ViewSpec, parse_views};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Where the embedded event log and the serving store live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub processor: ProcessorConfig,
    #[serde(default)]
    pub schema: SchemaConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// View definitions (see `views::spec`); none means the default views.
    #[serde(default)]
    pub views: Vec<toml::Table>,
    /// Alert rules (see `alerts::spec` and docs/alerts.md); none: no alert pipeline.
    #[serde(default)]
    pub rules: Vec<toml::Table>,
    /// Where alerts are delivered besides the store and API.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Processor workers in a consumer group, with PostgreSQL as the store
    /// (docs/cluster.md); absent: the node runs the views itself.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Who may ingest and query (tokens stored hashed; see docs/security.md).
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// On SIGINT/SIGTERM ingest stops taking requests, pipelines checkpoint
    /// and every part exits within this; what is left after it is aborted
    /// (and restarts from its last checkpoint).
    #[serde(default = "default_shutdown_deadline", with = "humantime_serde")]
    pub shutdown_deadline: Duration,
}

fn default_shutdown_deadline() -> Duration {
    Duration::from_secs(15)
}

/// `[cluster]`: the views are computed by `kappa-cloud worker` processes,
/// members of one Kafka consumer group, into PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// libpq connection string (`host=… user=… dbname=…`) or `postgresql://` URL.
    pub postgres: String,
    /// A PEM file with the CA that signed PostgreSQL's certificate: connect
    /// over TLS (never in plain text) and verify the server's certificate
    /// and host name against it. Unset: plain TCP (and `sslmode=require` in
    /// the connection string is refused).
    #[serde(default)]
    pub postgres_ca: Option<PathBuf>,
    /// The PostgreSQL schema holding the tables (created if missing).
    #[serde(default = "default_pg_schema")]
    pub schema: String,
    /// The consumer group the workers join.
    #[serde(default = "default_group")]
    pub group: String,
    /// How long the group waits for a silent worker before moving its partitions.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Who decides which worker reads which partitions: PostgreSQL (the
    /// default; a killed worker's partitions move as soon as its connection
    /// closes) or Kafka's consumer group protocol (docs/cluster.md, "Assignment").
    #[serde(default)]
    pub assignment: Assignment,
    /// Whether `kappa-cloud run` on this node also runs the alert and edge
    /// aggregate pipelines, the alert deliveries and the archiver. Exactly
    /// one node of a cluster should; the others (`primary = false`) ingest
    /// and serve the API only. A second primary takes the pipelines over
    /// (fenced in PostgreSQL) and the first stops with an error.
    #[serde(default = "default_primary")]
    pub primary: bool,
}

/// `cluster.assignment`: how the workers of a group share the partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    /// Members register in the store's `members` table; the live ones (a
    /// PostgreSQL session open, a lease renewed) split the partitions.
    #[default]
    Postgres,
    /// Kafka's consumer group protocol (`group.id` = `cluster.group`).
    Kafka,
}

fn default_primary() -> bool {
    true
}

fn default_pg_schema() -> String {
    "kappa".into()
}

fn default_group() -> String {
    "kappa-views".into()
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}

impl ClusterConfig {
    /// The store settings.
    pub fn store(&self) -> crate::store::pg::PgSettings {
        crate::store::pg::PgSettings {
            url: self.postgres.clone(),
            schema: self.schema.clone(),
            ca_file: self.postgres_ca.clone(),
        }
    }
}

/// What readings carry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// Metric names views may refer to; a view naming another is refused.
    #[serde(default = "default_metrics")]
    pub metrics: Vec<String>,
    /// Each metric's unit, for people (the dashboard's charts and
    /// `GET /v1/views`). Absent: the simulated fleet's (°C, %, hPa, V) for
    /// those of its metrics named in `metrics`.
    #[serde(default)]
    pub units: Option<std::collections::BTreeMap<String, String>>,
}

impl SchemaConfig {
    /// The unit of every metric that has one.
    pub fn units(&self) -> std::collections::BTreeMap<String, String> {
        match &self.units {
            Some(units) => units.clone(),
            None => [("temperature", "°C"), ("humidity", "%"), ("pressure", "hPa"), ("battery", "V")]
                .into_iter()
                .filter(|(m, _)| self.metrics.iter().any(|n| n == m))
                .map(|(m, u)| (m.to_string(), u.to_string()))
                .collect(),
        }
    }
}

fn default_metrics() -> Vec<String> {
    ["temperature", "humidity", "pressure", "battery"].iter().map(|s| s.to_string()).collect()
}

impl Default for SchemaConfig {
    fn default() -> Self {
        Self { metrics: default_metrics(), units: None }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/cloud")
}

impl CloudConfig {
    /// Parses and checks a configuration, reporting every problem at once.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        config::from_toml(text)
    }

    /// Reads and checks a configuration file, with `KAPPA_CLOUD__SECTION__KEY`
    /// environment overrides (see `kappa_runtime::config`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        config::load_with_env(path, ENV_PREFIX)
    }

    /// Where the archive lives.
    pub fn archive_path(&self) -> PathBuf {
        self.archive.path.clone().unwrap_or_else(|| self.data_dir.join("archive"))
    }

    /// The alert rules.
    pub fn rule_specs(&self) -> Result<Vec<RuleSpec>, Vec<String>> {
        parse_rules(&self.rules, &self.schema.metrics)
    }

    /// What `run` and `worker` need from the machine, checked without
    /// starting anything or connecting anywhere: the data directory (and a
    /// local archive's) can be written, the HTTPS certificate and key parse
    /// and match, PostgreSQL's connection string parses and its CA file
    /// reads. `kappa-cloud config check` reports these, and a node and a
    /// cluster worker refuse to start on them, so the two agree.
    pub fn preflight(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut note = |r: Result<(), String>| problems.extend(r.err());
        note(kappa_runtime::config::writable_dir("data_dir", &self.data_dir));
        if self.archive.enabled && self.archive.url.is_none() {
            note(kappa_runtime::config::writable_dir("archive.path", &self.archive_path()));
        }
        if let Some(t) = &self.http.tls {
            note(crate::tls::server_config(&t.cert_file, &t.key_file).map(|_| ()));
        }
        if let Some(cluster) = &self.cluster {
            let checked = crate::store::pg::client_config(&cluster.store());
            note(checked.map(|_| ()).map_err(|e| format!("cluster.postgres: {e}")));
        }
        problems
    }

    /// Where the serving and checkpoint store is: PostgreSQL with
    /// `[cluster]`, else `views.sqlite` in the data directory.
    pub fn store_at(&self) -> crate::store::StoreAt {
        match &self.cluster {
            Some(cluster) => {
                crate::store::StoreAt::Cluster { settings: cluster.store(), log_partitions: self.log.partitions }
            }
            None => crate::store::StoreAt::Embedded(self.data_dir.join("views.sqlite")),
        }
    }

    /// The views to run: the configured ones, or the defaults when none are.
    pub fn view_specs(&self) -> Result<Vec<ViewSpec>, Vec<String>> {
        if self.views.is_empty() {
            let text = default_views_toml(&self.schema.metrics);
            let doc: toml::Table = toml::from_str(&text).map_err(|e| vec![format!("default views: {e}")])?;
            let tables: Vec<toml::Table> = doc
                .get("views")
                .and_then(toml::Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_table().cloned()).collect())
                .unwrap_or_default();
            parse_views(&tables, &self.schema.metrics)
        } else {
            parse_views(&self.views, &self.schema.metrics)
        }
    }
}

impl CloudConfig {
    /// Whether `run` runs the alert and aggregate pipelines, the alert
    /// deliveries and the archiver: always on one node, on a cluster only
    /// where `cluster.primary` is set.
    pub fn primary(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.primary)
    }

    /// The processor's settings (test-only faults from the environment).
    pub fn processor_settings(&self) -> crate::processor::ProcessorSettings {
        crate::processor::ProcessorSettings {
            checkpoint_interval: self.processor.checkpoint_interval,
            max_out_of_orderness_ms: self.processor.max_out_of_orderness.as_millis() as i64,
            poll_records: self.processor.poll_records,
            idle_timeout: self.processor.idle_timeout,
            dedup_horizon_ms: self.processor.dedup_horizon.as_millis() as i64,
            split_checkpoint_for_tests: kappa_runtime::fault::on(
                "KAPPA_TEST_SPLIT_CHECKPOINT",
                "checkpoints are not atomic; a crash can count readings twice",
            ),
        }
    }
}

impl Validate for CloudConfig {
    /// Semantic checks the types cannot express.
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !(1..=1024).contains(&self.log.partitions) {
            errors.push(format!("log.partitions: {} is outside 1..=1024", self.log.partitions));
        }
        if self.ingest.max_body_bytes == 0 || self.ingest.max_decompressed_bytes == 0 {
            errors.push("ingest.max_body_bytes, ingest.max_decompressed_bytes: must be positive".into());
        }
        if self.ingest.max_ratio == 0 {
            errors.push("ingest.max_ratio: must be at least 1".into());
        }
        if !(1..=64).contains(&self.api.readers) {
            errors.push(format!("api.readers: {} is outside 1..=64", self.api.readers));
        }
        if self.api.query_timeout.is_zero() {
            errors.push("api.query_timeout: must be positive".into());
        }
        if self.ingest.max_gateway_heartbeats_per_second == 0 {
            errors.push("ingest.max_gateway_heartbeats_per_second: must be at least 1".into());
        }
        if self.ingest.queue_capacity == 0 {
            errors.push("ingest.queue_capacity: must be at least 1".into());
        }
        if self.processor.poll_records == 0 {
            errors.push("processor.poll_records: must be at least 1".into());
        }
        match (self.log.backend, &self.log.kafka) {
            (LogBackend::Kafka, None) => {
                errors.push("log.kafka: backend = \"kafka\" needs a [log.kafka] section".into())
            }
            (LogBackend::Kafka, Some(k)) => {
                errors.extend(k.problems());
                if self.log.retention.is_some() {
                    errors.push(
                        "log.retention: the Kafka log keeps what the topic's retention.ms says; set it there".into(),
                    );
                }
            }
            (LogBackend::Sqlite, Some(_)) => {
                errors.push("log.kafka: set log.backend = \"kafka\" to use it (the backend is sqlite)".into())
            }
            (LogBackend::Sqlite, None) => {}
        }
        if let Some(c) = &self.cluster {
            if self.log.backend != LogBackend::Kafka {
                errors.push("cluster: workers share the Kafka log; set log.backend = \"kafka\"".into());
            }
            if c.schema.is_empty() || !c.schema.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                errors.push(format!("cluster.schema: {:?} must be letters, digits and _", c.schema));
            }
            if c.group.is_empty() {
                errors.push("cluster.group: must not be empty".into());
            }
            if c.session_timeout < Duration::from_secs(1) {
                errors.push("cluster.session_timeout: must be at least 1s".into());
            }
        }
        if self.log.retention.is_some() && !self.archive.enabled {
            errors.push("log.retention: needs archive.enabled = true (only archived records are deleted)".into());
        }
        if let Some(u) = &self.archive.url
            && !(u.starts_with("s3://") || u.starts_with("az://") || u.starts_with("azure://"))
        {
            errors.push(format!("archive.url: {u:?} must be s3://bucket/prefix or az://container/prefix"));
        }
        if self.archive.segment_bytes < 4096 {
            errors.push("archive.segment_bytes: must be at least 4096".into());
        }
        if self.http.header_read_timeout.is_zero() || self.http.body_read_timeout.is_zero() {
            errors.push("http.header_read_timeout, http.body_read_timeout: must be positive".into());
        }
        errors.extend(self.auth.problems());
        errors.extend(self.auth.exposure_problems(self.http.listen));
        if self.shutdown_deadline.is_zero() {
            errors.push("shutdown_deadline: must be positive".into());
        }
        if self.processor.checkpoint_interval.is_zero() {
            errors.push("processor.checkpoint_interval: must be positive".into());
        }
        for (metric, unit) in self.schema.units.iter().flatten() {
            if !self.schema.metrics.contains(metric) {
                errors.push(format!("schema.units.{metric}: {metric:?} is not in schema.metrics"));
            }
            if unit.chars().count() > 16 {
                errors.push(format!("schema.units.{metric}: {unit:?} is longer than 16 characters"));
            }
        }
        for (i, m) in self.schema.metrics.iter().enumerate() {
            if m.is_empty() || m.starts_with("tags.") || matches!(m.as_str(), "device" | "event_time") {
                errors.push(format!("schema.metrics[{i}]: {m:?} is not a usable metric name"));
            }
        }
        let rule_names = match self.rule_specs() {
            Ok(rules) => rules.into_iter().map(|r| r.name).collect(),
            Err(problems) => {
                errors.extend(problems);
                Vec::new()
            }
        };
        for (i, w) in self.webhooks.iter().enumerate() {
            errors.extend(w.problems(&format!("webhooks[{i}]"), &rule_names));
            if self.webhooks[..i].iter().any(|o| o.name == w.name) {
                errors.push(format!("webhooks[{i}].name: {:?} is used twice", w.name));
            }
        }
        if let Some(k) = &self.alerts.kafka {
            errors.extend(k.problems());
            if self.rules.is_empty() {
                errors.push("alerts.kafka: there is a Kafka topic but no [[rules]] to raise alerts".into());
            }
        }
        if !self.webhooks.is_empty() && self.rules.is_empty() {
            errors.push("webhooks: there are webhooks but no [[rules]] to raise alerts".into());
        }
        match self.view_specs() {
            Err(problems) => errors.extend(problems),
            Ok(specs) => {
                for (key, name) in
                    [("api.devices_view", &self.api.devices_view), ("api.windows_view", &self.api.windows_view)]
                {
                    if !specs.iter().any(|v| &v.name == name) {
                        errors.push(format!("{key}: no view named {name:?} is defined"));
                    }
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_is_a_working_single_node() {
        let cfg = CloudConfig::from_toml("").unwrap();
        assert_eq!(cfg.log.backend, LogBackend::Sqlite);
        assert_eq!(cfg.log.partitions, 8);
        let names: Vec<_> = cfg.view_specs().unwrap().into_iter().map(|v| v.id()).collect();
        assert_eq!(names, ["device_windows@1", "device_totals@1"]);
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let err = CloudConfig::from_toml(
            "[log]\npartitions = 0\n[processor]\npoll_records = 0\n[api]\nwindows_view = \"nope\"\n\
             [[views]]\nname = \"v\"\nwindow = { kind = \"tumbling\", size = \"soon\" }\naggregates = [{ name = \"n\", fn = \"count\" }]\n",
        )
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|m| m.split(':').next().unwrap_or_default()).collect();
        assert_eq!(keys, ["log.partitions", "processor.poll_records", "views[0].window.size"]);
    }

    #[test]
    fn the_kafka_log_needs_its_section_and_leaves_retention_to_the_topic() {
        let err = CloudConfig::from_toml("[log]\nbackend = \"kafka\"\n").unwrap_err().to_string();
        assert!(err.contains("log.kafka: backend = \"kafka\" needs a [log.kafka] section"), "{err}");
        let err = CloudConfig::from_toml(
            "[log]\nbackend = \"kafka\"\nretention = \"7d\"\n[log.kafka]\nbrokers = \"\"\ntopic = \"a b\"\n",
        )
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|m| m.split(':').next().unwrap_or_default()).collect();
        assert_eq!(keys, ["log.kafka.brokers", "log.kafka.topic", "log.retention"], "{err}");
        let err = CloudConfig::from_toml("[log.kafka]\nbrokers = \"k:9092\"\n").unwrap_err().to_string();
        assert!(err.contains("set log.backend = \"kafka\""), "{err}");
        let cfg = CloudConfig::from_toml("[log]\nbackend = \"kafka\"\n[log.kafka]\nbrokers = \"k:9092\"\n").unwrap();
        let k = cfg.log.kafka.unwrap();
        assert_eq!(
            (k.topic.as_str(), k.create_topic, k.delivery_timeout),
            ("kappa-events", true, Duration::from_secs(5))
        );
    }

    /// Secrets such as a SASL password stay out of the config file: a
    /// librdkafka property (a key with dots) comes from the environment, as a
    /// Kubernetes Secret sets it (`env` allows dots in names there).
    #[test]
    fn a_librdkafka_property_comes_from_the_environment() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/kafka.toml");
        let vars = [
            ("KAPPA_CLOUD__LOG__KAFKA__PROPERTIES__SASL.PASSWORD".to_string(), "s3cret".to_string()),
            ("KAPPA_CLOUD__LOG__KAFKA__PROPERTIES__SASL.MECHANISM".to_string(), "SCRAM-SHA-512".to_string()),
        ];
        let cfg: CloudConfig = config::load_with_vars(&path, ENV_PREFIX, vars).unwrap();
        let props = &cfg.log.kafka.as_ref().expect("[log.kafka]").properties;
        assert_eq!(props.get("sasl.password").map(String::as_str), Some("s3cret"));
        assert_eq!(props.get("sasl.mechanism").map(String::as_str), Some("SCRAM-SHA-512"));
    }

    /// Issue 22: no tokens only where nobody else can connect, unless the
    /// operator says `auth.insecure`.
    #[test]
    fn auth_is_off_only_on_loopback_unless_said_insecure() {
        let listen =
            |addr: &str, auth: &str| CloudConfig::from_toml(&format!("[http]\nlisten = \"{addr}\"\n[auth]\n{auth}\n"));
        for local in ["127.0.0.1:8080", "[::1]:8080"] {
            assert!(listen(local, "").is_ok(), "{local}");
        }
        for public in ["0.0.0.0:8080", "[::]:8080", "192.0.2.7:8080"] {
            let err = listen(public, "").unwrap_err().to_string();
            assert!(err.contains("auth.required: false on http.listen") && err.contains("auth.insecure"), "{err}");
            assert!(listen(public, "insecure = true").is_ok(), "{public}: the escape hatch");
        }
        let hash = crate::auth::token_sha256("t");
        let required =
            format!("required = true\n[[auth.tokens]]\nname = \"p\"\ntoken_sha256 = \"{hash}\"\nrole = \"read\"");
        assert!(listen("0.0.0.0:8080", &required).is_ok());
        let err = listen("0.0.0.0:8080", &format!("insecure = true\n{required}")).unwrap_err().to_string();
        assert!(err.contains("auth.insecure: true has no effect"), "{err}");
    }

    #[test]
    fn units_readers_and_query_timeouts_are_checked() {
        let cfg = CloudConfig::from_toml("").unwrap();
        assert_eq!(cfg.schema.units().get("temperature").map(String::as_str), Some("°C"));
        assert_eq!((cfg.api.readers, cfg.api.query_timeout), (4, Duration::from_secs(10)));
        let only = CloudConfig::from_toml("[schema]\nmetrics = [\"flow\"]\nunits = { flow = \"l/min\" }\n").unwrap();
        assert_eq!(only.schema.units().into_iter().collect::<Vec<_>>(), [("flow".to_string(), "l/min".to_string())]);
        let err = CloudConfig::from_toml(
            "[schema]\nunits = { flwo = \"l/min\" }\n[api]\nreaders = 0\nquery_timeout = \"0s\"\n",
        )
        .unwrap_err()
        .to_string();
        for expected in ["schema.units.flwo", "api.readers: 0", "api.query_timeout"] {
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(CloudConfig::from_toml("[log]\npartitons = 4\n").unwrap_err().to_string().contains("partitons"));
    }

    /// deploy/k8s/config/ is what the Kubernetes pods mount (kustomize's
    /// configMapGenerator); each role is valid with the environment its
    /// manifest sets (deploy/k8s/{primary,ingest,worker}.yaml; validate.sh
    /// checks the manifests' own variables with `kappa-cloud config check`).
    #[test]
    fn the_kubernetes_config_is_valid_for_every_role() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/config");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no TOML in {}", dir.display());
        let pg = ("KAPPA_CLOUD__CLUSTER__POSTGRES", "postgresql://kappa:secret@kappa-pg-rw.kappa:5432/kappa");
        let not_primary = [("KAPPA_CLOUD__CLUSTER__PRIMARY", "false")];
        let roles: [(&str, Vec<(&str, &str)>); 3] = [
            ("primary", vec![pg]),
            ("ingest", std::iter::once(pg).chain(not_primary).collect()),
            ("worker", vec![pg, ("KAPPA_CLOUD__HTTP__LISTEN", "0.0.0.0:9090")]),
        ];
        for f in &files {
            for (role, vars) in &roles {
                let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
                let cfg: CloudConfig = config::load_with_vars(f, ENV_PREFIX, vars)
                    .unwrap_or_else(|e| panic!("{} as the {role}: {e}", f.display()));
                let cluster = cfg.cluster.as_ref().expect("[cluster]");
                assert_eq!(cluster.postgres, pg.1, "{role}: the Secret's URL wins");
                assert_eq!(
                    cluster.store().ca_file.as_deref(),
                    Some(std::path::Path::new("/etc/kappa-cloud/postgres-ca/ca.crt")),
                    "{role}: TLS to PostgreSQL, verified against the operator's CA"
                );
                let kafka = cfg.log.kafka.as_ref().expect("[log.kafka]");
                assert!(!kafka.create_topic, "the KafkaTopic owns the topic");
                let rules = cfg.rule_specs().unwrap();
                match *role {
                    "primary" => assert!(cluster.primary && !rules.is_empty() && cfg.http.tls.is_some()),
                    "ingest" => assert!(!cluster.primary),
                    _ => assert_eq!(cfg.http.listen.port(), 9090),
                }
            }
        }
    }
}
