//! The end-to-end harness, shared by the test binaries (`tests/e2e`,
//! `tests/alone`) and the tools (`kappa-chaos`): processes, ports, configs,
//! the fleet, and the comparison of views against ground truth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kappa_cloud::api::{RowOut, RowsPage};
use kappa_common::Reading;
use kappa_common::batch::{self, EdgeBatch};
use kappa_sim::truth::GroundTruth;

mod nodes;
mod services;

pub use self::nodes::*;
pub use self::services::*;

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
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`), so
/// that no outgoing connection's source port (the 10,000-device tests make
/// thousands at once) can take it between this call and the server's bind;
/// a counter per process hands each port out once. Where that range starts
/// too low to leave room, the kernel picks, as before.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(FIRST);
    if span >= 1_000 {
        // Test processes side by side start at different places.
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = FIRST + start.wrapping_add(n) % span;
            if let Ok(port) = u16::try_from(port)
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    kappa_runtime::net::free_port().expect("no free port")
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
        if status.as_u16() == 429 {
            // Over the token's rate: wait as told, as a client should, and ask again.
            let wait = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
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
    use kappa_common::reading::as_measured;
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
            // The API shows a value that is exactly a 32-bit float as that
            // float's shortest decimal (the views store it exactly; `views
            // dump` shows that): readings' own values always, and a sum when
            // it happens to be one, which moves it by less than a 32-bit
            // float's precision (2^-24 of it).
            let sum_ok = (sum - m.sum).abs() <= 1e-7 * m.sum.abs().max(1.0);
            let (t_min, t_max) = (as_measured(m.min), as_measured(m.max));
            if n != m.count || min != Some(t_min) || max != Some(t_max) || !sum_ok {
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

/// The first line where two dumps differ, or their line counts.
pub fn first_difference(a: &str, b: &str) -> String {
    a.lines()
        .zip(b.lines())
        .find(|(x, y)| x != y)
        .map_or_else(|| format!("{} vs {} lines", a.lines().count(), b.lines().count()), |(x, y)| format!("{x}\n{y}"))
}
