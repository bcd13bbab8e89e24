//! The processes of the benchmark's cluster sections (`cluster_workers`,
//! `cluster_ingest_nodes`): a tansu broker, and `kappa-cloud` processes on
//! its log with their state in PostgreSQL, each optionally in a cgroup of a
//! fixed CPU budget.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use super::cgroup::Cgroup;
use super::{free_port, wait_port};

/// Partitions of the topic every cluster section uses.
pub(super) const PARTITIONS: u32 = 16;

/// Runs `sql` on a connection of its own (never on a tokio runtime thread).
pub(super) fn pg_execute(url: &str, sql: &str) -> Result<(), postgres::Error> {
    postgres::Client::connect(url, postgres::NoTls)?.batch_execute(sql)
}

/// A child process killed and reaped when dropped: a failed run leaves none behind.
#[derive(Debug)]
pub(super) struct Reaped(pub(super) Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tansu broker in memory on a port of its own and the PostgreSQL URL,
/// for a section that needs both; `Err` (the section's JSON, and a line
/// printed) when either is missing.
pub(super) fn broker_and_postgres(section: &str) -> Result<(Reaped, String, String), Value> {
    let Some(bin) = crate::tansu_binary() else {
        println!("{section}: skipped (no tansu broker; .ci/run builds it, or set KAPPA_TANSU)");
        return Err(json!({ "skipped": "no tansu broker" }));
    };
    let url = crate::harness::postgres();
    if let Err(e) = pg_execute(&url, "SELECT 1") {
        println!("{section}: skipped (no PostgreSQL at KAPPA_TEST_POSTGRES or 127.0.0.1:5432: {e})");
        return Err(json!({ "skipped": "no PostgreSQL" }));
    }
    let port = free_port();
    let listener = format!("tcp://127.0.0.1:{port}");
    let broker = Reaped(
        Command::new(bin)
            .args(["broker", "--listener-url", &listener, "--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(port);
    Ok((broker, format!("127.0.0.1:{port}"), url))
}

/// Where a `kappa-cloud` process of the benchmark's cluster finds its log
/// (a topic of [`PARTITIONS`] partitions) and its PostgreSQL schema.
pub(super) struct ClusterTarget<'a> {
    pub(super) brokers: &'a str,
    pub(super) topic: &'a str,
    pub(super) url: &'a str,
    pub(super) schema: &'a str,
}

impl ClusterTarget<'_> {
    /// Spawns `kappa-cloud <role>` (`worker`, `run`) named `name`: its config
    /// (`cluster` lines added to `[cluster]`) and log (`{name}.log`, at
    /// `rust_log`) in `dir`, in a cgroup of `budget` µs per 100 ms if given.
    /// Returns the process, its HTTP port and its cgroup.
    pub(super) fn spawn(
        &self,
        dir: &Path,
        name: &str,
        role: &str,
        cluster: &str,
        rust_log: &str,
        budget: Option<u64>,
    ) -> (Reaped, u16, Option<Cgroup>) {
        let Self { brokers, topic, url, schema } = self;
        let port = free_port();
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nbackend = \"kafka\"\npartitions = {PARTITIONS}\n\
                 [log.kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ncreate_topic = false\n\
                 [cluster]\npostgres = {url:?}\nschema = \"{schema}\"\n{cluster}",
                dir.join(format!("{name}-data"))
            ),
        )
        .unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["cloud", role, "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        let cgroup = budget.map(|quota| {
            let cg = Cgroup::new(&format!("kappa-bench-{name}-{}", std::process::id()), quota, None).unwrap();
            cg.add(child.id()).unwrap();
            cg
        });
        (Reaped(child), port, cgroup)
    }
}
