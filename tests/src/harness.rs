//! The end-to-end harness, shared by the test binaries (`tests/e2e`,
//! `tests/alone`) and the tools (`kappa-chaos`): processes, ports, configs,
//! the fleet, and the comparison of views against ground truth.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kappa_cloud::api::{RowOut, RowsPage};
use kappa_common::Reading;
use kappa_common::batch::{self, EdgeBatch};
use kappa_sim::truth::GroundTruth;

static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes `path` the program [`bin`] runs the roles with (a tool that runs
/// them itself, like `kappa-chaos`); before the first [`bin`] only.
pub fn set_bin(path: &str) {
    let _ = BIN.set(path.to_string());
}

/// `kappa-proc`: the edge, cloud and sim binaries in one executable. Found
/// next to the running program (or one directory up, for test binaries in
/// `target/*/deps`); `KAPPA_PROC` overrides. A program that runs the roles
/// itself (`kappa-chaos`) is its own.
pub fn bin() -> &'static str {
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KAPPA_PROC") {
            return p.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the running program's path");
        let found = exe
            .parent()
            .into_iter()
            .flat_map(|dir| [dir.join("kappa-proc"), dir.parent().map(|p| p.join("kappa-proc")).unwrap_or_default()])
            .find(|p| p.is_file());
        found.unwrap_or(exe).to_string_lossy().into_owned()
    })
}

/// A port nobody is listening on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

/// A child process whose output goes to a log file; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `kappa-proc ROLE ARGS`.
    pub fn spawn(name: &str, role: &str, args: &[&str], dir: &Path) -> Proc {
        Self::spawn_cmd(name, bin(), &[&[role], args].concat(), dir)
    }

    /// Starts any program.
    pub fn spawn_cmd(name: &str, program: &str, args: &[&str], dir: &Path) -> Proc {
        Self::spawn_env(name, program, args, dir, &[])
    }

    /// Starts any program with extra environment variables.
    pub fn spawn_env(name: &str, program: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = tokio::process::Command::new(program)
            .args(args)
            .env("RUST_LOG", "info,rumqttc=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc { name: name.to_string(), child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map_or(0, |p| p as i32)
    }

    /// The process's peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM for {}", self.name));
        kib / 1024.0
    }

    /// SIGKILL, then reap.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().await.expect("wait")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit on its own.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("{} did not exit within {timeout:?}\n{}", self.name, self.tail()),
        }
    }

    /// The last lines of the process's log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16) {
    wait_for(&format!("port {port}"), Duration::from_secs(30), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
    })
    .await
}

/// A cloud node process with its own data directory and port.
#[derive(Debug)]
pub struct Cloud {
    pub port: u16,
    pub config: PathBuf,
    pub proc: Proc,
    name: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

/// The processor settings for fleet-driven tests. The simulated fleets run
/// event time 30-40 times faster than the wall clock, so the built-in 10 s
/// bound on out-of-orderness is a third of a second of scheduling jitter
/// between devices: on a loaded 2-core machine a lagging device's readings
/// fell behind the watermark and went to the late log (seen in CI). The
/// reference design's 10 minutes (deploy/cloud/single-node.toml) is about
/// 15 s of wall time here.
pub const FLEET_PROCESSOR: &str = "[processor]\ncheckpoint_interval = \"500ms\"\nmax_out_of_orderness = \"10m\"\n";

impl Cloud {
    pub async fn start(dir: &Path) -> Cloud {
        Self::start_with(dir, "cloud", FLEET_PROCESSOR, &[]).await
    }

    /// A node named `name` (its config, data and log file carry the name),
    /// with `extra` TOML after `data_dir` and `[http]`.
    pub async fn start_with(dir: &Path, name: &str, extra: &str, env: &[(&str, &str)]) -> Cloud {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{extra}",
                dir.join(format!("{name}-data"))
            ),
        )
        .expect("write cloud config");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let proc = spawn_cloud(name, &config, dir, &env);
        wait_for_port(port).await;
        Cloud { port, config, proc, name: name.into(), dir: dir.into(), env }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Rewrites the node's config with `extra` after `data_dir` and `[http]` (same data, same port).
    pub fn reconfigure(&self, extra: &str) {
        let data = self.dir.join(format!("{}-data", self.name));
        std::fs::write(
            &self.config,
            format!("data_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:{}\"\n{extra}", self.port),
        )
        .expect("write cloud config");
    }

    /// The node's config, as the admin functions take it.
    pub fn config(&self) -> kappa_cloud::config::CloudConfig {
        kappa_cloud::config::CloudConfig::load(&self.config).expect("cloud config")
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("{}-data", self.name))
    }

    /// Starts the same node again (same data, same port).
    pub async fn restart(&mut self) {
        self.proc = spawn_cloud(&self.name, &self.config, &self.dir, &self.env);
        wait_for_port(self.port).await;
    }

    /// `kappa-cloud views dump`: every row and the late log, canonically ordered.
    pub async fn dump(&self) -> String {
        self.dump_with(&[]).await
    }

    /// `views dump` with more arguments (`--alerts`).
    pub async fn dump_with(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(bin())
            .args(["cloud", "views", "dump", "--config", self.config.to_str().unwrap_or_default()])
            .args(args)
            .output()
            .await
            .expect("views dump");
        assert!(out.status.success(), "views dump failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 dump")
    }

    /// Records processed so far, from the checkpoint in the store (readable while the node runs).
    pub fn checkpointed_offsets(&self) -> u64 {
        self.checkpointed_offsets_of(kappa_cloud::store::MAIN_PIPELINE)
    }

    /// Records a pipeline (`main`, `alerts`, `aggregates`) processed so far, from its checkpoint.
    pub fn checkpointed_offsets_of(&self, pipeline: &str) -> u64 {
        let path = self.dir.join(format!("{}-data", self.name)).join("views.sqlite");
        kappa_cloud::store::ViewStore::open_read_only(&path)
            .and_then(|s| s.restore(pipeline))
            .map(|r| r.partitions.values().map(|(o, _)| *o).sum())
            .unwrap_or(0)
    }
}

fn spawn_cloud(name: &str, config: &Path, dir: &Path, env: &[(String, String)]) -> Proc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::spawn_env(name, bin(), &["cloud", "run", "--config", config.to_str().unwrap_or_default()], dir, &env)
}

/// An MQTT 3.1.1 CONNECT for client `id` (clean session, keep-alive 30 s),
/// with a login if given: for tests that drive a raw socket.
pub fn connect_packet(id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    if let Some((user, password)) = login {
        c.set_login(user, password);
    }
    let mut out = bytes::BytesMut::new();
    c.write(&mut out).expect("encode a CONNECT");
    out.to_vec()
}

/// How the edge agent reaches devices.
#[derive(Debug, Clone)]
pub enum Mqtt {
    /// Its own MQTT listener on this port.
    Embedded(u16),
    /// An external broker on this port.
    External { port: u16, topic_prefix: String, client_id: String },
}

/// An edge agent process.
#[derive(Debug)]
pub struct Edge {
    pub mqtt_port: u16,
    pub http_port: u16,
    pub config: PathBuf,
    pub proc: Proc,
    dir: PathBuf,
    name: String,
    env: Vec<(String, String)>,
}

impl Edge {
    pub async fn start(dir: &Path, mqtt: Mqtt, cloud_url: &str) -> Edge {
        Self::start_named(dir, "edge", "gw-test", mqtt, cloud_url, "").await
    }

    /// An agent named `name` (its config, data and log carry the name) for
    /// gateway `gateway`, with `extra` TOML appended to `[forward]`.
    pub async fn start_named(dir: &Path, name: &str, gateway: &str, mqtt: Mqtt, cloud_url: &str, extra: &str) -> Edge {
        Self::start_env(dir, name, gateway, mqtt, cloud_url, extra, &[]).await
    }

    /// [`Edge::start_named`] with extra environment variables (kept across restarts).
    pub async fn start_env(
        dir: &Path,
        name: &str,
        gateway: &str,
        mqtt: Mqtt,
        cloud_url: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        let http_port = free_port();
        let config = dir.join(format!("{name}.toml"));
        let (mqtt_port, mqtt_section) = match &mqtt {
            Mqtt::Embedded(port) => (*port, format!("mode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n")),
            Mqtt::External { port, topic_prefix, client_id } => (
                *port,
                format!(
                    "mode = \"external\"\nbroker_url = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = {topic_prefix:?}\nclient_id = {client_id:?}\n"
                ),
            ),
        };
        std::fs::write(
            &config,
            format!(
                "gateway_id = {gateway:?}\ndata_dir = {:?}\n[mqtt]\n{mqtt_section}[clock]\nmax_behind = \"{HISTORY_DAYS}d\"\n[forward]\ncloud_url = {cloud_url:?}\nmax_batch_readings = 2000\nmax_batch_age = \"200ms\"\nretry_min = \"100ms\"\nretry_max = \"1s\"\n{extra}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n",
                dir.join(if name == "edge" { "edge-data".to_string() } else { format!("{name}-data") })
            ),
        )
        .expect("write edge config");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let proc = Self::spawn(name, &config, dir, &env);
        let edge = Edge { mqtt_port, http_port, config, proc, dir: dir.to_path_buf(), name: name.to_string(), env };
        edge.wait_ready(matches!(mqtt, Mqtt::Embedded(_))).await;
        edge
    }

    fn spawn(name: &str, config: &Path, dir: &Path, env: &[(String, String)]) -> Proc {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_env(name, bin(), &["edge", "run", "--config", config.to_str().unwrap_or_default()], dir, &env)
    }

    async fn wait_ready(&self, embedded: bool) {
        wait_for_port(self.http_port).await;
        if embedded {
            wait_for_port(self.mqtt_port).await;
        }
    }

    /// Starts the agent again with the same configuration and data.
    pub async fn restart(&mut self, embedded: bool) {
        self.proc = Self::spawn(&self.name, &self.config, &self.dir, &self.env);
        self.wait_ready(embedded).await;
    }

    /// One counter or gauge from the agent's `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric(&format!("http://127.0.0.1:{}/metrics", self.http_port), name).await
    }
}

/// A private Mosquitto on its own port, configured as a gateway should be
/// for the agent's external mode (queues deep enough to hold a backlog while
/// the agent restarts).
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
    conf: PathBuf,
}

impl Mosquitto {
    pub async fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\n"
            ),
        )
        .expect("write mosquitto config");
        let proc = Proc::spawn_cmd("mosquitto", "mosquitto", &["-c", conf.to_str().unwrap_or_default()], dir);
        wait_for_port(port).await;
        Mosquitto { port, proc, conf }
    }

    /// Starts it again on the same port (after `proc.kill9()`).
    pub async fn restart(&mut self, dir: &Path) {
        self.proc = Proc::spawn_cmd("mosquitto", "mosquitto", &["-c", self.conf.to_str().unwrap_or_default()], dir);
        wait_for_port(self.port).await;
    }
}

/// A fleet run.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub devices: u32,
    pub readings: u64,
    pub rate: f64,
    pub seed: u64,
    pub topic_prefix: String,
    pub id_prefix: String,
    /// Share of devices on schema-1 firmware.
    pub v1_share: f64,
    /// Share of devices sending JSON.
    pub json_share: f64,
    /// The process name; the ground truth goes to `{name}-truth.json`.
    pub name: String,
    /// More simulator arguments (anomaly scenarios).
    pub extra: Vec<String>,
    /// Event time of the first reading.
    pub start_ms: i64,
    /// Event time between two readings of a device.
    pub event_interval: String,
}

impl Fleet {
    pub fn new(devices: u32, readings: u64, rate: f64) -> Fleet {
        Fleet {
            devices,
            readings,
            rate,
            seed: 7,
            topic_prefix: String::new(),
            id_prefix: "sim-".into(),
            v1_share: 0.0,
            json_share: 0.0,
            name: "sim".into(),
            extra: Vec::new(),
            start_ms: T0,
            event_interval: "1s".into(),
        }
    }

    /// Starts the simulator against a broker on `port`; [`Fleet::finish`] waits for its truth.
    pub fn start(&self, port: u16, dir: &Path) -> Proc {
        let truth = dir.join(format!("{}-truth.json", self.name));
        let args = [
            "--broker".to_string(),
            format!("127.0.0.1:{port}"),
            "--devices".into(),
            self.devices.to_string(),
            "--readings".into(),
            self.readings.to_string(),
            "--rate".into(),
            self.rate.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--event-interval".into(),
            self.event_interval.clone(),
            "--start-ms".into(),
            self.start_ms.to_string(),
            "--topic-prefix".into(),
            self.topic_prefix.clone(),
            "--id-prefix".into(),
            self.id_prefix.clone(),
            "--drain-timeout".into(),
            "90s".into(),
            "--v1-share".into(),
            self.v1_share.to_string(),
            "--json-share".into(),
            self.json_share.to_string(),
            "--truth".into(),
            truth.to_str().unwrap_or_default().to_string(),
        ];
        let args: Vec<&str> = args.iter().chain(&self.extra).map(String::as_str).collect();
        Proc::spawn(&self.name, "sim", &args, dir)
    }

    /// Waits for the simulator to finish and reads its ground truth.
    pub async fn finish(sim: &mut Proc, dir: &Path) -> GroundTruth {
        let status = sim.wait(Duration::from_secs(240)).await;
        assert!(status.success(), "the simulator failed: {status}\n{}", sim.tail());
        let truth = GroundTruth::read(&dir.join(format!("{}-truth.json", sim.name))).expect("ground truth");
        assert_eq!(truth.undelivered, 0, "the simulator ended with unacknowledged readings");
        truth
    }
}

/// The status code of `GET url` (0 when nothing answers).
pub async fn status(url: &str) -> u16 {
    reqwest::get(url).await.map_or(0, |r| r.status().as_u16())
}

/// A counter or gauge value from a Prometheus text page (summing label sets).
pub async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// The value of one labelled series on a Prometheus page, e.g.
/// `kappa_cloud_ingest_requests_total{result="accepted"}` (0 when absent).
pub async fn series(url: &str, series: &str) -> f64 {
    series_with(&reqwest::Client::new(), url, series).await
}

/// [`series`] with a client of the caller's (TLS roots).
pub async fn series_with(client: &reqwest::Client, url: &str, series: &str) -> f64 {
    let page = client.get(format!("{url}/metrics")).send().await.expect("metrics");
    let text = page.text().await.expect("metrics text");
    text.lines().filter_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok()).next().unwrap_or(0.0)
}

/// Every row of a view, through the paginated API.
pub async fn fetch_rows(cloud_url: &str, view: &str) -> Vec<RowOut> {
    fetch_rows_with(&reqwest::Client::new(), cloud_url, view).await
}

/// [`fetch_rows`] with a client of the caller's (TLS roots, a token).
pub async fn fetch_rows_with(client: &reqwest::Client, cloud_url: &str, view: &str) -> Vec<RowOut> {
    try_fetch_rows(client, cloud_url, view).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`fetch_rows_with`] that says what went wrong instead of panicking.
pub async fn try_fetch_rows(client: &reqwest::Client, cloud_url: &str, view: &str) -> Result<Vec<RowOut>, String> {
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = client.get(format!("{cloud_url}/v1/views/{view}/rows")).query(&[("limit", "5000")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let response = req.send().await.map_err(|e| format!("query API: {e}"))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| format!("query API: {e}"))?;
        if !status.is_success() {
            return Err(format!("query API: {status}: {body}"));
        }
        let page: RowsPage = serde_json::from_str(&body).map_err(|e| format!("rows page: {e}: {body}"))?;
        rows.extend(page.rows);
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(rows),
        }
    }
}

fn count(row: &RowOut, name: &str) -> u64 {
    row.values.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

fn num(row: &RowOut, name: &str) -> Option<f64> {
    row.values.get(name).and_then(serde_json::Value::as_f64)
}

/// Readings counted in a view's rows.
pub fn total(rows: &[RowOut]) -> u64 {
    rows.iter().map(|r| count(r, "count")).sum()
}

/// Waits until the views have absorbed `expected` readings in total.
pub async fn wait_for_readings(cloud_url: &str, expected: u64, timeout: Duration) {
    let mut last = 0;
    let result = tokio::time::timeout(timeout, async {
        loop {
            last = total(&fetch_rows(cloud_url, "device_totals").await);
            if last >= expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    if result.is_err() {
        eprintln!("views hold {last} readings after {timeout:?}; expected {expected}");
    }
}

/// Every difference between the `device_windows` view and the ground truth;
/// empty when every acknowledged reading is counted exactly once.
pub fn diff_against_truth(truth: &GroundTruth, rows: &[RowOut]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_key: BTreeMap<(&str, i64), &RowOut> =
        rows.iter().map(|r| ((r.key.as_str(), r.window_start_ms), r)).collect();
    for t in &truth.rows {
        let Some(row) = by_key.remove(&(t.device.as_str(), t.window_start_ms)) else {
            problems.push(format!("{} @ {}: missing ({} readings)", t.device, t.window_start_ms, t.count));
            continue;
        };
        if count(row, "count") != t.count {
            problems.push(format!(
                "{} @ {}: count {} != truth {}",
                t.device,
                t.window_start_ms,
                count(row, "count"),
                t.count
            ));
        }
        for (name, m) in &t.metrics {
            let (n, sum) = (count(row, &format!("{name}_count")), num(row, &format!("{name}_sum")).unwrap_or(f64::NAN));
            let (min, max) = (num(row, &format!("{name}_min")), num(row, &format!("{name}_max")));
            let sum_ok = (sum - m.sum).abs() <= 1e-9 * m.sum.abs().max(1.0);
            if n != m.count || min != Some(m.min) || max != Some(m.max) || !sum_ok {
                problems.push(format!(
                    "{} @ {} {name}: view (n={n}, sum={sum}, min={min:?}, max={max:?}) != truth (n={}, sum={}, min={}, max={})",
                    t.device, t.window_start_ms, m.count, m.sum, m.min, m.max
                ));
            }
        }
    }
    for ((device, start), row) in by_key {
        problems
            .push(format!("{device} @ {start}: in the view ({} readings) but not in the truth", count(row, "count")));
    }
    problems
}

/// Asserts the view equals the ground truth exactly, printing process logs if not.
pub fn assert_exact(truth: &GroundTruth, rows: &[RowOut], procs: &[&Proc]) {
    let problems = diff_against_truth(truth, rows);
    let view_total = total(rows);
    if !problems.is_empty() {
        let logs: Vec<String> = procs.iter().map(|p| p.tail()).collect();
        panic!(
            "view != ground truth: {} problems (view {} readings, truth {} acknowledged); first ones:\n  {}\n{}",
            problems.len(),
            view_total,
            truth.acked,
            problems.iter().take(15).cloned().collect::<Vec<_>>().join("\n  "),
            logs.join("\n")
        );
    }
    assert_eq!(view_total, truth.acked);
}

/// 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

/// The simulated fleets start at [`T0`] (2026-01-01), in the gateway's past:
/// the agents under test accept device clocks this far behind their own.
pub const HISTORY_DAYS: u32 = 36_500;

/// 30 devices, 2,000 readings each, one per second, in batches of 500; with
/// `messy`, blocks of readings reversed (out of order), one in twenty sent
/// twice, a few far too late.
pub fn scenario(messy: bool) -> Vec<EdgeBatch> {
    let mut readings: Vec<Reading> = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..2000u64 {
        for d in 0..30u64 {
            let ts = T0 + i as i64 * 1000 - if messy && rnd(100) == 0 { 20 * 60_000 } else { 0 };
            let t = (rnd(100) != 0).then(|| 15.0 + rnd(1500) as f64 / 100.0);
            readings.push(Reading {
                device: format!("dev-{d:02}"),
                boot: 1,
                seq: i + 1,
                ts_ms: ts,
                schema: 2,
                metrics: [
                    ("temperature".to_string(), t),
                    ("humidity".to_string(), Some(40.0 + rnd(200) as f64 / 10.0)),
                ]
                .into(),
                tags: [
                    ("user".to_string(), format!("u-{}", d / 3)),
                    ("type".to_string(), ["telemetry", "status", "alarm"][rnd(3) as usize].to_string()),
                ]
                .into(),
            });
        }
    }
    let mut out: Vec<Reading> = Vec::new();
    for (i, block) in readings.chunks(50).enumerate() {
        if !messy {
            out.extend_from_slice(block);
            continue;
        }
        for r in block.iter().rev() {
            out.push(r.clone());
            if i % 20 == 3 {
                out.push(r.clone());
            }
        }
    }
    out.chunks(500).enumerate().map(|(i, c)| EdgeBatch::new("gw-crash", i as u64 + 1, c.to_vec())).collect()
}

/// POSTs batches to a node's ingest endpoint; returns the readings sent.
pub async fn ingest(cloud: &Cloud, batches: &[EdgeBatch]) -> u64 {
    let client = reqwest::Client::new();
    let mut records = 0;
    for b in batches {
        let resp = client
            .post(format!("{}/v1/ingest", cloud.url()))
            .header("content-encoding", "zstd")
            .body(batch::encode(b, 3))
            .send()
            .await
            .expect("ingest");
        assert_eq!(resp.status().as_u16(), 200);
        records += b.readings.len() as u64;
    }
    records
}

/// A Kafka-protocol broker process (tansu) on its own port: in memory, or
/// on an S3 store ([`Tansu::start_on_s3`]) so that it can be restarted.
#[derive(Debug)]
pub struct Tansu {
    pub port: u16,
    pub proc: Proc,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Tansu {
    fn binary() -> PathBuf {
        crate::tansu_binary().unwrap_or_else(|| {
            panic!(
                "no tansu broker: build it with `cargo install tansu --locked --version 0.6.0 --features dynostore \
                 --root ~/.cache/kappa-tools/tansu-0.6.0` (about 18 minutes; .ci/run does it) or set KAPPA_TANSU"
            )
        })
    }

    pub async fn start(dir: &Path) -> Tansu {
        let port = free_port();
        Self::start_advertising(dir, port, port).await
    }

    /// A broker on `port` that tells clients to reach it at `advertised`
    /// (a TLS proxy in front of it, say).
    pub async fn start_advertising(dir: &Path, port: u16, advertised: u16) -> Tansu {
        Self::launch(dir, port, advertised, "memory://tansu/", Vec::new()).await
    }

    /// A broker keeping its topics in `moto`'s bucket `tansu`: what it
    /// acknowledged survives [`Tansu::restart`].
    pub async fn start_on_s3(dir: &Path, moto: &Moto) -> Tansu {
        moto.create_bucket("tansu").await;
        let port = free_port();
        Self::launch(dir, port, port, "s3://tansu/", moto.env()).await
    }

    async fn launch(dir: &Path, port: u16, advertised: u16, storage: &str, mut env: Vec<(String, String)>) -> Tansu {
        // Its INFO log is a line per record handled: gigabytes in a soak.
        env.push(("RUST_LOG".into(), "warn".into()));
        let args = vec![
            "broker".to_string(),
            "--listener-url".into(),
            format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url".into(),
            format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine".into(),
            storage.into(),
        ];
        let proc = Self::spawn(dir, &args, &env);
        wait_for_port(port).await;
        Tansu { port, proc, args, env, dir: dir.to_path_buf() }
    }

    fn spawn(dir: &Path, args: &[String], env: &[(String, String)]) -> Proc {
        let bin = Self::binary();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_env("tansu", bin.to_str().unwrap_or_default(), &args, dir, &env)
    }

    /// Starts the broker again (after [`Proc::kill9`]), with the same storage.
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(&self.dir, &self.args, &self.env);
        wait_for_port(self.port).await;
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// PostgreSQL on this machine (`.ci/run` starts it): trust auth, database `test`.
pub fn postgres() -> String {
    std::env::var("KAPPA_TEST_POSTGRES").unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// A PostgreSQL schema of the test's own, dropped first (a rerun starts clean).
pub fn fresh_schema(name: &str) -> String {
    let schema = format!("kappa_e2e_{name}_{}", std::process::id());
    let drop = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
    // The blocking client runs a runtime of its own: not on the test's.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&postgres(), postgres::NoTls).expect("PostgreSQL at 127.0.0.1:5432");
        client.batch_execute(&drop).expect("drop the test schema");
    })
    .join()
    .expect("the schema is dropped");
    schema
}

/// The node's and the workers' config (without `data_dir` and `[http]`),
/// with `extra` (processor settings, views) at the end.
pub fn cluster_config(broker: &Tansu, schema: &str, extra: &str) -> String {
    cluster_config_on(broker, &postgres(), schema, extra)
}

/// [`cluster_config`] on the PostgreSQL server `conninfo`.
pub fn cluster_config_on(broker: &Tansu, conninfo: &str, schema: &str, extra: &str) -> String {
    format!(
        "[log]\nbackend = \"kafka\"\npartitions = 6\n[log.kafka]\nbrokers = \"{}\"\ntopic = \"events\"\n\
         delivery_timeout = \"3s\"\n[cluster]\npostgres = \"{}\"\nschema = \"{schema}\"\n\
         session_timeout = \"6s\"\n{extra}",
        broker.brokers(),
        conninfo
    )
}

/// A PostgreSQL server of the test's own (initdb into a temporary
/// directory, its own port), so that a test can stop and start it without
/// touching the machine's. Uses the machine's PostgreSQL binaries
/// (`/usr/lib/postgresql/*/bin`); as root, runs them as `postgres`.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    data: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    pub fn start(dir: &Path) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).find(|b| b.join("initdb").exists()))
            .expect("PostgreSQL's server binaries in /usr/lib/postgresql/*/bin");
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).expect("pgdata");
        let pg = Self { port: free_port(), data, bin };
        if pg.as_root() {
            let chown = std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status();
            assert!(chown.is_ok_and(|s| s.success()), "chown {} to postgres", dir.display());
        }
        let data = pg.data.display().to_string();
        pg.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        pg.start_again();
        pg
    }

    fn as_root(&self) -> bool {
        // SAFETY: geteuid(2) has no preconditions.
        #[allow(unsafe_code)]
        unsafe {
            libc::geteuid() == 0
        }
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let program = self.bin.join(tool);
        if self.as_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            std::process::Command::new(&program)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:
{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let data = self.data.display().to_string();
        let log = self.data.join("server.log").display().to_string();
        let opts = format!("-p {} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", self.port);
        self.run("pg_ctl", &["-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start"]);
    }

    /// A fast shutdown: connections are ended, as in a restart.
    pub fn stop(&self) {
        let data = self.data.display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"]);
    }

    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let _ = self.command("pg_ctl").args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}

/// A `kappa-cloud worker` process with `/metrics` on a port of its own.
#[derive(Debug)]
pub struct Worker {
    pub port: u16,
    pub proc: Proc,
    path: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Worker {
    pub async fn start(dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> Worker {
        let port = free_port();
        let path = dir.join(format!("{name}.toml"));
        let data = dir.join(format!("{name}-data"));
        std::fs::write(&path, format!("data_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{config}"))
            .expect("write the worker config");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let proc = Self::spawn(dir, &path, &env);
        wait_for_port(port).await;
        Worker { port, proc, path, env, dir: dir.to_path_buf() }
    }

    fn spawn(dir: &Path, path: &Path, env: &[(String, String)]) -> Proc {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_env(&name, bin(), &["cloud", "worker", "--config", path.to_str().unwrap_or_default()], dir, &env)
    }

    /// Starts the worker again (after [`Proc::kill9`]), with the same config.
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(&self.dir, &self.path, &self.env);
        wait_for_port(self.port).await;
    }

    /// Readings this worker has processed so far.
    pub async fn processed(&self) -> f64 {
        series(&format!("http://127.0.0.1:{}", self.port), r#"kappa_cloud_readings_processed_total{pipeline="main"}"#)
            .await
    }
}

/// moto's S3 server (a real process speaking the S3 protocol) on its own port.
#[derive(Debug)]
pub struct Moto {
    pub port: u16,
    pub proc: Proc,
}

impl Moto {
    pub async fn start(dir: &Path) -> Moto {
        let port = free_port();
        let proc = Proc::spawn_cmd("moto", "moto_server", &["-H", "127.0.0.1", "-p", &port.to_string()], dir);
        wait_for_port(port).await;
        Moto { port, proc }
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let url = format!("http://127.0.0.1:{}/{bucket}", self.port);
        let created = reqwest::Client::new().put(url).send().await.expect("moto answers");
        assert!(created.status().is_success(), "create the bucket {bucket}: {}", created.status());
    }

    /// The environment an S3 client (object_store) needs to reach it.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "kappa-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "kappa-test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The first line where two dumps differ, or their line counts.
pub fn first_difference(a: &str, b: &str) -> String {
    a.lines()
        .zip(b.lines())
        .find(|(x, y)| x != y)
        .map_or_else(|| format!("{} vs {} lines", a.lines().count(), b.lines().count()), |(x, y)| format!("{x}\n{y}"))
}
