//! Section `edge_ingest_mqtt`: the agent as a process, fed by the simulator
//! (another process), forwarding off (the cloud URL is unreachable), in each
//! MQTT mode, side by side in one run:
//!
//! * `default`: devices on the agent's own listener, 500 × 100 readings/s
//!   (16 publishes in flight per device: every PUBACK waits for a durable
//!   commit), readings per agent CPU-second with the MQTT work included;
//! * `external`: the same fleet through a private Mosquitto, the agent's CPU
//!   and Mosquitto's own, so the default mode's cost compares with agent +
//!   broker;
//! * `default_10k_devices`: 10,000 devices at 1 reading/s, the agent's RSS;
//! * `default_low_load`: 50 devices at 2 readings/s, arrival → durable latency
//!   when commits need not wait for company;
//! * `gateway_profile`: the agent in a cgroup of half a core and 128 MiB
//!   (root only; skipped otherwise, and said so), 2,000 devices at 1
//!   reading/s: sustained or not, lost or not, OOM or not, its CPU share and RSS.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::cgroup::Cgroup;
use super::{bucket_quantile, cpu_seconds, free_port, scrape, scrape_buckets, wait_port};

pub fn run(dir: &Path, scale: f64) -> Value {
    let default = |devices, rate, inflight| Run { devices, rate, inflight, ..Run::default() };
    json!({
        "default": default(500, 100, 16).measure(dir, scale),
        "external": Run { external: true, ..default(500, 100, 16) }.measure(dir, scale),
        "default_10k_devices": default(10_000, 1, 1).measure(dir, scale),
        "default_low_load": default(50, 2, 1).measure(dir, scale),
        "gateway_profile": Run { cgroup: Some((50_000, 128 << 20)), ..default(2_000, 1, 1) }.measure(dir, scale),
    })
}

/// One measured run.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    /// Through a private Mosquitto instead of the agent's own listener.
    external: bool,
    devices: u32,
    /// Readings per second per device.
    rate: u32,
    /// QoS 1 publishes each simulated device keeps in flight.
    inflight: u32,
    /// `(CPU quota in µs per 100 ms, memory limit in bytes)` of a cgroup for the agent.
    cgroup: Option<(u64, u64)>,
}

/// The agent binary: `kappa-edge` next to this one when it was built, else this one's `edge` role.
fn edge_command() -> (std::process::Command, &'static str) {
    let exe = std::env::current_exe().unwrap();
    let sibling = exe.with_file_name("kappa-edge");
    if sibling.exists() {
        (std::process::Command::new(sibling), "kappa-edge")
    } else {
        let mut c = std::process::Command::new(exe);
        c.arg("edge");
        (c, "kappa-bench edge (build kappa-edge --release for its own RSS)")
    }
}

/// A field of `/proc/{pid}/status` in MiB (`VmRSS`, `VmHWM`).
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

impl Run {
    fn name(&self) -> String {
        let mode = if self.external { "external" } else { "default" };
        format!("{mode}-{}x{}", self.devices, self.rate)
    }

    fn measure(self, dir: &Path, scale: f64) -> Value {
        let exe = std::env::current_exe().unwrap();
        let (mqtt, http) = (free_port(), free_port());
        let quiet = || std::process::Stdio::null();
        let mut broker = None;
        let mqtt_section = if self.external {
            let conf = dir.join("bench-mosquitto.conf");
            std::fs::write(
                &conf,
                format!("listener {mqtt} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\n"),
            )
            .unwrap();
            broker = Some(
                std::process::Command::new("mosquitto")
                    .args(["-c", conf.to_str().unwrap()])
                    .stdout(quiet())
                    .stderr(quiet())
                    .spawn()
                    .expect("mosquitto (the external-mode benchmark needs it on PATH)"),
            );
            wait_port(mqtt);
            format!("mode = \"external\"\nbroker_url = \"mqtt://127.0.0.1:{mqtt}\"\n")
        } else {
            format!("mode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n")
        };
        let tag = self.name();
        let cfg = dir.join(format!("bench-edge-{tag}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "gateway_id = \"bench\"\ndata_dir = {:?}\n[mqtt]\n{mqtt_section}max_connections = 20000\n[forward]\ncloud_url = \"http://127.0.0.1:9\"\nretry_min = \"10s\"\nretry_max = \"60s\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
                dir.join(format!("bench-edge-{tag}"))
            ),
        )
        .unwrap();
        let cgroup = self
            .cgroup
            .map(|(quota, memory)| Cgroup::new(&format!("kappa-bench-{}", std::process::id()), quota, Some(memory)));
        let (mut edge_cmd, binary) = edge_command();
        let mut edge = edge_cmd
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", "error")
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .unwrap();
        let confined = match &cgroup {
            Some(Ok(c)) => c.add(edge.id()).map(|()| true),
            Some(Err(e)) => Err(e.clone()),
            None => Ok(false),
        };
        if let Err(e) = &confined {
            println!("edge ingest {tag}: no cgroup ({e}); the gateway profile needs root and cgroup v1 cpu and memory");
            let _ = edge.kill();
            let _ = edge.wait();
            return json!({ "skipped": e });
        }
        wait_port(http);
        if !self.external {
            wait_port(mqtt);
        }
        let seconds = (20.0 * scale).max(3.0);
        // Connect and warm up, then measure while the fleet still samples.
        let warmup = if self.devices > 1000 { 8.0 } else { 3.0 };
        let truth = dir.join(format!("bench-truth-{tag}.json"));
        let mut sim = std::process::Command::new(&exe)
            .args(["sim", "--broker", &format!("127.0.0.1:{mqtt}"), "--devices", &self.devices.to_string()])
            .args(["--rate", &self.rate.to_string(), "--duration", &format!("{}s", seconds + warmup + 2.0)])
            .args(["--wall-clock", "--drain-timeout", "10s", "--inflight", &self.inflight.to_string()])
            .args(["--truth", truth.to_str().unwrap()])
            .env("RUST_LOG", "error")
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs_f64(warmup));
        let broker_cpu = || broker.as_ref().map_or(0.0, |b| cpu_seconds(b.id()));
        let lat0 = scrape_buckets(http, "kappa_edge_ingest_to_durable_seconds", "");
        let (c0, cpu0, b0, n0, t0) = (
            scrape(http, "kappa_edge_log_commits_total"),
            cpu_seconds(edge.id()),
            broker_cpu(),
            scrape(http, "kappa_edge_readings_committed_total"),
            Instant::now(),
        );
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let (c1, cpu1, b1, n1, wall) = (
            scrape(http, "kappa_edge_log_commits_total"),
            cpu_seconds(edge.id()),
            broker_cpu(),
            scrape(http, "kappa_edge_readings_committed_total"),
            t0.elapsed().as_secs_f64(),
        );
        let rss = status_mib(edge.id(), "VmRSS");
        let lat1 = scrape_buckets(http, "kappa_edge_ingest_to_durable_seconds", "");
        let (p50, p99) = (bucket_quantile(&lat0, &lat1, 0.5) * 1e3, bucket_quantile(&lat0, &lat1, 0.99) * 1e3);
        let _ = sim.wait();
        // Every acknowledged reading committed, none lost on the way: the simulator's truth against the log.
        let sim_truth = kappa_sim::truth::GroundTruth::read(&truth).ok();
        let committed_total = scrape(http, "kappa_edge_readings_committed_total");
        let peak = status_mib(edge.id(), "VmHWM");
        let memory = match &cgroup {
            Some(Ok(c)) => Some(c.memory_events()),
            _ => None,
        };
        let _ = edge.kill();
        let _ = edge.wait();
        if let Some(mut b) = broker {
            let _ = b.kill();
            let _ = b.wait();
        }
        let readings = n1 - n0;
        let cpu = (cpu1 - cpu0).max(0.01);
        let broker_cpu = b1 - b0;
        let offered = f64::from(self.devices * self.rate);
        let (acked, sampled) = sim_truth.as_ref().map_or((0, 0), |t| (t.acked, t.sampled));
        println!(
            "edge ingest via MQTT, {tag} (in flight {}, durability=full): {:.0} readings/s of {offered:.0} offered, {:.0} readings per agent CPU-second{}, {:.0} per commit, agent RSS {rss:.1} MiB (peak {peak:.1}), arrival to durable p50 <= {p50:.2} ms p99 <= {p99:.2} ms; simulator: {acked} of {sampled} sampled acknowledged, agent committed {committed_total:.0} ({binary})",
            self.inflight,
            readings / wall,
            readings / cpu,
            if self.external {
                format!(
                    ", {:.0} per agent + Mosquitto CPU-second (Mosquitto {:.2} cores)",
                    readings / (cpu + broker_cpu),
                    broker_cpu / wall
                )
            } else {
                String::new()
            },
            readings / (c1 - c0).max(1.0),
        );
        let mut out = json!({
            "broker": if self.external { "mosquitto" } else { "agent" },
            "devices": self.devices, "offered_per_s": offered, "in_flight_per_device": self.inflight,
            "seconds": wall, "agent_binary": binary,
            "readings_per_s": readings / wall, "agent_cpu_seconds": cpu, "agent_cpu_share": cpu / wall,
            "readings_per_agent_cpu_second": readings / cpu,
            "readings_per_commit": readings / (c1 - c0).max(1.0),
            "agent_rss_mib": rss, "agent_peak_rss_mib": peak,
            "arrival_to_durable_ms": { "p50_at_most": p50, "p99_at_most": p99, "buckets": "x1.25 from 0.1 ms" },
            "simulator_sampled": sampled, "simulator_acked": acked, "agent_committed": committed_total,
            "acked_not_committed": acked.saturating_sub(committed_total as u64),
            "sustained": readings / wall >= 0.95 * offered,
        });
        if self.external {
            out["broker_cpu_seconds"] = json!(broker_cpu);
            out["readings_per_agent_and_broker_cpu_second"] = json!(readings / (cpu + broker_cpu));
        }
        if let (Some((quota, limit)), Some((failcnt, oom_killed))) = (self.cgroup, memory) {
            out["cgroup"] = json!({
                "cpu_cores": quota as f64 / 100_000.0, "memory_limit_mib": limit >> 20,
                "memory_limit_hits": failcnt, "oom_killed": oom_killed,
                "sustained_without_loss": readings / wall >= 0.95 * offered && acked == sampled && !oom_killed,
            });
        }
        out
    }
}
