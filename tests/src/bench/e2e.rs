//! End to end on one machine: the simulator, the edge agent and a cloud
//! node as three processes (the agent's own MQTT listener, embedded log, default views),
//! offered a rising rate until the pipeline stops keeping up. For each rate
//! the freshness of the views is read from the cloud's own histogram,
//! `kappa_cloud_event_to_view_seconds` (a reading's event time, stamped by
//! the simulated device when it samples, to the commit that makes it
//! visible), over a measured interval after a warm-up. The result is the
//! highest rate at which the node committed what was offered and the p99
//! stayed within 1 s, and the latency distribution at that rate.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{bucket_quantile, cpu_seconds, free_port, scrape, scrape_buckets, wait_port};

/// The freshness goal the rate must meet.
const P99_GOAL_S: f64 = 1.0;
/// Devices in the fleet; the rate per device sets the offered load.
const DEVICES: u32 = 1000;
/// How the pipeline is set up for latency (both are documented settings):
/// a partial batch leaves the gateway after 100 ms, and the processor
/// checkpoints (makes rows visible) every 200 ms.
const BATCH_AGE: &str = "100ms";
const CHECKPOINT: &str = "200ms";

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[&str]) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe).args(args).env("RUST_LOG", "error").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// The cloud's and the agent's metrics ports, with both running.
fn start_pipeline(dir: &Path, procs: &mut Procs) -> (u16, u16, u16) {
    let (cloud_http, mqtt, edge_http) = (free_port(), free_port(), free_port());
    let cloud_cfg = dir.join("e2e-cloud.toml");
    std::fs::write(
        &cloud_cfg,
        format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{cloud_http}\"\n[processor]\ncheckpoint_interval = \"{CHECKPOINT}\"\n",
            dir.join("e2e-cloud")
        ),
    )
    .unwrap();
    procs.0.push(spawn(&["cloud", "run", "--config", cloud_cfg.to_str().unwrap()]));
    wait_port(cloud_http);
    let edge_cfg = dir.join("e2e-edge.toml");
    std::fs::write(
        &edge_cfg,
        format!(
            "gateway_id = \"bench-e2e\"\ndata_dir = {:?}\n[mqtt]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n[forward]\ncloud_url = \"http://127.0.0.1:{cloud_http}\"\nmax_batch_age = \"{BATCH_AGE}\"\n[http]\nlisten = \"127.0.0.1:{edge_http}\"\n",
            dir.join("e2e-edge")
        ),
    )
    .unwrap();
    procs.0.push(spawn(&["edge", "run", "--config", edge_cfg.to_str().unwrap()]));
    wait_port(edge_http);
    wait_port(mqtt);
    (cloud_http, mqtt, edge_http)
}

/// One rate: `rate` readings/s in total, for a warm-up and then `seconds` measured.
fn step(ports: (u16, u16, u16), pids: (u32, u32), rate: u32, seconds: f64, warmup: f64) -> Value {
    let (cloud_http, mqtt, edge_http) = ports;
    let per_device = rate as f64 / DEVICES as f64;
    let mut sim = spawn(&[
        "sim",
        "--broker",
        &format!("127.0.0.1:{mqtt}"),
        "--devices",
        &DEVICES.to_string(),
        "--rate",
        &format!("{per_device}"),
        "--duration",
        &format!("{}s", seconds + warmup + 1.0),
        "--drain-timeout",
        "5s",
        "--wall-clock",
        // Every PUBACK waits for a durable commit: a device at tens of
        // readings a second keeps several in flight.
        "--inflight",
        "16",
    ]);
    std::thread::sleep(Duration::from_secs_f64(warmup));
    let hist = "kappa_cloud_event_to_view_seconds";
    let main = "pipeline=\"main\"";
    let b0 = scrape_buckets(cloud_http, hist, main);
    let (cloud_cpu0, edge_cpu0, t0) = (cpu_seconds(pids.0), cpu_seconds(pids.1), Instant::now());
    let e0 = scrape(edge_http, "kappa_edge_readings_committed_total");
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let b1 = scrape_buckets(cloud_http, hist, main);
    let wall = t0.elapsed().as_secs_f64();
    // Readings made visible in the main pipeline's views (the histogram's count).
    let count = |b: &[(f64, f64)]| b.last().map_or(0.0, |l| l.1);
    let processed = (count(&b1) - count(&b0)) / wall;
    let committed_edge = (scrape(edge_http, "kappa_edge_readings_committed_total") - e0) / wall;
    let (cloud_cpu, edge_cpu) = ((cpu_seconds(pids.0) - cloud_cpu0) / wall, (cpu_seconds(pids.1) - edge_cpu0) / wall);
    let _ = sim.kill();
    let _ = sim.wait();
    let q = |q: f64| bucket_quantile(&b0, &b1, q);
    let (p50, p90, p99) = (q(0.5), q(0.9), q(0.99));
    let kept_up = processed >= 0.95 * rate as f64;
    let ok = kept_up && p99 <= P99_GOAL_S;
    println!(
        "  end to end at {rate} readings/s offered: edge committed {committed_edge:.0}/s, views took in {processed:.0}/s; \
         event time -> visible in the views p50 <= {p50} s, p90 <= {p90} s, p99 <= {p99} s; cloud {cloud_cpu:.2} cores, agent {edge_cpu:.2} cores{}",
        if ok { "" } else { " (not sustained)" }
    );
    // The distribution as cumulative shares per bucket bound.
    let total = count(&b1) - count(&b0);
    let cdf: Vec<Value> = b1
        .iter()
        .zip(&b0)
        .map(|((le, a), (_, b))| json!({ "le_s": if le.is_finite() { json!(le) } else { json!("+Inf") }, "share": (a - b) / total.max(1.0) }))
        .collect();
    json!({
        "offered_per_s": rate, "edge_committed_per_s": committed_edge, "processed_per_s": processed,
        "p50_le_s": p50, "p90_le_s": p90, "p99_le_s": p99, "cdf": cdf,
        "cloud_cores": cloud_cpu, "agent_cores": edge_cpu, "sustained": ok,
    })
}

pub fn run(dir: &Path, scale: f64) -> Value {
    let quick = scale < 1.0;
    let rates: &[u32] =
        if quick { &[500, 1000] } else { &[2_000, 5_000, 10_000, 15_000, 20_000, 30_000, 40_000, 50_000, 60_000] };
    let (seconds, warmup) = if quick { (3.0, 2.0) } else { (15.0, 5.0) };
    let mut procs = Procs(Vec::new());
    let ports = start_pipeline(dir, &mut procs);
    let pids = (procs.0[0].id(), procs.0[1].id());
    let mut steps = Vec::new();
    let mut best: Option<Value> = None;
    for &rate in rates {
        let s = step(ports, pids, rate, seconds, warmup);
        let ok = s["sustained"].as_bool().unwrap_or(false);
        steps.push(s.clone());
        if !ok {
            break;
        }
        best = Some(s);
        // Let the pipeline drain before the next rate.
        std::thread::sleep(Duration::from_secs(2));
    }
    let max = best.as_ref().map_or(0, |b| b["offered_per_s"].as_u64().unwrap_or(0));
    println!(
        "end to end (sim -> edge -> cloud, {DEVICES} devices, batch age {BATCH_AGE}, checkpoint {CHECKPOINT}): highest sustained rate with p99 event -> view <= {P99_GOAL_S} s: {max} readings/s"
    );
    json!({
        "devices": DEVICES, "max_batch_age": BATCH_AGE, "checkpoint_interval": CHECKPOINT, "p99_goal_s": P99_GOAL_S,
        "max_sustained_per_s": max, "at_max": best, "steps": steps,
    })
}
