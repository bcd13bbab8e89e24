//! `kappa-chaos`: a fault-seeded soak of the whole pipeline. A simulated
//! fleet publishes to the agent's own listener; the agent forwards through a
//! misbehaving proxy to a cloud node (embedded log). For the run's duration,
//! faults drawn from the seed hit it one after another: SIGKILL and SIGSTOP
//! of the agent and of the cloud, the proxy delaying, resetting,
//! black-holing and dropping responses after the cloud committed, and a full
//! disk under the agent (root only: its data directory is a tmpfs). Then
//! the faults stop, the fleet finishes, and the run checks its promises
//! against the simulator's ground truth: every reading a device got a
//! PUBACK for is in the views exactly once, and `kappa-edge log check`
//! passes. A failure prints the seed that reproduces it.

pub mod proxy;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::alert_kit::Received;
use crate::harness::{
    Cloud, Edge, FLEET_PROCESSOR, Fleet, Moto, Mqtt, Proc, Tansu, Worker, bin, cluster_config, diff_against_truth,
    free_port, fresh_schema, total, try_fetch_rows,
};

/// Which event log the cloud runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One node, the embedded SQLite log.
    Embedded,
    /// An ingest node (primary: it runs the alert pipeline) and two
    /// processor workers, on a Kafka-protocol broker (tansu, its topics in
    /// moto's S3, so that it survives a restart) and PostgreSQL.
    Kafka,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// How long faults are injected (the fleet publishes a little longer).
    pub duration: Duration,
    pub devices: u32,
    /// Readings per second per device.
    pub rate: f64,
    pub backend: Backend,
    /// With `--kafka`: the workers share the partitions by Kafka's group
    /// protocol (`cluster.assignment = "kafka"`) instead of PostgreSQL.
    pub kafka_groups: bool,
    /// Where the processes keep their data and logs.
    pub dir: PathBuf,
}

/// A seeded xorshift generator: the same seed, the same run of faults.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[low, high)` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next_u64() % (high - low).max(1))
    }
}

/// The faults a run draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillAgent,
    KillCloud,
    StopAgent,
    StopCloud,
    ProxyDelay,
    ProxyReset,
    ProxyBlackhole,
    ProxyDropResponses,
    DiskFull,
    KillWorker,
    StopWorker,
    KillBroker,
    StopBroker,
    RestartPostgres,
}

impl Fault {
    const ALL: [Fault; 14] = [
        Fault::KillAgent,
        Fault::KillCloud,
        Fault::StopAgent,
        Fault::StopCloud,
        Fault::ProxyDelay,
        Fault::ProxyReset,
        Fault::ProxyBlackhole,
        Fault::ProxyDropResponses,
        Fault::DiskFull,
        Fault::KillWorker,
        Fault::StopWorker,
        Fault::KillBroker,
        Fault::StopBroker,
        Fault::RestartPostgres,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::KillAgent => "kill -9 the agent",
            Self::KillCloud => "kill -9 the cloud node",
            Self::StopAgent => "SIGSTOP the agent",
            Self::StopCloud => "SIGSTOP the cloud node",
            Self::ProxyDelay => "delay edge <-> cloud",
            Self::ProxyReset => "reset edge <-> cloud connections",
            Self::ProxyBlackhole => "black-hole edge <-> cloud",
            Self::ProxyDropResponses => "drop the cloud's responses after it committed",
            Self::DiskFull => "fill the agent's disk",
            Self::KillWorker => "kill -9 a processor worker",
            Self::StopWorker => "SIGSTOP a processor worker",
            Self::KillBroker => "kill -9 the Kafka broker",
            Self::StopBroker => "SIGSTOP the Kafka broker",
            Self::RestartPostgres => "stop and start PostgreSQL",
        }
    }

    /// Whether a run on `backend` (with a disk it can fill or not) has this fault.
    fn applies(self, backend: Backend, disk: bool) -> bool {
        match self {
            Self::DiskFull => disk,
            Self::KillWorker | Self::StopWorker | Self::KillBroker | Self::StopBroker | Self::RestartPostgres => {
                backend == Backend::Kafka
            }
            _ => true,
        }
    }
}

/// A tmpfs for the agent's data (unmounted when dropped), so the disk can fill.
#[derive(Debug)]
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at.to_str()?])
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    /// Writes a file until the filesystem refuses more.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("ballast");
        if let Ok(mut f) = std::fs::File::create(&path) {
            let chunk = vec![0xA5u8; 64 << 10];
            for size in [chunk.len(), 4096, 512] {
                while f.write_all(&chunk[..size]).and_then(|_| f.flush()).is_ok() {}
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").args(["-l", self.0.to_str().unwrap_or_default()]).status();
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub faults: Vec<(Duration, Fault)>,
    pub acked: u64,
    pub in_views: u64,
    pub responses_dropped: u64,
    /// Alerts in the store, and their transitions the webhook received.
    pub alerts: usize,
    pub transitions_delivered: usize,
    pub problems: Vec<String>,
}

impl Report {
    /// The verdict; a failure's ends with `kappa-chaos {flags}`, the
    /// command that reproduces it.
    pub fn summary(&self, seed: u64, backend: Backend, flags: &str) -> String {
        let mut s = String::new();
        let verdict = if self.problems.is_empty() { "ok" } else { "FAILED" };
        let _ = writeln!(
            s,
            "kappa-chaos seed {seed} ({backend:?}): {verdict}: {} faults, {} readings acknowledged, {} in the views, \
             {} cloud responses dropped after commit, {} alerts with {} transitions delivered",
            self.faults.len(),
            self.acked,
            self.in_views,
            self.responses_dropped,
            self.alerts,
            self.transitions_delivered
        );
        for p in &self.problems {
            let _ = writeln!(s, "  problem: {p}");
        }
        if !self.problems.is_empty() {
            let _ = writeln!(s, "  reproduce: kappa-chaos {flags}");
        }
        s
    }
}

/// Alert rules that fire on the simulator's anomalies and on devices gone
/// quiet while the agent is stopped, and a webhook to the run's receiver.
fn alert_config(hook_port: u16) -> String {
    format!(
        "{}\n[[webhooks]]\nname = \"chaos\"\nurl = \"http://127.0.0.1:{hook_port}/hook\"\ntimeout = \"1s\"\n\
         backoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\nmax_attempts = 100000\n",
        crate::alert_kit::RULES
    )
}

/// The processes under test, apart from the fleet.
struct Rig {
    cloud: Cloud,
    edge: Edge,
    workers: Vec<Worker>,
    broker: Option<Tansu>,
    _moto: Option<Moto>,
}

impl Rig {
    /// Starts everything, with the edge sending through a proxy: returns
    /// the rig, the agent's MQTT port and the proxy's fault switches.
    async fn start(opts: &Options, hook_port: u16) -> (Rig, u16, Arc<proxy::Faults>) {
        let dir = &opts.dir;
        let cloud_config = format!("{FLEET_PROCESSOR}{}", alert_config(hook_port));
        let (cloud, workers, broker, moto) = match opts.backend {
            Backend::Embedded => (Cloud::start_with(dir, "cloud", &cloud_config, &[]).await, Vec::new(), None, None),
            Backend::Kafka => {
                let moto = Moto::start(dir).await;
                let broker = Tansu::start_on_s3(dir, &moto).await;
                let schema = fresh_schema(&format!("chaos_{}", opts.seed));
                let assignment = if opts.kafka_groups { "kafka" } else { "postgres" };
                let config =
                    cluster_config(&broker, &schema, &format!("assignment = \"{assignment}\"\n{cloud_config}"));
                let cloud = Cloud::start_with(dir, "cloud", &config, &[]).await;
                let mut workers = Vec::new();
                for i in 0..2 {
                    workers.push(Worker::start(dir, &format!("worker-{i}"), &config, &[]).await);
                }
                (cloud, workers, Some(broker), Some(moto))
            }
        };
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], cloud.port));
        let (proxy, faults) = proxy::start(upstream).await.expect("start the proxy");
        let mqtt = free_port();
        // No free-space floor: a full disk then pauses acknowledgements
        // instead of shedding the oldest readings (counted, but not in the
        // views, which would make "every acknowledged reading is in the views"
        // untrue by design).
        let extra = "\n[log]\nhousekeeping_interval = \"500ms\"\nmin_free_bytes = 0\n";
        let edge =
            Edge::start_named(dir, "edge", "gw-chaos", Mqtt::Embedded(mqtt), &format!("http://{proxy}"), extra).await;
        (Rig { cloud, edge, workers, broker, _moto: moto }, mqtt, faults)
    }

    fn logs(&self) -> Vec<String> {
        let mut logs = vec![self.edge.proc.tail(), self.cloud.proc.tail()];
        logs.extend(self.workers.iter().map(|w| w.proc.tail()));
        logs.extend(self.broker.iter().map(|b| b.proc.tail()));
        logs
    }
}

/// Runs one seeded soak.
pub async fn run(opts: &Options) -> Report {
    let dir = &opts.dir;
    let mut rng = Rng::new(opts.seed);
    let mut report = Report::default();
    let disk = if is_root() { Tmpfs::mount(&dir.join("edge-data"), "64m") } else { None };
    let (hook_port, hooks) = crate::alert_kit::receiver(0, 0).await;
    let (mut rig, mqtt, faults) = Rig::start(opts, hook_port).await;

    let seconds = opts.duration.as_secs_f64();
    let readings = (opts.rate * (seconds + 5.0)).ceil() as u64;
    let mut fleet = Fleet::new(opts.devices, readings, opts.rate);
    fleet.extra =
        ["--inflight", "4", "--anomaly-every", "120", "--anomaly-warmup", "40", "--anomaly-kinds", "spike,step,stuck"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut sim = fleet.start(mqtt, dir);

    let kinds: Vec<Fault> = Fault::ALL.into_iter().filter(|f| f.applies(opts.backend, disk.is_some())).collect();
    let started = Instant::now();
    while started.elapsed() < opts.duration {
        tokio::time::sleep(rng.millis(1_000, 4_000)).await;
        let fault = kinds[(rng.next_u64() % kinds.len() as u64) as usize];
        report.faults.push((started.elapsed(), fault));
        println!("  {:>6.1} s  {}", started.elapsed().as_secs_f64(), fault.name());
        let hold = rng.millis(500, 4_000);
        let which = (rng.next_u64() % rig.workers.len().max(1) as u64) as usize;
        match fault {
            Fault::KillAgent => {
                rig.edge.proc.kill9().await;
                tokio::time::sleep(rng.millis(0, 1_500)).await;
                rig.edge.restart(true).await;
            }
            Fault::KillCloud => {
                rig.cloud.proc.kill9().await;
                tokio::time::sleep(rng.millis(0, 2_000)).await;
                rig.cloud.restart().await;
            }
            Fault::StopAgent => pause(&rig.edge.proc, hold).await,
            Fault::StopCloud => pause(&rig.cloud.proc, hold).await,
            Fault::ProxyDelay => {
                faults.delay_ms.store(100 + rng.next_u64() % 900, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                faults.clear();
            }
            Fault::ProxyReset => {
                faults.resets.fetch_add(1, Ordering::SeqCst);
            }
            Fault::ProxyBlackhole => {
                faults.blackhole.store(true, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                faults.clear();
                faults.resets.fetch_add(1, Ordering::SeqCst);
            }
            Fault::ProxyDropResponses => {
                faults.drop_responses.store(true, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                faults.clear();
            }
            Fault::DiskFull => {
                if let Some(disk) = &disk {
                    let ballast = disk.fill();
                    tokio::time::sleep(hold).await;
                    let _ = std::fs::remove_file(ballast);
                }
            }
            Fault::KillWorker => {
                if let Some(w) = rig.workers.get_mut(which) {
                    w.proc.kill9().await;
                    tokio::time::sleep(rng.millis(0, 2_000)).await;
                    w.restart().await;
                }
            }
            Fault::StopWorker => {
                if let Some(w) = rig.workers.get(which) {
                    pause(&w.proc, hold).await;
                }
            }
            Fault::KillBroker => {
                if let Some(b) = rig.broker.as_mut() {
                    b.proc.kill9().await;
                    tokio::time::sleep(rng.millis(0, 2_000)).await;
                    b.restart().await;
                }
            }
            Fault::StopBroker => {
                if let Some(b) = &rig.broker {
                    pause(&b.proc, hold).await;
                }
            }
            Fault::RestartPostgres => {
                if let Err(e) = postgres_ctl("stop") {
                    report.problems.push(format!("cannot stop PostgreSQL: {e}"));
                }
                tokio::time::sleep(hold).await;
                if let Err(e) = postgres_ctl("start") {
                    report.problems.push(format!("cannot start PostgreSQL: {e}"));
                    return report;
                }
            }
        }
    }
    faults.clear();
    report.responses_dropped = faults.dropped.load(Ordering::SeqCst);

    // The faults are over: everything acknowledged must arrive, once.
    let truth = match tokio::time::timeout(Duration::from_secs(300), Fleet::finish(&mut sim, dir)).await {
        Ok(t) => t,
        Err(_) => {
            report.problems.push("the fleet did not finish within 300 s of the last fault".into());
            return report;
        }
    };
    report.acked = truth.acked;
    let url = rig.cloud.url();
    let client = reqwest::Client::new();
    // Catching up can take minutes (tansu on moto's S3 serves a backlog
    // slowly): wait while the views make progress, give up after 120 s
    // without any, or 20 minutes in all.
    let (cap, stall) = (Instant::now() + Duration::from_secs(1200), Duration::from_secs(120));
    let (mut seen, mut progressed) = (0, Instant::now());
    let mut last_error = None;
    loop {
        match try_fetch_rows(&client, &url, "device_totals").await {
            Ok(rows) if total(&rows) >= truth.acked => break,
            Ok(rows) if total(&rows) > seen => (seen, progressed) = (total(&rows), Instant::now()),
            Ok(_) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= cap || progressed.elapsed() >= stall {
            report.problems.extend(last_error.map(|e| format!("the API failed while the views caught up: {e}")));
            report.problems.push(format!("the views stopped at {seen} of {} readings", truth.acked));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rows = match try_fetch_rows(&client, &url, "device_windows").await {
        Ok(rows) => rows,
        Err(e) => {
            report.problems.push(e);
            report.problems.extend(rig.logs());
            return report;
        }
    };
    report.in_views = total(&rows);
    if report.in_views != truth.acked {
        report.problems.push(format!("{} acknowledged, {} in the views", truth.acked, report.in_views));
    }
    report.problems.extend(diff_against_truth(&truth, &rows).into_iter().take(20));
    check_alerts(&url, &hooks, &mut report).await;
    let check = std::process::Command::new(bin())
        .args(["edge", "log", "check", "--config", rig.edge.config.to_str().unwrap_or_default()])
        .output();
    match check {
        Ok(o) if o.status.success() => {}
        Ok(o) => report.problems.push(format!("kappa-edge log check: {}", String::from_utf8_lossy(&o.stdout).trim())),
        Err(e) => report.problems.push(format!("cannot run kappa-edge log check: {e}")),
    }
    if !report.problems.is_empty() {
        report.problems.extend(rig.logs());
        report.problems.push(sim.tail());
    }
    report
}

/// Alerts are kept once per transition and each transition reaches the
/// webhook (at least once, every time with the same idempotency key and
/// body). Waits until the deliveries catch up with the store, or 120 s.
async fn check_alerts(url: &str, hooks: &Arc<Mutex<Received>>, report: &mut Report) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let alerts = crate::alert_kit::fetch_alerts(url, &[]).await;
        let mut transitions = BTreeSet::new();
        let mut problems = Vec::new();
        for a in &alerts {
            let id = a["id"].as_str().unwrap_or_default();
            let detail: serde_json::Value = match reqwest::get(format!("{url}/v1/alerts/{id}")).await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(e) => {
                    problems.push(format!("GET alert {id}: {e}"));
                    continue;
                }
            };
            let history: Vec<&str> = detail["history"]
                .as_array()
                .map(|h| h.iter().filter_map(|e| e["transition"].as_str()).collect())
                .unwrap_or_default();
            for t in &history {
                if !transitions.insert(format!("{id}:{t}")) {
                    problems.push(format!("alert {id} went through {t} twice: {history:?}"));
                }
            }
            if history.first() != Some(&"fired") {
                problems.push(format!("alert {id} does not start with fired: {history:?}"));
            }
        }
        let delivered: BTreeSet<String> = hooks.lock().map(|h| h.by_key.keys().cloned().collect()).unwrap_or_default();
        let missing: Vec<&String> = transitions.difference(&delivered).collect();
        let unknown: Vec<&String> = delivered.difference(&transitions).collect();
        if (missing.is_empty() && unknown.is_empty()) || Instant::now() > deadline {
            report.alerts = alerts.len();
            report.transitions_delivered = transitions.len() - missing.len();
            if !missing.is_empty() {
                problems.push(format!(
                    "{} transitions never delivered: {:?}",
                    missing.len(),
                    &missing[..missing.len().min(5)]
                ));
            }
            if !unknown.is_empty() {
                problems.push(format!(
                    "{} deliveries of transitions not in the store: {:?}",
                    unknown.len(),
                    &unknown[..unknown.len().min(5)]
                ));
            }
            if let Ok(h) = hooks.lock() {
                for (key, bodies) in &h.by_key {
                    if bodies.iter().any(|b| b != &bodies[0]) {
                        problems.push(format!("{key} was delivered with different bodies"));
                    }
                }
            }
            if alerts.is_empty() {
                problems.push("no alert fired: the fleet's anomalies should have fired some".into());
            }
            report.problems.extend(problems);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `pg_ctlcluster` on the machine's PostgreSQL (the one the tests use).
fn postgres_ctl(action: &str) -> Result<(), String> {
    let versions = std::fs::read_dir("/etc/postgresql").map_err(|e| format!("/etc/postgresql: {e}"))?;
    let version = versions
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .ok_or("no PostgreSQL cluster in /etc/postgresql")?;
    let mut args = vec!["--skip-systemctl-redirect", version.as_str(), "main", action];
    if action == "stop" {
        args.extend(["--", "-m", "fast"]);
    }
    let out = std::process::Command::new("pg_ctlcluster").args(&args).output().map_err(|e| e.to_string())?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) }
}

/// SIGSTOP for `hold`, then SIGCONT.
async fn pause(proc: &Proc, hold: Duration) {
    proc.signal(libc::SIGSTOP);
    tokio::time::sleep(hold).await;
    proc.signal(libc::SIGCONT);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}
